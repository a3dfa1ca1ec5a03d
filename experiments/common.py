"""What every experiment shares: TOML configs, optimizers from configs, and reports.

* :func:`load_config` reads ``configs/<task>/<name>.toml``.
* :func:`optax_optimizer` / :func:`torch_optimizer` build the optimizer a config's
  ``[optimizer]`` table names (``adamw``, ``muon`` or ``ars2_neo``).
* :class:`RunRecorder` writes ``metrics.jsonl`` as epochs finish and, at the end,
  ``summary.md`` (a milestone table) and ``curves.png``; :func:`write_comparison`
  writes the table of several runs.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ars2_jax

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float64": jnp.float64}


# --- configs ----------------------------------------------------------------------------


def load_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a TOML config; ``name`` defaults to the file's stem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    with path.open("rb") as f:
        config = tomllib.load(f)
    config.setdefault("name", path.stem)
    for table in ("optimizer", "train"):
        if table not in config:
            raise ValueError(f"{path}: the config has no [{table}] table")
    return config


def config_path(name_or_path: str, config_dir: pathlib.Path) -> pathlib.Path:
    """A ``.toml`` path as given, or the config of that name in ``config_dir``."""
    path = pathlib.Path(name_or_path)
    return path if path.suffix == ".toml" else config_dir / f"{name_or_path}.toml"


def with_overrides(
    config: dict[str, Any], ns_dtype: str | None = None, epochs: int | None = None
) -> dict[str, Any]:
    """A copy of ``config`` (its tables copied too) with the command line's overrides:
    ARS2-Neo's ``ns_dtype`` and the number of epochs, where given."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    if ns_dtype is not None and config["optimizer"]["name"] == "ars2_neo":
        config["optimizer"]["ns_dtype"] = ns_dtype
    if epochs is not None:
        config["train"]["epochs"] = epochs
    return config


def ns_dtype_of(optimizer: dict[str, Any]):
    """The config's ``ns_dtype`` (``"bfloat16"``, ``"float32"``, ``"float64"`` or absent)."""
    name = optimizer.get("ns_dtype")
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"ns_dtype={name!r} must be one of {sorted(DTYPES)}")
    return DTYPES[name]


# --- optimizers -------------------------------------------------------------------------


