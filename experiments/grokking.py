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
import json
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ars2_jax
from experiments import common, distributed, parallel
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
# The data order of seed s comes from jax.random.key(s + ORDER_KEY_OFFSET), apart
# from the key that initializes the weights.
ORDER_KEY_OFFSET = 1_000_003


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


def epoch_order(
    order_key: jax.Array, epoch, n_train: int, batch_size: int, padded_size: int | None = None
):
    """The shuffled example indices of one epoch as ``(batches, padded_size)``, with a mask.

    Every epoch is a fresh permutation; the last batch is the remainder (246 of
    512 for the default task), padded with index 0 and masked out. Every batch is
    padded the same way to ``padded_size`` columns (a multiple of the device
    count, for a batch split over devices), which leaves the masked loss as it is.
    """
    n_batches = math.ceil(n_train / batch_size)
    order = jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train)
    padding = n_batches * batch_size - n_train
    indices = jnp.concatenate([order, jnp.zeros(padding, order.dtype)])
    mask = (jnp.arange(n_batches * batch_size) < n_train).astype(jnp.float32)
    indices, mask = indices.reshape(n_batches, -1), mask.reshape(n_batches, -1)
    extra = (padded_size or batch_size) - batch_size
    return jnp.pad(indices, ((0, 0), (0, extra))), jnp.pad(mask, ((0, 0), (0, extra)))


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


def make_train_epoch(
    model: Transformer,
    tx,
    batch_size: int,
    *,
    over_seeds: bool = False,
    seed_data: bool = False,
    mesh: jax.sharding.Mesh | None = None,
):
    """``(params, opt_state, train_x, train_y, order_key, epoch) -> (params, opt_state, means)``.

    With ``over_seeds``, every argument but ``epoch`` has a leading seed axis
    (``train_x``/``train_y`` only with ``seed_data``: one split per seed) and the
    epoch runs under :func:`jax.vmap`. With a ``mesh``, every batch is split over
    its devices (padded and masked to a multiple of their count) while the
    params, the optimizer state and the data stay replicated: the gradients are
    global means, so the run equals one device's (SPEC §5.1).
    """
    padded_size, shard = batch_size, lambda x: x
    if mesh is not None:
        padded_size = math.ceil(batch_size / mesh.size) * mesh.size
        batch_sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
        shard = lambda x: jax.lax.with_sharding_constraint(x, batch_sharding)

    def train_epoch(params, opt_state, train_x, train_y, order_key, epoch):
        indices, masks = epoch_order(order_key, epoch, train_x.shape[0], batch_size, padded_size)

        def step(carry, batch):
            params, opt_state = carry
            index, mask = batch
            x, y, mask = shard(train_x[index]), shard(train_y[index]), shard(mask)
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

    if over_seeds:
        data_axis = 0 if seed_data else None
        train_epoch = jax.vmap(train_epoch, in_axes=(0, 0, data_axis, data_axis, 0, None))
    if mesh is None:
        return jax.jit(train_epoch, donate_argnums=(0, 1))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_epoch,
        in_shardings=(replicated,) * 5 + (None,),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )


def make_evaluate(
    model: Transformer,
    *,
    over_seeds: bool = False,
    seed_data: bool = False,
    mesh: jax.sharding.Mesh | None = None,
):
    """``(params, x, y) -> {loss, acc}`` over the examples whose label is not ``-1``
    (the padding of a test set split over devices)."""

    def evaluate(params, x, y):
        mask = (y >= 0).astype(jnp.float32)
        if mesh is not None:
            sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
            x, y, mask = (jax.lax.with_sharding_constraint(a, sharding) for a in (x, y, mask))
        loss, (correct, count) = batch_loss(model, params, x, y, mask)
        return {"loss": loss, "acc": correct / count}

    if over_seeds:
        data_axis = 0 if seed_data else None
        evaluate = jax.vmap(evaluate, in_axes=(0, data_axis, data_axis))
    return jax.jit(evaluate)


