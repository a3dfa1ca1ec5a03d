"""Medians, ratios, targets and the Markdown table of ``python -m benchmarks.step_time``."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.candidates import OPTIMIZERS, SECTIONS

# The bounds.
MUON_BOUND = 1.2  # (b) update alone: ARS2-Neo base / Muon, same NS dtype
ADAMW_BOUND = 1.4  # (a) full step: ARS2-Neo base / AdamW
ADAPTIVE_SLACK = 1.1  # (a) full step: adaptive / base <= (1 + 1/effective_k) * 1.1
NNX_BOUNDS = {"ars2_base": 1.4, "ars2_sync": 2.4}  # (c) full step: ARS2-Neo / AdamW


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate (median over the rounds), the delayed and adaptive mixes, ratios.

    A mode with two timed branches gets a row ``(T_sync + (k - 1)·T_other) / k`` at its
    ``k`` (``result['effective_k']``). Ratios are of medians: ``vs_adamw`` and ``vs_muon``
    within one section and framework, ``jax_vs_torch`` within one section and optimizer.
    """
    rows = []
    for key, times in result["samples"].items():
        workload, section, framework, optimizer = key.split("/")
        rows.append(
            {
                "workload": workload,
                "section": section,
                "framework": framework,
                "optimizer": optimizer,
                "median_s": statistics.median(times),
                "rounds": len(times),
            }
        )
    by_key = {(r["section"], r["framework"], r["optimizer"]): r for r in rows}
    for (section, framework, optimizer), sync in list(by_key.items()):
        name, _, branch = optimizer.partition(":")
        if branch != "sync":
            continue
        other = by_key[(section, framework, f"{name}:other")]
        k = result["effective_k"][name]
        mixed = dict(sync, optimizer=name, mixed_at_k=k)
        mixed["median_s"] = (sync["median_s"] + (k - 1) * other["median_s"]) / k
        rows.append(mixed)
        by_key[(section, framework, name)] = mixed
    for row in rows:
        section, framework = row["section"], row["framework"]
        for ratio, reference in (("vs_adamw", "adamw"), ("vs_muon", "muon")):
            ref = by_key.get((section, framework, reference))
            if ref is not None and row["optimizer"] != reference:
                row[ratio] = row["median_s"] / ref["median_s"]
        if framework == "jax":
            twin = by_key.get((section, "torch", row["optimizer"]))
            if twin is not None:
                row["jax_vs_torch"] = row["median_s"] / twin["median_s"]
    order = list(OPTIMIZERS)
    sections = list(SECTIONS)
    rows.sort(
        key=lambda r: (sections.index(r["section"]), r["framework"], order.index(r["optimizer"]))
    )
    return rows


def _median(results, workload, section, framework, optimizer) -> float | None:
    for row in results.get(workload, {}).get("rows", []):
        if (row["section"], row["framework"], row["optimizer"]) == (section, framework, optimizer):
            return row["median_s"]
    return None


def targets(results: dict[str, dict[str, Any]], ns_dtype: str) -> list[dict[str, Any]]:
    """The issue's targets that the rows measured allow to check (``bound`` None: reported)."""
    found = []
    ratio = lambda a, b: None if a is None or b is None else a / b
    base_b = _median(results, "b", "update", "jax", "ars2_base")
    value = ratio(base_b, _median(results, "b", "update", "jax", "muon"))
    if value is not None:
        found.append(
            {
                "target": f"(b) update alone, JAX: ARS2-Neo base / Muon ({ns_dtype} NS)",
                "measured": value,
                "bound": MUON_BOUND,
            }
        )
    default_grouped = results.get("b", {}).get("default_grouped")

    def grouping(name):  # a grouping variant's median; ARS2-Neo base is the default's
        explicit = _median(results, "b", "update", "jax", name)
        if explicit is None and (name == "ars2_base_grouped") == default_grouped:
            return base_b
        return explicit

    value = ratio(grouping("ars2_base_per_leaf"), grouping("ars2_base_grouped"))
    if value is not None:
        found.append(
            {
                "target": "(b) update alone, JAX: NS per leaf / NS grouped by shape "
                "(above 1: grouping is faster)",
                "measured": value,
                "bound": None,
            }
        )
    base_a = _median(results, "a", "step", "jax", "ars2_base")
    value = ratio(base_a, _median(results, "a", "step", "jax", "adamw"))
    if value is not None:
        floor = results["a"]["flops"]["floor_ratio"]
        found.append(
            {
                "target": f"(a) full step, JAX: ARS2-Neo base / AdamW (FLOP ratio {floor:.2f})",
                "measured": value,
                "bound": ADAMW_BOUND,
                "flop_ratio": floor,
            }
        )
    value = ratio(_median(results, "a", "step", "jax", "ars2_adaptive"), base_a)
    if value is not None:
        k = results["a"]["effective_k"]["ars2_adaptive"]
        found.append(
            {
                "target": "(a) full step, JAX: adaptive / base, bound "
                f"(1 + 1/effective_k)·{ADAPTIVE_SLACK} at effective_k {k:.2f}",
                "measured": value,
                "bound": (1 + 1 / k) * ADAPTIVE_SLACK,
            }
        )
    adamw_c = _median(results, "c", "step", "jax", "adamw")
    for name, bound in NNX_BOUNDS.items():
        value = ratio(_median(results, "c", "step", "jax", name), adamw_c)
        if value is None:
            continue
        flop_ratio = results["c"].get("flop_ratio", {}).get(name)
        found.append(
            {
                "target": f"(c) NNX LM full step, JAX: {OPTIMIZERS[name]} / AdamW "
                f"(FLOP ratio {flop_ratio:.2f})",
                "measured": value,
                "bound": bound,
                "flop_ratio": flop_ratio,
            }
        )
    for target in found:
        bound = target["bound"]
        target["met"] = None if bound is None else bool(target["measured"] <= bound)
    return found


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.2f} ms"


