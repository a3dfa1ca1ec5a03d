"""Modular-addition grokking (SPEC §7): ARS2-Neo against AdamW and Muon, in JAX and PyTorch.

    python -m experiments.grokking                       # AdamW, ARS2-Neo base and A-GSAM, JAX
    python -m experiments.grokking --config configs/grokking/ars2_neo_agsam.toml --seed 1
    python -m experiments.grokking --compare configs/grokking/ars2_neo_base.toml \\
        --framework jax,torch --ns-dtype float32 --timing

The task: ``(a + b) mod p`` for all pairs, 30% of them for training (7 batches of
512 and one of 246 per epoch, reshuffled every epoch), the rest for evaluation.
The JAX path trains a whole epoch in one compiled call (``lax.scan`` over the
batches, the last one padded and masked, the shuffle inside); the PyTorch path
runs the same epochs (same split, same order, same initial weights) through
``ars2_torch`` or ``torch.optim.AdamW``, so the two differ only in the optimizer's
implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python experiments/grokking.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ars2_jax
from experiments import common
from models.grokking import GrokkingConfig, Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "grokking"
DEFAULT_COMPARE = ("adamw", "ars2_neo_base", "ars2_neo_agsam")
DIAGNOSTICS = ("phi", "phi_std", "threshold", "alpha_t", "sync_count", "effective_k")
MILESTONES: list[common.Milestone] = [
    ("train_loss", "train loss < 0.5", lambda r: r["train_loss"] < 0.5),
    ("train_acc", "train acc > 99%", lambda r: r["train_acc"] > 0.99),
    ("eval_50", "eval acc > 50%", lambda r: r["eval_acc"] > 0.5),
    ("eval_90", "eval acc > 90%", lambda r: r["eval_acc"] > 0.9),
    ("eval_95", "eval acc > 95%", lambda r: r["eval_acc"] > 0.95),
    ("eval_99", "eval acc > 99%", lambda r: r["eval_acc"] > 0.99),
]
CURVES = (("train_acc", "train accuracy"), ("eval_acc", "eval accuracy"))


# --- data -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    """Token ids ``[a, b, =]`` and labels ``(a + b) mod p``, split into train and test."""

    train_x: np.ndarray  # (n_train, 3) int32
    train_y: np.ndarray  # (n_train,) int32
    test_x: np.ndarray
    test_y: np.ndarray


def make_data(p: int, train_fraction: float, split_seed: int) -> Data:
    """All ``p²`` pairs, split by a seeded permutation (the same for both frameworks)."""
    a, b = np.divmod(np.arange(p * p), p)
    tokens = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
    labels = ((a + b) % p).astype(np.int32)
    order = np.random.default_rng(split_seed).permutation(p * p)
    n_train = int(train_fraction * p * p)
    train, test = order[:n_train], order[n_train:]
    return Data(tokens[train], labels[train], tokens[test], labels[test])


def epoch_order(order_key: jax.Array, epoch, n_train: int, batch_size: int):
    """The shuffled example indices of one epoch as ``(batches, batch_size)``, with a mask.

    Every epoch is a fresh permutation; the last batch is the remainder (246 of
    512 for the default task), padded with index 0 and masked out.
    """
    n_batches = math.ceil(n_train / batch_size)
    order = jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train)
    padding = n_batches * batch_size - n_train
    indices = jnp.concatenate([order, jnp.zeros(padding, order.dtype)])
    mask = (jnp.arange(n_batches * batch_size) < n_train).astype(jnp.float32)
    return indices.reshape(n_batches, batch_size), mask.reshape(n_batches, batch_size)


# --- the JAX path -----------------------------------------------------------------------


def model_config(config: dict[str, Any]) -> GrokkingConfig:
    return GrokkingConfig(p=config.get("task", {}).get("p", 113), **config.get("model", {}))


def muon_dimension_numbers(params) -> dict[str, Any]:
    """The seed's Muon routing for this model.

    Attention and MLP matrices go to Muon, the per-head ``(heads, d_head, d_model)``
    Q/K/V one matrix per head; the embeddings, the unembedding and the biases
    (``None``) go to Adam. Rows are the input (reduction) axes, as optax expects.
    """
    per_head = optax.contrib.MuonDimensionNumbers(reduction_axis=2, output_axis=1)
    out_in = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=0)
    muon = {"W_Q": per_head, "W_K": per_head, "W_V": per_head}
    muon.update(W_O=out_in, W_in=out_in, W_out=out_in)
    return {name: muon.get(name) for name in params}


def init_params(model: Transformer, seed: int):
    dummy = jnp.zeros((1, model.config.n_ctx), jnp.int32)
    return model.init(jax.random.key(seed), dummy)["params"]


def batch_loss(model: Transformer, params, x, y, mask):
    """Mean cross-entropy of the last position over the unmasked examples, and the correct count."""
    logits = model.apply({"params": params}, x)[:, -1]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    count = jnp.sum(mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
    return jnp.sum(losses * mask) / count, (correct, count)


def make_train_epoch(model: Transformer, tx, batch_size: int):
    """``(params, opt_state, train_x, train_y, order_key, epoch) -> (params, opt_state, sums)``."""

    def train_epoch(params, opt_state, train_x, train_y, order_key, epoch):
        indices, masks = epoch_order(order_key, epoch, train_x.shape[0], batch_size)

        def step(carry, batch):
            params, opt_state = carry
            index, mask = batch
            x, y = train_x[index], train_y[index]
            loss_fn = functools.partial(batch_loss, model, x=x, y=y, mask=mask)
            (loss, (correct, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            grad_fn = jax.grad(lambda p: loss_fn(p)[0])
            updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), (loss * count, correct, count)

        (params, opt_state), (loss_sums, corrects, counts) = jax.lax.scan(
            step, (params, opt_state), (indices, masks)
        )
        n = jnp.sum(counts)
        return params, opt_state, {"loss": jnp.sum(loss_sums) / n, "acc": jnp.sum(corrects) / n}

    return jax.jit(train_epoch, donate_argnums=(0, 1))


def make_evaluate(model: Transformer):
    def evaluate(params, x, y):
        loss, (correct, count) = batch_loss(model, params, x, y, jnp.ones(y.shape, jnp.float32))
        return {"loss": loss, "acc": correct / count}

    return jax.jit(evaluate)


def make_forward_backward_epoch(model: Transformer, batch_size: int):
    """The epoch's bare forward-backward passes (no optimizer): the compute floor."""

    def forward_backward(params, train_x, train_y, order_key, epoch):
        indices, masks = epoch_order(order_key, epoch, train_x.shape[0], batch_size)

        def step(total, batch):
            index, mask = batch
            loss_fn = functools.partial(
                batch_loss, model, x=train_x[index], y=train_y[index], mask=mask
            )
            grads = jax.grad(lambda p: loss_fn(p)[0])(params)
            return total + optax.tree.norm(grads), None

        return jax.lax.scan(step, jnp.zeros([]), (indices, masks))[0]

    return jax.jit(forward_backward)