def pad_for_devices(x: np.ndarray, y: np.ndarray, devices: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads an evaluation set to a multiple of ``devices`` examples, labelled ``-1`` (masked)."""
    extra = -len(y) % devices
    return (
        np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]),
        np.concatenate([y, np.full(extra, -1, y.dtype)]),
    )


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
    ckpt_every: int = 0  # epochs between checkpoints (0: none), under out_dir/checkpoints
    keep: int | None = 3  # checkpoints kept (None: all)
    resume: str | pathlib.Path | None = None  # a run directory to continue
    devices: int = 1  # JAX: split every batch over this many local devices


def resolved(config: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    return common.with_overrides(config, settings.ns_dtype, settings.epochs)


def train_and_evaluate(
    config: dict[str, Any], settings: RunSettings | None = None
) -> dict[str, Any]:
    """Trains one config in one framework; returns the history, milestones and timings.

    Writes ``metrics.jsonl``, ``summary.md`` and ``curves.png`` under
    ``settings.out_dir`` when it is set (process 0 only, when several processes
    train together: see ``experiments/distributed.py``).
    """
    settings = settings or RunSettings()
    config = resolved(config, settings)
    if settings.framework not in ("jax", "torch"):
        raise ValueError(f"framework={settings.framework!r} must be 'jax' or 'torch'")
    previous = []
    if settings.resume is not None:
        previous = read_history(pathlib.Path(settings.resume) / "metrics.jsonl")
        if settings.out_dir is None:
            settings = dataclasses.replace(settings, out_dir=settings.resume)
    if settings.devices > 1 and settings.framework != "jax":
        raise ValueError("devices > 1 is for the JAX path (torch: use DDP, see docs/scaling.md)")
    if jax.process_count() > 1 and settings.devices != jax.device_count():
        raise ValueError(
            f"devices={settings.devices} must be all {jax.device_count()} devices of the "
            f"{jax.process_count()} processes"
        )
    if settings.ckpt_every and settings.out_dir is None:
        raise ValueError("ckpt_every needs an output directory (--out) to hold the checkpoints")
    task = config.get("task", {})
    split_seed = settings.seed if settings.split_seed is None else settings.split_seed
    data = make_data(task.get("p", 113), task.get("train_fraction", 0.3), split_seed)
    model = Transformer(model_config(config))
    params = init_params(model, settings.seed)
    label = f"{config['name']} ({settings.framework})"
    # Several processes (experiments/distributed.py) train one model: process 0 writes.
    recorder = common.RunRecorder(
        settings.out_dir if distributed.is_main_process() else None, label
    )
    if settings.framework == "jax":
        run = _train_jax
    else:
        from experiments import grokking_torch

        run = grokking_torch.train
    timings = run(config, settings, data, model, params, recorder, previous)
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


def epoch_row(epoch, train_metrics, eval_metrics, diagnostics, recorder, epoch_seconds):
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


def read_history(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_dir(settings: RunSettings, *, resuming: bool = False) -> pathlib.Path:
    return pathlib.Path(settings.resume if resuming else settings.out_dir) / "checkpoints"


def run_epochs(config, settings, recorder, run_epoch, start_epoch=1, on_epoch_end=None) -> None:
    """Runs epochs until the last or until eval accuracy reaches the early-stop level."""
    train = config["train"]
    epochs = train["epochs"]
    stop_at = train.get("early_stop_eval_acc", 0.99) if settings.early_stop else math.inf
    if recorder.history and recorder.history[-1]["eval_acc"] >= stop_at:
        return
    bar = common.progress(epochs, recorder.label, settings.quiet)
    if bar is not None:
        bar.update(start_epoch - 1)
    for epoch in range(start_epoch, epochs + 1):
        start = time.perf_counter()
        train_metrics, eval_metrics, diagnostics = run_epoch(epoch)
        row = epoch_row(
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
        if on_epoch_end is not None and settings.ckpt_every and epoch % settings.ckpt_every == 0:
            on_epoch_end(epoch)
        if row["eval_acc"] >= stop_at:
            break
    if bar is not None:
        bar.close()


_PROGRAMS: dict[Any, tuple[Any, Any, Any]] = {}


def jax_program(config, *, over_seeds: bool = False, seed_data: bool = False, devices: int = 1):
    """``(tx, train_epoch, evaluate)`` for a config, built once per process.

    Runs of the same config (several seeds one after another, a resumed run) reuse
    the jitted functions, so they compile once. ``devices > 1`` splits each batch
    over that many local devices.
    """
    key = (
        model_config(config),
        json.dumps(config["optimizer"], sort_keys=True),
        config["train"].get("batch_size", 512),
        over_seeds,
        seed_data,
        devices,
    )
    if key not in _PROGRAMS:
        model = Transformer(key[0])
        shapes = jax.eval_shape(lambda: init_params(model, 0))
        tx = common.optax_optimizer(
            config["optimizer"], muon_dimension_numbers=muon_dimension_numbers(shapes)
        )
        mesh = parallel.make_mesh(devices) if devices > 1 else None
        options = dict(over_seeds=over_seeds, seed_data=seed_data, mesh=mesh)
        _PROGRAMS[key] = (
            tx,
            make_train_epoch(model, tx, key[2], **options),
            make_evaluate(model, **options),
        )
    return _PROGRAMS[key]


def _train_state(params, tx, seed: int) -> dict[str, Any]:
    # At an epoch boundary the position in the data order is the epoch itself:
    # each epoch's order is a function of (order_key, epoch).
    return {
        "params": params,
        "opt_state": tx.init(params),
        "order_key": jax.random.key(seed + ORDER_KEY_OFFSET),
        "epoch": 0,
    }


def initial_train_state(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The JAX train state a run starts from (and the template its checkpoints restore into)."""
    tx, _, _ = jax_program(config)
    return _train_state(init_params(Transformer(model_config(config)), seed), tx, seed)


def _train_jax(config, settings, data, model, params, recorder, previous) -> dict[str, float]:
    batch_size = config["train"].get("batch_size", 512)
    tx, train_epoch, evaluate = jax_program(config, devices=settings.devices)
    train_x, train_y = jnp.asarray(data.train_x), jnp.asarray(data.train_y)
    test_x, test_y = (
        jnp.asarray(a) for a in pad_for_devices(data.test_x, data.test_y, settings.devices)
    )
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"
    state = _train_state(params, tx, settings.seed)
    if settings.devices > 1:
        mesh = parallel.make_mesh(settings.devices)
        # Every process built the same data and state; replicate checks it. The
        # epoch stays a Python int (the progress bar and the checkpoints want one).
        epoch = state.pop("epoch")
        state, train_x, train_y, test_x, test_y = distributed.replicate(
            (state, train_x, train_y, test_x, test_y), mesh
        )
        state["epoch"] = epoch
    if settings.resume is not None or settings.ckpt_every:
        from ars2_jax import checkpoint

        # Every process writes its part of a checkpoint into the same directory.
        for run_dir in (settings.out_dir if settings.ckpt_every else None, settings.resume):
            if run_dir is not None:
                distributed.check_shared_directory(run_dir)
    if settings.resume is not None:
        state = checkpoint.restore(checkpoint_dir(settings, resuming=True), like=state)
        recorder.restore_history([row for row in previous if row["epoch"] <= state["epoch"]])

    def run_epoch(epoch):
        state["params"], state["opt_state"], train_metrics = train_epoch(
            state["params"], state["opt_state"], train_x, train_y, state["order_key"], epoch - 1
        )
        state["epoch"] = epoch
        eval_metrics = jax.device_get(evaluate(state["params"], test_x, test_y))
        diagnostics = ars2_jax.diagnostics(state["opt_state"]) if is_ars2 else {}
        return jax.device_get(train_metrics), eval_metrics, jax.device_get(diagnostics)

    def save(epoch):
        checkpoint.save(checkpoint_dir(settings), state, step=epoch, keep=settings.keep)

    run_epochs(config, settings, recorder, run_epoch, state["epoch"] + 1, save)
    if not settings.timing:
        return {}
    forward_backward = make_forward_backward_epoch(model, batch_size)
    floor = _median_seconds(
        lambda: forward_backward(state["params"], train_x, train_y, state["order_key"], 0)
    ) + _median_seconds(lambda: evaluate(state["params"], test_x, test_y))
    return {"floor_seconds": floor}


# --- command line -----------------------------------------------------------------------


def _config_path(name_or_path: str) -> pathlib.Path:
    path = pathlib.Path(name_or_path)
    if path.suffix == ".toml":
        return path
    return CONFIG_DIR / f"{name_or_path}.toml"


def main(argv: list[str] | None = None) -> None:
    from experiments import grokking_compare

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
    parser.add_argument(
        "--seeds", help="many seeds, e.g. 0-7 or 0,3,5: a table with error bars (JAX)"
    )
    parser.add_argument(
        "--seed-mode",
        choices=grokking_compare.SEED_MODES,
        default="auto",
        help="how --seeds trains the seeds",
    )
    parser.add_argument("--split-seed", type=int, help="train/test split (default: --seed)")
    parser.add_argument("--ns-dtype", choices=sorted(common.DTYPES), help="ARS2-Neo's NS dtype")
    parser.add_argument("--no-early-stop", action="store_true", help="run every epoch")
    parser.add_argument("--out", help="output directory (default: results/grokking/...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--ckpt-every", type=int, default=0, metavar="N", help="checkpoint every N epochs"
    )
    parser.add_argument("--keep", type=int, default=3, metavar="K", help="checkpoints kept")
    parser.add_argument(
        "--devices", type=int, default=1, help="JAX: split every batch over N local devices"
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    parser.add_argument(
        "--num-processes",
        type=int,
        help="JAX: train on N processes (one per host), all devices (env JAX_NUM_PROCESSES)",
    )
    parser.add_argument(
        "--process-id", type=int, help="this process's index, 0 to N-1 (env JAX_PROCESS_ID)"
    )
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address, the same for all (env JAX_COORDINATOR_ADDRESS)",
    )
    parser.add_argument(
        "--timing", action="store_true", help="also time the compute floor (JAX runs)"
    )
    args = parser.parse_args(argv)
    # Before anything runs on a JAX device.
    processes = distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    frameworks = args.framework.split(",")
    if args.resume and (not args.config or args.compare is not None or args.seeds):
        parser.error("--resume continues one run: give its --config, without --compare or --seeds")
    if args.seeds and frameworks != ["jax"]:
        parser.error("--seeds trains JAX models only; drop --framework")
    devices = args.devices
    if processes > 1:
        if args.seeds or args.compare is not None or not args.config or frameworks != ["jax"]:
            parser.error(
                f"{processes} processes train one JAX run: --config, without "
                "--compare, --seeds or --framework torch"
            )
        if devices not in (1, jax.device_count()):
            parser.error(
                f"--devices {devices}: {processes} processes use all {jax.device_count()} devices"
            )
        devices = jax.device_count()
    settings = RunSettings(
        seed=args.seed,
        split_seed=args.split_seed,
        epochs=args.epochs,
        ns_dtype=args.ns_dtype,
        early_stop=not args.no_early_stop,
        out_dir=args.out,
        quiet=args.quiet or not distributed.is_main_process(),
        timing=args.timing,
        ckpt_every=args.ckpt_every,
        keep=args.keep,
        resume=args.resume,
        devices=devices,
    )
    if args.seeds:
        names = args.compare or ([args.config] if args.config else list(DEFAULT_COMPARE))
        configs = [common.load_config(_config_path(name)) for name in names]
        seeds = common.parse_seeds(args.seeds)
        _, text = grokking_compare.compare_seeds(configs, seeds, settings, args.seed_mode)
        print(text)
        return
    if args.config and args.compare is None and len(frameworks) == 1:
        config = common.load_config(_config_path(args.config))
        out = (
            args.out
            or args.resume
            or ROOT / "results" / "grokking" / f"{config['name']}-{frameworks[0]}"
        )
        result = train_and_evaluate(
            config, dataclasses.replace(settings, framework=frameworks[0], out_dir=out)
        )
        if distributed.is_main_process():
            print(pathlib.Path(out, "summary.md").read_text())
        del result
        return
    names = args.compare or ([args.config] if args.config else list(DEFAULT_COMPARE))
    configs = [common.load_config(_config_path(name)) for name in names]
    _, text = grokking_compare.compare(configs, frameworks, settings)
    print(text)


if __name__ == "__main__":
    main()