def optax_optimizer(
    optimizer: dict[str, Any],
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    muon_dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation an ``[optimizer]`` table describes.

    Every result accepts ``grad_fn=`` (the baselines ignore it), so that one train
    step serves all optimizers.

    Args:
      optimizer: the config's ``[optimizer]`` table.
      learning_rate: overrides ``optimizer['learning_rate']`` (e.g. a schedule); the
        AdamW track (ARS2-Neo) and Adam part (Muon) follow it in proportion.
      muon_dimension_numbers: Muon only: the model's tree of
        ``MuonDimensionNumbers`` (``None`` leaves go to Adam).
    """
    name = optimizer["name"]
    base_lr = optimizer["learning_rate"]
    lr = base_lr if learning_rate is None else learning_rate
    b1, b2 = optimizer.get("betas", (0.9, 0.999))
    eps = optimizer.get("eps", 1e-8)
    weight_decay = optimizer.get("weight_decay", 0.0)

    def scaled(other_lr):
        # The second track's learning rate, following a schedule if there is one.
        if other_lr is None or learning_rate is None or not callable(lr):
            return other_lr
        return lambda count: lr(count) * (other_lr / base_lr)

    if name == "adamw":
        return optax.with_extra_args_support(
            optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        )
    if name == "muon":
        adam = optimizer.get("adam", {})
        adam_b1, adam_b2 = adam.get("betas", (0.9, 0.999))
        return optax.with_extra_args_support(
            optax.contrib.muon(
                learning_rate=lr,
                beta=optimizer.get("momentum", 0.95),
                # optax has one eps, for NS's normalization and for Adam: Adam's, which
                # decides more (the reference Muon normalizes with 1e-7).
                eps=adam.get("eps", eps),
                weight_decay=weight_decay,
                nesterov=optimizer.get("nesterov", True),
                adam_learning_rate=scaled(adam.get("learning_rate", base_lr)),
                adam_b1=adam_b1,
                adam_b2=adam_b2,
                adam_weight_decay=adam.get("weight_decay", 0.0),
                muon_weight_dimension_numbers=muon_dimension_numbers,
            )
        )
    if name == "ars2_neo":
        track = optimizer.get("adamw_track", {})
        track_b1, track_b2 = track.get("betas", (b1, b2))
        return ars2_jax.ars2_neo(
            learning_rate=lr,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            ns_steps=optimizer.get("ns_steps", 5),
            ns_dtype=ns_dtype_of(optimizer),
            rho=optimizer.get("rho", 0.0),
            k=optimizer.get("k", 0),
            alpha=optimizer.get("alpha", 0.1),
            adaptive=optimizer.get("adaptive", False),
            adaptive_beta=optimizer.get("adaptive_beta", 0.99),
            adaptive_lambda=optimizer.get("adaptive_lambda", 2.0),
            adaptive_gamma=optimizer.get("adaptive_gamma", 2.0),
            adamw_learning_rate=scaled(track.get("learning_rate", base_lr)),
            adamw_b1=track_b1,
            adamw_b2=track_b2,
            adamw_eps=track.get("eps"),
            adamw_weight_decay=track.get("weight_decay"),
        )
    raise ValueError(f"optimizer name={name!r} must be 'adamw', 'muon' or 'ars2_neo'")


class UnsupportedOnTorch(ValueError):
    """The config's optimizer has no faithful PyTorch counterpart for this model."""


def torch_optimizer(
    optimizer: dict[str, Any],
    model,
    *,
    max_dim: int = ars2_jax.DEFAULT_MAX_DIM,
    muon_names: Collection[str] | None = None,
):
    """The ``torch.optim`` optimizer an ``[optimizer]`` table describes.

    Args:
      optimizer: the config's ``[optimizer]`` table.
      model: the ``torch.nn.Module`` whose parameters it trains.
      max_dim: ARS2-Neo only: tensors with a dimension above it go to the AdamW track.
      muon_names: Muon only: the names (as in ``model.named_parameters()``) of the
        parameters on Muon; the others go to Adam.

    Raises:
      UnsupportedOnTorch: for ``muon`` without ``muon_names``: the model's routing
        between Muon and Adam is the experiment's to give.
    """
    import torch

    from ars2_torch import ARS2Neo, ars2_param_groups

    name = optimizer["name"]
    lr = optimizer["learning_rate"]
    betas = tuple(optimizer.get("betas", (0.9, 0.999)))
    eps = optimizer.get("eps", 1e-8)
    weight_decay = optimizer.get("weight_decay", 0.0)
    if name == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
    if name == "muon":
        if muon_names is None:
            raise UnsupportedOnTorch("muon needs the model's Muon parameters (muon_names)")
        return reference_muon(optimizer, model, muon_names)
    if name == "ars2_neo":
        groups = ars2_param_groups(model, max_dim=max_dim)
        track = optimizer.get("adamw_track", {})
        for group in groups:
            if not group["ars2"]:
                group.update(
                    lr=track.get("learning_rate", lr),
                    betas=tuple(track.get("betas", betas)),
                    eps=track.get("eps", eps),
                    weight_decay=track.get("weight_decay", weight_decay),
                )
        ns_dtype = optimizer.get("ns_dtype")
        return ARS2Neo(
            groups,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            ns_steps=optimizer.get("ns_steps", 5),
            ns_dtype=None if ns_dtype is None else getattr(torch, ns_dtype),
            rho=optimizer.get("rho", 0.0),
            k=optimizer.get("k", 0),
            alpha=optimizer.get("alpha", 0.1),
            adaptive=optimizer.get("adaptive", False),
            adaptive_beta=optimizer.get("adaptive_beta", 0.99),
            adaptive_lambda=optimizer.get("adaptive_lambda", 2.0),
            adaptive_gamma=optimizer.get("adaptive_gamma", 2.0),
        )
    raise ValueError(f"optimizer name={name!r} must be 'adamw', 'muon' or 'ars2_neo'")


def reference_muon(optimizer: dict[str, Any], model, muon_names: Collection[str]):
    """The reference Muon (KellerJordan/Muon, ``muon-optimizer==0.1.0``) with the config's values.

    ``SingleDeviceMuonWithAuxAdam`` takes its values per group and none as keyword
    arguments, so they are written into the two groups here (the seed's script left
    them out, which is why its run used the groups' defaults: SPEC §7). Its Muon is
    always Nesterov; its ``step()`` takes no closure.
    """
    try:
        from muon import SingleDeviceMuonWithAuxAdam
    except ImportError as error:
        raise ImportError(
            "the PyTorch Muon baseline is the reference Muon: pip install "
            "'muon-optimizer==0.1.0' (or the project's experiments extra; PyPI's 'muon' "
            "is an unrelated package)"
        ) from error
    if not optimizer.get("nesterov", True):
        raise ValueError("nesterov=False: the reference Muon is always Nesterov")
    named = dict(model.named_parameters())
    unknown = set(muon_names) - set(named)
    if unknown:
        raise ValueError(f"muon_names={sorted(unknown)} are not parameters of the model")
    adam = optimizer.get("adam", {})
    return SingleDeviceMuonWithAuxAdam(
        [
            {
                "params": [p for n, p in named.items() if n in muon_names],
                "use_muon": True,
                "lr": optimizer["learning_rate"],
                "momentum": optimizer.get("momentum", 0.95),
                "weight_decay": optimizer.get("weight_decay", 0.0),
            },
            {
                "params": [p for n, p in named.items() if n not in muon_names],
                "use_muon": False,
                "lr": adam.get("learning_rate", optimizer["learning_rate"]),
                "betas": tuple(adam.get("betas", (0.9, 0.999))),
                "eps": adam.get("eps", optimizer.get("eps", 1e-8)),
                "weight_decay": adam.get("weight_decay", 0.0),
            },
        ]
    )


# --- data sets --------------------------------------------------------------------------


class DataUnavailable(RuntimeError):
    """A data set that is neither on disk nor reachable; the message says what to do.

    The experiments' command lines print it and exit with status 2, without a traceback.
    """


def load_hub_dataset(
    path: str,
    name: str | None = None,
    *,
    data_files: Any = None,
    cache_dir: str | pathlib.Path | None = None,
    hint: str,
):
    """``datasets.load_dataset(path, name, ...)``, with one clear error when it cannot be had.

    Offline (no network, or ``HF_HUB_OFFLINE=1``) with nothing cached, ``datasets``
    raises ``ConnectionError`` after its retries; a missing local file raises
    ``FileNotFoundError``. Both become :class:`DataUnavailable`, naming the data set,
    where it was looked for, and ``hint``: how to give local files instead.
    """
    import datasets

    try:
        return datasets.load_dataset(
            path,
            name,
            data_files=data_files,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except (ConnectionError, FileNotFoundError) as error:
        if data_files is not None:
            where = f"the files {data_files!r}"
        else:
            cache = cache_dir or datasets.config.HF_DATASETS_CACHE
            where = f"the Hugging Face hub and the cache {cache} (HF_HOME / HF_DATASETS_CACHE)"
        label = path if name is None else f"{path} ({name})"
        raise DataUnavailable(
            f"the data set {label} could not be loaded: looked in {where} "
            f"({type(error).__name__}: {error}). {hint}"
        ) from error


# --- resources --------------------------------------------------------------------------


def newton_schulz_loop_flops(
    params: Any, ns_steps: int, max_dim: int = ars2_jax.DEFAULT_MAX_DIM
) -> float:
    """FLOPs of ``ns_steps - 1`` Newton-Schulz iterations on ARS2-Neo's default ARS2 track.

    XLA's cost analysis counts the body of a loop once, and ``ars2_jax.newton_schulz``
    iterates in a ``fori_loop``: add this to the count of a step that runs ``ars2_neo``
    with the default labels and matrix views. An iteration on an ``r×c`` matrix
    (``r <= c``) is ``X Xᵀ`` (``2r²c``), ``A A`` (``2r³``) and ``B X`` (``2r²c``).

    Args:
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      ns_steps: the optimizer's Newton-Schulz iterations.
      max_dim: the default labels' limit (SPEC §1).
    """
    total = 0.0
    labels = jax.tree.leaves(ars2_jax.default_param_labels(params, max_dim))
    for label, leaf in zip(labels, jax.tree.leaves(params)):
        if label != "ars2":
            continue
        dims = ars2_jax.default_dimension_numbers(len(leaf.shape))
        axes = lambda a: (a,) if isinstance(a, int) else a
        rows = math.prod(leaf.shape[a] for a in axes(dims.reduction_axis))
        cols = math.prod(leaf.shape[a] for a in axes(dims.output_axis))
        batch = math.prod(leaf.shape) // (rows * cols)
        small, large = sorted((rows, cols))
        total += batch * (4 * small * small * large + 2 * small**3)
    return total * (ns_steps - 1)


# --- reports ----------------------------------------------------------------------------


# (key in the milestone table, column title, predicate on one epoch's metrics)
Milestone = tuple[str, str, Callable[[dict[str, Any]], bool]]


def milestones_reached(
    history: Sequence[dict[str, Any]], milestones: Sequence[Milestone]
) -> dict[str, tuple[int, float] | None]:
    """For each milestone, ``(epoch, wall_seconds)`` of the first epoch meeting it, or ``None``."""
    reached: dict[str, tuple[int, float] | None] = {key: None for key, _, _ in milestones}
    for row in history:
        for key, _, predicate in milestones:
            if reached[key] is None and predicate(row):
                reached[key] = (row["epoch"], row["wall_seconds"])
    return reached


def format_milestone(value: tuple[int, float] | None) -> str:
    return "–" if value is None else f"{value[0]} ({value[1]:.0f} s)"


class RunRecorder:
    """Writes one run's ``metrics.jsonl`` as it goes, then ``summary.md`` and ``curves.png``."""

    def __init__(self, out_dir: str | pathlib.Path | None, label: str):
        self.out_dir = None if out_dir is None else pathlib.Path(out_dir)
        self.label = label
        self.history: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "metrics.jsonl").write_text("")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def restore_history(self, rows: list[dict[str, Any]]) -> None:
        """Continues a resumed run: its earlier epochs, and its clock where it stopped."""
        self.history = []
        if self.out_dir is not None:
            (self.out_dir / "metrics.jsonl").write_text("")
        for row in rows:
            self.record(row)
        if rows:
            self.start = time.perf_counter() - rows[-1]["wall_seconds"]

    def record(self, row: dict[str, Any]) -> None:
        row = {key: _plain(value) for key, value in row.items()}
        self.history.append(row)
        if self.out_dir is not None:
            with (self.out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def finish(
        self,
        milestones: Sequence[Milestone],
        header: str,
        extra: Sequence[str] = (),
        curves: Sequence[tuple[str, str]] = (),
    ) -> dict[str, tuple[int, float] | None]:
        reached = milestones_reached(self.history, milestones)
        if self.out_dir is not None:
            lines = [f"# {self.label}", "", header, ""]
            lines.append("| " + " | ".join(title for _, title, _ in milestones) + " |")
            lines.append("|" + "---|" * len(milestones))
            lines.append(
                "| " + " | ".join(format_milestone(reached[k]) for k, _, _ in milestones) + " |"
            )
            lines += ["", *extra]
            (self.out_dir / "summary.md").write_text("\n".join(lines) + "\n")
            if curves:
                plot_curves(self.out_dir / "curves.png", {self.label: self.history}, curves)
        return reached


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (NumPy and JAX scalars become Python numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _plot_panels(path, curves, log_x, draw) -> None:
    """One panel per ``(metric key, title)`` against epoch; ``draw(ax, key)`` fills one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], curves):
        draw(ax, key)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(
    path: str | pathlib.Path,
    runs: dict[str, Sequence[dict[str, Any]]],
    curves: Sequence[tuple[str, str]],
    *,
    log_x: bool = True,
) -> None:
    """One panel per ``(metric key, title)``, one line per run, against epoch."""

    def draw(ax, key):
        for label, history in runs.items():
            epochs = [row["epoch"] for row in history if key in row]
            values = [row[key] for row in history if key in row]
            ax.plot(epochs, values, label=label)

    _plot_panels(path, curves, log_x, draw)


def write_comparison(
    path: str | pathlib.Path, header: str, columns: Sequence[str], rows: Sequence[Sequence[str]]
) -> str:
    """Writes (and returns) a Markdown table."""
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    pathlib.Path(path).write_text(text)
    return text


def progress(total: int, description: str, quiet: bool):
    """A tqdm bar (``None`` in quiet mode)."""
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, dynamic_ncols=True, leave=True)


# --- many seeds -------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """``"0-7"``, ``"0,3,5"`` or ``"0-3,8"`` → a list of seeds, in order, without repeats."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, dash, last = part.partition("-")
            seeds.extend(range(int(first), int(last) + 1) if dash else [int(part)])
    except ValueError:
        raise ValueError(
            f"--seeds {text!r}: use a list or ranges of seeds, e.g. 0-7 or 0,3,5"
        ) from None
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    return list(dict.fromkeys(seeds))


def epochs_to(reached: Sequence[tuple[int, float] | None], never: int) -> list[int]:
    """Epochs at which each seed reached a milestone; ``never`` for the seeds that did not."""
    return [never if value is None else value[0] for value in reached]


def seed_statistics(reached: Sequence[tuple[int, float] | None], max_epochs: int) -> str:
    """``median [q25, q75] (n/S)`` of the epochs at which the seeds reached a milestone.

    A seed that never reached it counts as later than the run's end, so a quartile
    that lands on such a seed reads ``>E``.
    """
    epochs = np.asarray(epochs_to(reached, max_epochs + 1), dtype=float)
    count = sum(value is not None for value in reached)

    def show(q):
        value = float(np.percentile(epochs, q, method="linear"))
        return f">{max_epochs}" if value > max_epochs else f"{value:.0f}"

    return f"{show(50)} [{show(25)}, {show(75)}] ({count}/{len(reached)})"


def mann_whitney(a: Sequence[int], b: Sequence[int]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U of two samples of epochs: ``(U of a, p-value)``."""
    from scipy.stats import mannwhitneyu

    result = mannwhitneyu(a, b, alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def plot_bands(
    path: str | pathlib.Path,
    runs: dict[str, Sequence[Sequence[dict[str, Any]]]],
    curves: Sequence[tuple[str, str]],
    *,
    log_x: bool = True,
) -> None:
    """Median line and interquartile band over seeds, one colour per run, against epoch.

    A seed whose history ended early (it met the early-stop level) keeps its last
    value for the later epochs.
    """

    def draw(ax, key):
        for label, histories in runs.items():
            length = max(len(h) for h in histories)
            values = np.array(
                [[row[key] for row in h] + [h[-1][key]] * (length - len(h)) for h in histories]
            )
            epochs = np.arange(1, length + 1)
            q25, median, q75 = np.percentile(values, [25, 50, 75], axis=0)
            (line,) = ax.plot(epochs, median, label=f"{label} (median of {len(histories)})")
            ax.fill_between(epochs, q25, q75, color=line.get_color(), alpha=0.2)

    _plot_panels(path, curves, log_x, draw)