def _median_seconds(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- one run ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunSettings:
    """What a command line may override in a config."""

    framework: str = "jax"
    seed: int = 0
    split_seed: int | None = None  # None: the seed
    epochs: int | None = None
    ns_dtype: str | None = None
    early_stop: bool = True
    out_dir: str | pathlib.Path | None = None
    quiet: bool = False
    timing: bool = False


def _resolved(config: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    config = {**config, "optimizer": dict(config["optimizer"]), "train": dict(config["train"])}
    if settings.ns_dtype is not None and config["optimizer"]["name"] == "ars2_neo":
        config["optimizer"]["ns_dtype"] = settings.ns_dtype
    if settings.epochs is not None:
        config["train"]["epochs"] = settings.epochs
    return config


def train_and_evaluate(
    config: dict[str, Any], settings: RunSettings | None = None
) -> dict[str, Any]:
    """Trains one config in one framework; returns the history, milestones and timings.

    Writes ``metrics.jsonl``, ``summary.md`` and ``curves.png`` under
    ``settings.out_dir`` when it is set.
    """
    settings = settings or RunSettings()
    config = _resolved(config, settings)
    if settings.framework not in ("jax", "torch"):
        raise ValueError(f"framework={settings.framework!r} must be 'jax' or 'torch'")
    task = config.get("task", {})
    split_seed = settings.seed if settings.split_seed is None else settings.split_seed
    data = make_data(task.get("p", 113), task.get("train_fraction", 0.3), split_seed)
    model = Transformer(model_config(config))
    params = init_params(model, settings.seed)
    label = f"{config['name']} ({settings.framework})"
    recorder = common.RunRecorder(settings.out_dir, label)
    run = _train_jax if settings.framework == "jax" else _train_torch
    timings = run(config, settings, data, model, params, recorder)
    epoch_seconds = [row["epoch_seconds"] for row in recorder.history[1:]] or [
        recorder.history[0]["epoch_seconds"]
    ]
    timings["epoch_seconds"] = statistics.median(epoch_seconds)
    extra = [
        f"- seed {settings.seed}, split seed {split_seed}, {len(recorder.history)} epochs",
        f"- best eval accuracy {max(r['eval_acc'] for r in recorder.history):.4f}",
        f"- median epoch (train + eval) {timings['epoch_seconds']:.3f} s",
    ]
    if "floor_seconds" in timings:
        extra.append(
            f"- compute floor (bare forward-backward passes + one evaluation) "
            f"{timings['floor_seconds']:.3f} s: epoch / floor = "
            f"{timings['epoch_seconds'] / timings['floor_seconds']:.2f}"
        )
    milestones = recorder.finish(
        MILESTONES,
        f"Optimizer: `{config['optimizer']}`",
        extra,
        CURVES,
    )
    return {
        "name": config["name"],
        "framework": settings.framework,
        "label": label,
        "history": recorder.history,
        "milestones": milestones,
        **timings,
    }


def _epoch_row(epoch, train_metrics, eval_metrics, diagnostics, recorder, epoch_seconds):
    row = {
        "epoch": epoch,
        "train_loss": float(train_metrics["loss"]),
        "train_acc": float(train_metrics["acc"]),
        "eval_loss": float(eval_metrics["loss"]),
        "eval_acc": float(eval_metrics["acc"]),
        **{k: float(v) for k, v in diagnostics.items() if k in DIAGNOSTICS},
        "epoch_seconds": epoch_seconds,
        "wall_seconds": recorder.elapsed(),
    }
    recorder.record(row)
    return row


def _loop(config, settings, recorder, run_epoch) -> None:
    """Runs epochs until the last or until eval accuracy reaches the early-stop level."""
    train = config["train"]
    epochs = train["epochs"]
    stop_at = train.get("early_stop_eval_acc", 0.99) if settings.early_stop else math.inf
    bar = common.progress(epochs, recorder.label, settings.quiet)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        train_metrics, eval_metrics, diagnostics = run_epoch(epoch)
        row = _epoch_row(
            epoch, train_metrics, eval_metrics, diagnostics, recorder, time.perf_counter() - start
        )
        if bar is not None:
            bar.update()
            postfix = dict(
                loss=f"{row['train_loss']:.3f}/{row['eval_loss']:.3f}",
                acc=f"{row['train_acc']:.3f}/{row['eval_acc']:.3f}",
            )
            if "effective_k" in row:
                postfix["k_eff"] = f"{row['effective_k']:.2f}"
            bar.set_postfix(postfix)
        if row["eval_acc"] >= stop_at:
            break
    if bar is not None:
        bar.close()


def _train_jax(config, settings, data, model, params, recorder) -> dict[str, float]:
    batch_size = config["train"].get("batch_size", 512)
    tx = common.optax_optimizer(
        config["optimizer"], muon_dimension_numbers=muon_dimension_numbers(params)
    )
    opt_state = tx.init(params)
    train_epoch = make_train_epoch(model, tx, batch_size)
    evaluate = make_evaluate(model)
    train_x, train_y = jnp.asarray(data.train_x), jnp.asarray(data.train_y)
    test_x, test_y = jnp.asarray(data.test_x), jnp.asarray(data.test_y)
    order_key = jax.random.key(settings.seed + 1_000_003)
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"
    state = {"params": params, "opt_state": opt_state}

    def run_epoch(epoch):
        state["params"], state["opt_state"], train_metrics = train_epoch(
            state["params"], state["opt_state"], train_x, train_y, order_key, epoch - 1
        )
        eval_metrics = jax.device_get(evaluate(state["params"], test_x, test_y))
        diagnostics = ars2_jax.diagnostics(state["opt_state"]) if is_ars2 else {}
        return jax.device_get(train_metrics), eval_metrics, jax.device_get(diagnostics)

    _loop(config, settings, recorder, run_epoch)
    if not settings.timing:
        return {}
    forward_backward = make_forward_backward_epoch(model, batch_size)
    floor = _median_seconds(
        lambda: forward_backward(state["params"], train_x, train_y, order_key, 0)
    ) + _median_seconds(lambda: evaluate(state["params"], test_x, test_y))
    return {"floor_seconds": floor}


def _train_torch(config, settings, data, model, params, recorder) -> dict[str, float]:
    import torch

    from models.grokking_torch import from_flax_params

    batch_size = config["train"].get("batch_size", 512)
    net = from_flax_params(model.config, params)
    optimizer = common.torch_optimizer(config["optimizer"], net)
    train_x, train_y = torch.from_numpy(data.train_x).long(), torch.from_numpy(data.train_y).long()
    test_x, test_y = torch.from_numpy(data.test_x).long(), torch.from_numpy(data.test_y).long()
    order_key = jax.random.key(settings.seed + 1_000_003)
    n_train = len(data.train_y)
    orders = jax.jit(functools.partial(epoch_order, n_train=n_train, batch_size=batch_size))
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"

    def run_epoch(epoch):
        indices, masks = jax.device_get(orders(order_key, epoch - 1))
        loss_sum = correct = count = 0.0
        for index, mask in zip(indices, masks):
            index = torch.from_numpy(index[mask > 0].astype(np.int64))
            x, y = train_x[index], train_y[index]
            first_pass = []

            def closure(x=x, y=y, first_pass=first_pass):
                logits = net(x)[:, -1]
                loss = torch.nn.functional.cross_entropy(logits, y)
                loss.backward()
                if not first_pass:
                    first_pass.append((loss.item(), (logits.argmax(-1) == y).sum().item()))
                return loss

            optimizer.zero_grad()
            optimizer.step(closure)
            loss_sum += first_pass[0][0] * len(y)
            correct += first_pass[0][1]
            count += len(y)
        with torch.no_grad():
            logits = net(test_x)[:, -1]
            eval_metrics = {
                "loss": torch.nn.functional.cross_entropy(logits, test_y).item(),
                "acc": (logits.argmax(-1) == test_y).float().mean().item(),
            }
        diagnostics = optimizer.diagnostics if is_ars2 else {}
        return {"loss": loss_sum / count, "acc": correct / count}, eval_metrics, diagnostics

    _loop(config, settings, recorder, run_epoch)
    return {}


# --- several runs -----------------------------------------------------------------------


def compare(
    configs: list[dict[str, Any]],
    frameworks: list[str],
    settings: RunSettings,
) -> tuple[list[dict[str, Any]], str]:
    """Runs every config in every framework; writes ``comparison.md`` and ``curves.png``."""
    out = pathlib.Path(settings.out_dir or ROOT / "results" / "grokking" / "compare")
    out.mkdir(parents=True, exist_ok=True)
    results, rows = [], []
    for config in configs:
        for framework in frameworks:
            run_settings = dataclasses.replace(
                settings, framework=framework, out_dir=out / f"{config['name']}-{framework}"
            )
            try:
                result = train_and_evaluate(config, run_settings)
            except common.UnsupportedOnTorch as why:
                rows.append([config["name"], framework, *["n/a"] * (len(MILESTONES) + 2), str(why)])
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
                    *(common.format_milestone(result["milestones"][k]) for k, _, _ in MILESTONES),
                    f"{best:.3f}",
                    timing,
                    note,
                ]
            )
    _add_speed_ratios(results, rows)
    columns = [
        "run",
        "framework",
        *(title for _, title, _ in MILESTONES),
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
        common.plot_curves(out / "curves.png", {r["label"]: r["history"] for r in results}, CURVES)
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


# --- command line -----------------------------------------------------------------------


def _config_path(name_or_path: str) -> pathlib.Path:
    path = pathlib.Path(name_or_path)
    if path.suffix == ".toml":
        return path
    return CONFIG_DIR / f"{name_or_path}.toml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="one run: a config file or a name in configs/grokking")
    parser.add_argument(
        "--compare",
        nargs="*",
        metavar="CONFIG",
        help=f"several runs into one table (default: {', '.join(DEFAULT_COMPARE)})",
    )
    parser.add_argument("--framework", default="jax", help="jax, torch, or jax,torch")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    parser.add_argument("--split-seed", type=int, help="train/test split (default: --seed)")
    parser.add_argument("--ns-dtype", choices=sorted(common.DTYPES), help="ARS2-Neo's NS dtype")
    parser.add_argument("--no-early-stop", action="store_true", help="run every epoch")
    parser.add_argument("--out", help="output directory (default: results/grokking/...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--timing", action="store_true", help="also time the compute floor (JAX runs)"
    )
    args = parser.parse_args(argv)

    frameworks = args.framework.split(",")
    settings = RunSettings(
        seed=args.seed,
        split_seed=args.split_seed,
        epochs=args.epochs,
        ns_dtype=args.ns_dtype,
        early_stop=not args.no_early_stop,
        out_dir=args.out,
        quiet=args.quiet,
        timing=args.timing,
    )
    if args.config and args.compare is None and len(frameworks) == 1:
        config = common.load_config(_config_path(args.config))
        out = args.out or ROOT / "results" / "grokking" / f"{config['name']}-{frameworks[0]}"
        result = train_and_evaluate(
            config, dataclasses.replace(settings, framework=frameworks[0], out_dir=out)
        )
        print(pathlib.Path(out, "summary.md").read_text())
        del result
        return
    names = args.compare or ([args.config] if args.config else list(DEFAULT_COMPARE))
    configs = [common.load_config(_config_path(name)) for name in names]
    _, text = compare(configs, frameworks, settings)
    print(text)


if __name__ == "__main__":
    main()