FLOP_NAMES = {
    "step_adamw": "full step, AdamW",
    "step_ars2_base": "full step, ARS2-Neo base (NS loop counted in full)",
    "step_ars2_sync": "full step, ARS2-Neo sync (NS loop counted in full)",
    "forward_backward": "forward-backward of one batch",
    "newton_schulz": "Newton-Schulz over the ARS2 track (5 steps)",
}


def markdown(report: dict[str, Any]) -> str:
    versions, settings = report["versions"], report["settings"]
    lines = [
        f"# Optimizer step time, {report['date']}",
        "",
        f"{report['machine']}; jax {versions['jax']} ({versions['jax_backend']}), "
        f"optax {versions['optax']}, torch {versions['torch']} ({versions['torch_device']}, "
        f"{versions['torch_threads']} threads, OMP_WAIT_POLICY {versions['omp_wait_policy']}). "
        f"Newton-Schulz in {settings['ns_dtype']} "
        "(in the 2-D section: bfloat16). Load average (1, 5, 15 min) before / after: "
        f"{report['load_average']['before']} / {report['load_average']['after']}; "
        f"{report['wall_seconds'] / 60:.1f} minutes in all.",
        "",
        "Medians of interleaved rounds. Ratios are of medians: × AdamW and × Muon within "
        "one section and framework, JAX / torch within one section and optimizer.",
    ]
    for workload, result in report["results"].items():
        lines += [
            "",
            f"## ({workload}) {result['description']}: {result['n_params']:,} parameters, "
            f"{settings[f'rounds_{workload}']} rounds",
            "",
            "| section | framework | optimizer | median | × AdamW | × Muon | JAX / torch |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            name = OPTIMIZERS[row["optimizer"]]
            if "mixed_at_k" in row:
                name += f", mixed at k = {row['mixed_at_k']:.2f}"
            lines.append(
                f"| {SECTIONS[row['section']]} | {row['framework']} | {name} | "
                f"{_seconds(row['median_s'])} | {_ratio(row.get('vs_adamw'))} | "
                f"{_ratio(row.get('vs_muon'))} | {_ratio(row.get('jax_vs_torch'))} |"
            )
        if "effective_k_how" in result:
            lines += ["", f"A-GSAM effective_k: {result['effective_k_how']}."]
        lines += [f"\nNot timed: {note}." for note in result["not_timed"]]
    lines += ["", "## Targets", "", "| target | measured | bound | met |", "|---|---|---|---|"]
    for target in report["targets"]:
        bound = "" if target["bound"] is None else f"≤ {target['bound']:.2f}"
        met = {None: "(reported)", True: "yes", False: "**no**"}[target["met"]]
        lines.append(f"| {target['target']} | {target['measured']:.2f} | {bound} | {met} |")
    lines += ["", "## FLOPs (XLA cost analysis)", "", "| quantity | value |", "|---|---|"]
    for workload, result in report["results"].items():
        for key, value in result["flops"].items():
            if key == "floor_ratio":
                lines.append(
                    f"| ({workload}) full step, ARS2-Neo base / AdamW: (forward-backward + NS) "
                    f"/ forward-backward | {value:.2f} |"
                )
            else:
                lines.append(f"| ({workload}) {FLOP_NAMES[key]} | {value / 1e9:.3f} GFLOP |")
    lines += [
        "",
        "## Optimizer state per parameter",
        "",
        "| workload | framework | optimizer | bytes / param | state |",
        "|---|---|---|---|---|",
    ]
    for result in report["results"].values():
        for row in result["memory"]:
            lines.append(
                f"| ({row['workload']}) | {row['framework']} | {OPTIMIZERS[row['optimizer']]} | "
                f"{row['bytes_per_param']:.2f} | {row['state_bytes'] / 2**20:.1f} MiB for "
                f"{row['params']:,} params |"
            )
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
