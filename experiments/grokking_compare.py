"""Comparisons on the grokking task: several configs and frameworks, many seeds.

``compare`` trains configs in one or both frameworks into one table;
``train_seeds`` and ``compare_seeds`` train one model per seed (sequentially or all
seeds in one ``jax.vmap``-ed program) and report medians, interquartile ranges and
Mann-Whitney U tests. The command line is :mod:`experiments.grokking`'s.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ars2_jax
from experiments import common, grokking, parallel

# --- several runs -----------------------------------------------------------------------


def compare(
    configs: list[dict[str, Any]],
    frameworks: list[str],
    settings: grokking.RunSettings,
) -> tuple[list[dict[str, Any]], str]:
    """Runs every config in every framework; writes ``comparison.md`` and ``curves.png``."""
    out = pathlib.Path(settings.out_dir or grokking.ROOT / "results" / "grokking" / "compare")
    out.mkdir(parents=True, exist_ok=True)
    results, rows = [], []
    for config in configs:
        for framework in frameworks:
            run_settings = dataclasses.replace(
                settings, framework=framework, out_dir=out / f"{config['name']}-{framework}"
            )
            try:
                result = grokking.train_and_evaluate(config, run_settings)
            except common.UnsupportedOnTorch as why:
                rows.append(
                    [config["name"], framework, *["n/a"] * (len(grokking.MILESTONES) + 2), str(why)]
                )
                continue
            results.append(result)
            timing = f"{result['epoch_seconds']:.3f}"
            note = ""
            if "floor_seconds" in result:
                note = (
                    f"floor {result['floor_seconds']:.3f} s, epoch/floor "
                    f"{result['epoch_seconds'] / result['floor_seconds']:.2f}"
                )
            best = max(r["eval_acc"] for r in result["history"])
            rows.append(
                [
                    config["name"],
                    framework,
                    *(
                        common.format_milestone(result["milestones"][k])
                        for k, _, _ in grokking.MILESTONES
                    ),
                    f"{best:.3f}",
                    timing,
                    note,
                ]
            )
    _add_speed_ratios(results, rows)
    columns = [
        "run",
        "framework",
        *(title for _, title, _ in grokking.MILESTONES),
        "best eval acc",
        "median epoch s",
        "notes",
    ]
    header = (
        f"# Grokking comparison\n\nSeed {settings.seed}; epochs (wall seconds) at which each run "
        "first reaches each milestone; – = never within the run."
    )
    text = common.write_comparison(out / "comparison.md", header, columns, rows)
    if results:
        common.plot_curves(
            out / "curves.png", {r["label"]: r["history"] for r in results}, grokking.CURVES
        )
    return results, text


def _add_speed_ratios(results, rows) -> None:
    """Appends ``jax/torch`` epoch-time ratios to the notes of configs run in both."""
    by_key = {(r["name"], r["framework"]): r for r in results}
    for row in rows:
        name, framework = row[0], row[1]
        if framework == "jax" and (name, "torch") in by_key and (name, "jax") in by_key:
            ratio = (
                by_key[(name, "jax")]["epoch_seconds"] / by_key[(name, "torch")]["epoch_seconds"]
            )
            row[-1] = (row[-1] + "; " if row[-1] else "") + f"jax/torch epoch {ratio:.2f}"


# --- many seeds -------------------------------------------------------------------------


SEED_MODES = ("auto", "vmap", "sequential")


def choose_seed_mode(config: dict[str, Any], seed_mode: str, backend: str | None = None) -> str:
    """``vmap`` trains all seeds in one compiled program; ``sequential`` one after another.

    ``auto`` picks ``sequential`` on CPUs, where the vmapped program was measured no
    faster for AdamW and slower for ARS2-Neo (XLA's batched matmuls run slower than
    separate ones there; see "Across seeds" in docs/results.md), and for the delayed and
    adaptive modes of ARS2-Neo anywhere: under ``vmap`` their ``lax.cond`` becomes a
    ``select``, so every seed pays the second gradient on every step. Elsewhere
    (``backend`` defaults to JAX's) it picks ``vmap``, which fills an accelerator that
    one small model leaves idle.
    """
    if seed_mode not in SEED_MODES:
        raise ValueError(f"seed_mode={seed_mode!r} must be one of {SEED_MODES}")
    if seed_mode != "auto":
        return seed_mode
    optimizer = config["optimizer"]
    conditional = optimizer["name"] == "ars2_neo" and (
        optimizer.get("adaptive", False) or optimizer.get("k", 0) > 1
    )
    on_cpu = (backend or jax.default_backend()) == "cpu"
    return "sequential" if conditional or on_cpu else "vmap"


def train_seeds(
    config: dict[str, Any],
    seeds: list[int],
    settings: grokking.RunSettings | None = None,
    seed_mode: str = "auto",
) -> dict[str, Any]:
    """Trains one model per seed (JAX) and summarizes the milestones across seeds.

    Each seed has its own initial weights and data order, and its own split
    unless ``settings.split_seed`` fixes one. Writes ``seed-<s>/`` run directories,
    ``summary.md`` (median [interquartile range] (seeds reached / seeds) per
    milestone) and ``curves.png`` (median and band) under ``settings.out_dir``.
    """
    settings = settings or grokking.RunSettings()
    out = pathlib.Path(
        settings.out_dir or grokking.ROOT / "results" / "grokking" / f"{config['name']}-seeds"
    )
    mode = choose_seed_mode(config, seed_mode)
    start = time.perf_counter()
    if mode == "sequential":
        runs = [
            grokking.train_and_evaluate(
                config, dataclasses.replace(settings, seed=s, out_dir=out / f"seed-{s}")
            )
            for s in seeds
        ]
    else:
        runs = _train_jax_vmapped(config, settings, seeds, out)
    seconds = time.perf_counter() - start
    config = grokking.resolved(config, settings)
    epochs = config["train"]["epochs"]
    steps_per_epoch = math.ceil(
        int(
            config.get("task", {}).get("train_fraction", 0.3) * grokking.model_config(config).p ** 2
        )
        / config["train"].get("batch_size", 512)
    )
    seed_steps = sum(len(run["history"]) for run in runs) * steps_per_epoch
    table = {
        key: common.seed_statistics([run["milestones"][key] for run in runs], epochs)
        for key, _, _ in grokking.MILESTONES
    }
    lines = [
        f"# {config['name']}: {len(seeds)} seeds ({mode})",
        "",
        "Epoch at which a seed first reaches each milestone: median [25%, 75%] "
        "(seeds that reached it / seeds); a seed that never did counts as later than the "
        f"last epoch ({epochs}).",
        "",
        "| " + " | ".join(title for _, title, _ in grokking.MILESTONES) + " |",
        "|" + "---|" * len(grokking.MILESTONES),
        "| " + " | ".join(table[key] for key, _, _ in grokking.MILESTONES) + " |",
        "",
        f"- seeds {', '.join(map(str, seeds))}; "
        f"split seed {'= seed' if settings.split_seed is None else settings.split_seed}",
        f"- {seconds:.0f} s in all, {seed_steps / seconds:.1f} seed-steps per second",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    common.plot_bands(
        out / "curves.png", {config["name"]: [r["history"] for r in runs]}, grokking.CURVES
    )
    return {
        "name": config["name"],
        "label": config["name"],
        "seeds": seeds,
        "mode": mode,
        "runs": runs,
        "table": table,
        "max_epochs": epochs,
        "seconds": seconds,
        "seed_steps_per_second": seed_steps / seconds,
    }


def _train_jax_vmapped(config, settings, seeds, out) -> list[dict[str, Any]]:
    """All seeds in one compiled epoch (``jax.vmap`` over the seed axis).

    With ``settings.devices > 1`` the seed axis of the params, the optimizer state,
    the data-order keys (and of the data, one split per seed) is split over that many
    devices: each device trains its own seeds, and XLA adds no communication.
    """
    config = grokking.resolved(config, settings)
    devices = settings.devices
    if devices > 1 and len(seeds) % devices:
        raise ValueError(
            f"{len(seeds)} seeds do not split over {devices} devices: give a multiple of "
            f"{devices} seeds, or --seed-mode sequential (data parallel within each seed)"
        )
    task, train = config.get("task", {}), config["train"]
    split_seeds = [s if settings.split_seed is None else settings.split_seed for s in seeds]
    seed_data = len(set(split_seeds)) > 1
    datas = [
        grokking.make_data(task.get("p", 113), task.get("train_fraction", 0.3), split)
        for split in dict.fromkeys(split_seeds)
    ]
    stack = lambda arrays: jnp.stack([jnp.asarray(a) for a in arrays])
    pick = (
        (lambda field: stack([getattr(d, field) for d in datas]))
        if seed_data
        else (lambda field: jnp.asarray(getattr(datas[0], field)))
    )
    train_x, train_y, test_x, test_y = (pick(f) for f in ("train_x", "train_y", "test_x", "test_y"))
    model = grokking.Transformer(grokking.model_config(config))
    per_seed = [grokking.init_params(model, s) for s in seeds]
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_seed)
    tx, train_epoch, evaluate = grokking.jax_program(config, over_seeds=True, seed_data=seed_data)
    opt_state = jax.vmap(tx.init)(params)
    order_keys = jax.vmap(jax.random.key)(
        jnp.asarray([s + grokking.ORDER_KEY_OFFSET for s in seeds])
    )
    if devices > 1:
        split = NamedSharding(parallel.make_mesh(devices), P(parallel.DATA_AXIS))
        params, opt_state, order_keys = jax.device_put((params, opt_state, order_keys), split)
        if seed_data:
            train_x, train_y, test_x, test_y = jax.device_put(
                (train_x, train_y, test_x, test_y), split
            )
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"
    recorders = [
        common.RunRecorder(out / f"seed-{s}", f"{config['name']} (jax, seed {s})") for s in seeds
    ]
    active = [True] * len(seeds)
    stop_at = train.get("early_stop_eval_acc", 0.99) if settings.early_stop else math.inf
    bar = common.progress(train["epochs"], f"{config['name']} x{len(seeds)} seeds", settings.quiet)
    for epoch in range(1, train["epochs"] + 1):
        start = time.perf_counter()
        params, opt_state, train_metrics = train_epoch(
            params, opt_state, train_x, train_y, order_keys, epoch - 1
        )
        eval_metrics = jax.device_get(evaluate(params, test_x, test_y))
        diagnostics = jax.device_get(ars2_jax.diagnostics(opt_state)) if is_ars2 else {}
        train_metrics = jax.device_get(train_metrics)
        seconds = time.perf_counter() - start
        for i, recorder in enumerate(recorders):
            if not active[i]:
                continue
            pick_i = lambda tree, i=i: {k: v[i] for k, v in tree.items()}
            row = grokking.epoch_row(
                epoch,
                pick_i(train_metrics),
                pick_i(eval_metrics),
                pick_i(diagnostics),
                recorder,
                seconds,
            )
            active[i] = row["eval_acc"] < stop_at
        if bar is not None:
            bar.update()
            bar.set_postfix(
                eval_acc=f"{np.median(eval_metrics['acc']):.3f}", done=f"{active.count(False)}"
            )
        if not any(active):
            break
    if bar is not None:
        bar.close()
    runs = []
    for seed, recorder in zip(seeds, recorders):
        milestones = recorder.finish(
            grokking.MILESTONES, f"Optimizer: `{config['optimizer']}`", (), grokking.CURVES
        )
        runs.append({"seed": seed, "history": recorder.history, "milestones": milestones})
    return runs


def compare_seeds(
    configs: list[dict[str, Any]],
    seeds: list[int],
    settings: grokking.RunSettings,
    seed_mode: str = "auto",
) -> tuple[list[dict[str, Any]], str]:
    """Every config over every seed: the milestone table with error bars, and Mann-Whitney
    U tests of epochs-to-90% between each ARS2-Neo config and each baseline."""
    out = pathlib.Path(settings.out_dir or grokking.ROOT / "results" / "grokking" / "compare-seeds")
    results = [
        train_seeds(
            config, seeds, dataclasses.replace(settings, out_dir=out / config["name"]), seed_mode
        )
        for config in configs
    ]
    columns = ["run", *(title for _, title, _ in grokking.MILESTONES), "seed-steps/s"]
    rows = [
        [
            r["name"],
            *(r["table"][k] for k, _, _ in grokking.MILESTONES),
            f"{r['seed_steps_per_second']:.1f}",
        ]
        for r in results
    ]
    header = (
        f"# Grokking over {len(seeds)} seeds ({', '.join(map(str, seeds))})\n\n"
        "Epoch at which each seed first reaches each milestone: median [25%, 75%] "
        "(seeds that reached it / seeds); seeds that never did count as later than the "
        "last epoch."
    )
    text = common.write_comparison(out / "comparison.md", header, columns, rows)
    tests = _milestone_tests(results, configs)
    if tests:
        text += "\n" + tests
        (out / "comparison.md").write_text(text)
    common.plot_bands(
        out / "curves.png",
        {r["name"]: [run["history"] for run in r["runs"]] for r in results},
        grokking.CURVES,
    )
    return results, text


def _milestone_tests(results, configs, milestone: str = "eval_90") -> str:
    kinds = {c["name"]: c["optimizer"]["name"] for c in configs}
    ours = [r for r in results if kinds[r["name"]] == "ars2_neo"]
    baselines = [r for r in results if kinds[r["name"]] != "ars2_neo"]
    lines = []
    for a in ours:
        for b in baselines:
            never = max(a["max_epochs"], b["max_epochs"]) + 1
            x = common.epochs_to([run["milestones"][milestone] for run in a["runs"]], never)
            y = common.epochs_to([run["milestones"][milestone] for run in b["runs"]], never)
            u, p = common.mann_whitney(x, y)
            faster = "earlier" if np.median(x) < np.median(y) else "later"
            lines.append(
                f"- {a['name']} vs {b['name']}, epochs to 90% eval accuracy: medians "
                f"{np.median(x):.0f} vs {np.median(y):.0f} ({a['name']} {faster}); "
                f"Mann-Whitney U = {u:.1f}, two-sided p = {p:.2g} "
                f"(n = {len(x)}, {len(y)}; a seed that never reached 90% counts as epoch {never})."
            )
    return "\n".join(lines) + ("\n" if lines else "")
