"""CIFAR-10 classification (SPEC §7): ARS2-Neo against AdamW and Muon on ResNet-18.

    python -m experiments.cifar10 --config tiny --mock-data 64      # seconds on a CPU, no download
    python -m experiments.cifar10 --config ars2_neo_sync
    python -m experiments.cifar10 --compare                          # sync, AdamW, Muon
    python -m experiments.cifar10 --config ars2_neo_sync --estimate  # parameters, FLOPs, time

Data: the Hugging Face hub's copy, ``datasets.load_dataset("uoft-cs/cifar10")``
(no TensorFlow needed), or local Parquet files in that format through the config's
``[data]`` table; or, with ``--data-dir``, a TensorFlow Datasets copy the user has
prepared (``tfds.data_source("cifar10")``). Either is read once into memory as uint8
arrays. ``--mock-data N`` runs the TFDS path under
``tfds.testing.mock_data(num_examples=N)``: random images and labels, no files.

Every training batch is augmented on the device, inside the jitted step
(:func:`augment`): random crop of the image zero-padded by 4, horizontal flip
with probability 1/2, normalization by the channel means and deviations, then
cutout (one 16×16 square, centred anywhere in the image and clipped at the
border, set to 0, the mean). The order is torchvision's
``RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(...),
Cutout(16)``. An epoch is a fresh shuffle cut into full batches of 256 (the last
80 of 50000 images wait for the next shuffle, so every step compiles once).

The learning rate of both tracks follows a cosine over the configured epochs,
stepped once per epoch (PyTorch's ``CosineAnnealingLR`` with ``T_max = epochs``).
BatchNorm is SAM-safe: ARS2-Neo's adversarial pass runs the model in training
mode (batch statistics) but its running averages are discarded; the state keeps
those of the base pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Any, NamedTuple

if __package__ in (None, ""):  # `python experiments/cifar10.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ars2_jax
from experiments import common
from models.resnet import ResNet, ResNetConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "cifar10"
RESULTS = ROOT / "results" / "cifar10"
DEFAULT_COMPARE = ("ars2_neo_sync", "adamw", "muon")
# Per-channel mean and standard deviation of the CIFAR-10 training images, in [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PADDING = 4
CUTOUT = 16
DIAGNOSTICS = ("phi", "phi_std", "threshold", "alpha_t", "sync_count", "effective_k")
# The seed's published best / final test accuracy, percent (SPEC §7).
PUBLISHED = {"ars2_neo_sync": (95.87, 95.73), "adamw": (94.60, 94.47), "muon": (93.76, 93.69)}
MILESTONES: list[common.Milestone] = [
    ("acc_90", "test acc > 90%", lambda r: r["test_acc"] > 0.90),
    ("acc_93", "test acc > 93%", lambda r: r["test_acc"] > 0.93),
    ("acc_95", "test acc > 95%", lambda r: r["test_acc"] > 0.95),
]
CURVES = (("train_loss", "train loss"), ("test_acc", "test accuracy"))


# --- data -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    """Images ``(n, 32, 32, 3)`` uint8 and labels ``(n,)`` int32 of both splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


HUB_CIFAR10 = "uoft-cs/cifar10"  # columns "img" (PNG images) and "label"
NO_DATA_HINT = (
    "Give local files in the hub's Parquet format in the config's [data] table "
    '(path = "parquet", data_files = {train = "...", test = "..."}), a prepared TFDS copy '
    "with --data-dir, or run without data: --config tiny --mock-data 64."
)


def load_cifar10(data: dict[str, Any] | None = None) -> Data:
    """Both splits of CIFAR-10 through ``datasets.load_dataset``, in memory.

    Args:
      data: the config's ``[data]`` table: ``path`` (default ``"uoft-cs/cifar10"``,
        the hub's copy, 132 MiB of Parquet; ``"parquet"`` for local files),
        ``name``, ``data_files`` (``{train = "...", test = "..."}``), ``cache_dir``,
        ``image_column`` (default ``"img"``) and ``label_column`` (``"label"``).

    Raises:
      experiments.common.DataUnavailable: offline with nothing cached, or missing files.
    """
    data = data or {}
    loaded = common.load_hub_dataset(
        data.get("path", HUB_CIFAR10),
        data.get("name"),
        data_files=data.get("data_files"),
        cache_dir=data.get("cache_dir"),
        hint=NO_DATA_HINT,
    )
    missing = {"train", "test"} - set(loaded)
    if missing:
        raise ValueError(f"data={data!r} gives no {sorted(missing)} split (has {sorted(loaded)})")
    image, label = data.get("image_column", "img"), data.get("label_column", "label")
    arrays = []
    for split in ("train", "test"):
        rows = loaded[split].with_format("numpy")
        arrays.append(np.asarray(rows[image], np.uint8))
        arrays.append(np.asarray(rows[label], np.int32))
    if arrays[0].shape[1:] != (32, 32, 3):
        raise ValueError(f"column {image!r} holds images of shape {arrays[0].shape[1:]}")
    return Data(*arrays)


def load_tfds_cifar10(data_dir: str | pathlib.Path | None = None, *, check: bool = True) -> Data:
    """Both splits of a prepared ``tfds.data_source("cifar10")`` copy, in memory.

    Preparing the copy (``tfds build cifar10 --file_format=array_record``) downloads
    ``cifar-10-binary.tar.gz`` and encodes PNGs with TensorFlow, which this project
    does not install; reading it needs only ``array_record`` and Pillow. So the copy
    must exist in ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Args:
      data_dir: the TFDS data directory holding ``cifar10/``.
      check: raise :class:`~experiments.common.DataUnavailable` when the copy is not
        prepared, instead of letting TFDS try (and fail) to build it. ``False`` under
        ``tfds.testing.mock_data``, which needs no files.
    """
    import tensorflow_datasets as tfds

    data_dir = None if data_dir is None else str(data_dir)
    if check:
        builder = tfds.builder("cifar10", data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise common.DataUnavailable(
                f"no prepared TFDS cifar10 in {builder.data_dir}: prepare it on a machine "
                "with TensorFlow (tfds build cifar10 --file_format=array_record) and copy the "
                "cifar10 folder there, or drop --data-dir to read the hub's copy through "
                "datasets. " + NO_DATA_HINT
            )
    arrays = []
    for split in ("train", "test"):
        source = tfds.data_source(
            "cifar10",
            split=split,
            data_dir=data_dir,
            # data_source picks ArrayRecord itself only when data_dir is unset.
            builder_kwargs={"file_format": "array_record"},
        )
        examples = [source[index] for index in range(len(source))]
        arrays.append(np.stack([example["image"] for example in examples]).astype(np.uint8))
        arrays.append(np.array([example["label"] for example in examples], np.int32))
    return Data(*arrays)


def mock_data(num_examples: int):
    """``tfds.testing.mock_data``: random images and labels for every split, no files."""
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples)


# --- augmentation (jitted, on the device) ------------------------------------------------


def normalize(images: jax.Array) -> jax.Array:
    """uint8 (or [0, 255] float) ``(..., 3)`` → float32 with the channel means and deviations."""
    scaled = images.astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(MEAN)) / jnp.asarray(STD)


def crop(images: jax.Array, offsets: jax.Array, padding: int = PADDING) -> jax.Array:
    """Zero-pads each image by ``padding`` and cuts out its original size at ``offsets``.

    Args:
      images: ``(batch, height, width, channels)``.
      offsets: ``(batch, 2)`` integers in ``[0, 2·padding]`` (row, column); ``padding``
        returns the image unchanged.
    """
    height, width, channels = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cut = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels)
    )
    return jax.vmap(cut)(padded, offsets)


def flip(images: jax.Array, flags: jax.Array) -> jax.Array:
    """Mirrors left-right the images whose ``flags`` (``(batch,)`` bool) are set."""
    return jnp.where(flags[:, None, None, None], images[:, :, ::-1], images)


def cutout(images: jax.Array, centers: jax.Array, size: int = CUTOUT) -> jax.Array:
    """Zeroes rows ``[cy − size/2, cy + size/2)`` × columns likewise, clipped at the border.

    Args:
      images: ``(batch, height, width, channels)``.
      centers: ``(batch, 2)`` integers, row in ``[0, height)``, column in ``[0, width)``.
      size: the side of the square.
    """
    half = size // 2

    def inside(center, length):
        index = jnp.arange(length)
        return (index >= center[:, None] - half) & (index < center[:, None] + size - half)

    rows = inside(centers[:, 0], images.shape[1])[:, :, None, None]
    columns = inside(centers[:, 1], images.shape[2])[:, None, :, None]
    return jnp.where(rows & columns, jnp.zeros((), images.dtype), images)


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """Crop (padding 4), flip, normalize, cutout 16: uint8 ``images`` → float32."""
    batch, height, width = images.shape[:3]
    crop_key, flip_key, row_key, column_key = jax.random.split(key, 4)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * PADDING + 1)
    flags = jax.random.bernoulli(flip_key, 0.5, (batch,))
    centers = jnp.stack(
        [
            jax.random.randint(row_key, (batch,), 0, height),
            jax.random.randint(column_key, (batch,), 0, width),
        ],
        axis=1,
    )
    return cutout(normalize(flip(crop(images, offsets), flags)), centers)


# --- model, optimizer and steps ---------------------------------------------------------


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


def model_config(config: dict[str, Any]) -> ResNetConfig:
    return ResNetConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.get("model", {}).items()}
    )


def init_variables(model: ResNet, seed: int) -> dict[str, Any]:
    # Jitted: one compilation instead of one per initializer op.
    init = jax.jit(model.init, static_argnames="train")
    return init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)


def muon_dimension_numbers(params) -> Any:
    """Muon on the conv kernels ``(kh, kw, in, out)`` as ``(kh·kw·in, out)`` matrices; Adam
    (``None``) on the classifier and the BatchNorm scales and biases."""
    conv = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    return jax.tree.map(lambda leaf: conv if jnp.ndim(leaf) == 4 else None, params)


def epoch_cosine_schedule(
    learning_rate: float, epochs: int, steps_per_epoch: int
) -> optax.Schedule:
    """``learning_rate · (1 + cos(π·e/epochs)) / 2`` with ``e = count // steps_per_epoch``.

    The cosine is stepped once per epoch, as PyTorch's ``CosineAnnealingLR(T_max=epochs)``
    stepped after every epoch: epoch ``e`` (0-based) runs at its value for ``e``.

    Example:
      >>> schedule = epoch_cosine_schedule(1.0, epochs=2, steps_per_epoch=3)
      >>> [round(float(schedule(count)), 3) for count in range(7)]
      [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
    cosine = optax.cosine_decay_schedule(learning_rate, decay_steps=epochs)
    return lambda count: cosine(count // steps_per_epoch)


def make_optimizer(config: dict[str, Any], params, steps_per_epoch: int):
    """The config's optimizer with the per-epoch cosine on every track; and the schedule."""
    optimizer = config["optimizer"]
    schedule = epoch_cosine_schedule(
        optimizer["learning_rate"], config["train"]["epochs"], steps_per_epoch
    )
    tx = common.optax_optimizer(
        optimizer, learning_rate=schedule, muon_dimension_numbers=muon_dimension_numbers(params)
    )
    return tx, schedule


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(model: ResNet, tx):
    """``(state, images, labels, index, key) -> (state, metrics)``, jitted.

    ``images`` and ``labels`` are the whole training set on the device; ``index``
    picks the batch, which is augmented with ``key``.
    """

    def train_step(state: TrainState, images, labels, index, key):
        inputs, targets = augment(key, images[index]), labels[index]

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, mutated = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
            return jnp.mean(cross_entropy(logits, targets)), (mutated["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        # The adversarial pass normalizes with its own batch's statistics, as a
        # training forward pass must, but the running averages it computes are
        # dropped: only the base pass's (above) enter the state.
        grad_fn = lambda params: jax.grad(loss_fn, has_aux=True)(params)[0]
        updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == targets)
        return TrainState(params, batch_stats, opt_state), {"loss": loss, "correct": correct}

    return jax.jit(train_step, donate_argnums=(0,))


def make_evaluate_batch(model: ResNet):
    """``(params, batch_stats, images, labels, mask) -> (loss sum, correct)``, jitted."""

    def evaluate_batch(params, batch_stats, images, labels, mask):
        variables = {"params": params, "batch_stats": batch_stats}
        logits = model.apply(variables, normalize(images), train=False)
        correct = (jnp.argmax(logits, -1) == labels) * mask
        return jnp.sum(cross_entropy(logits, labels) * mask), jnp.sum(correct)

    return jax.jit(evaluate_batch)


def evaluate(evaluate_batch, state: TrainState, images, labels, batch_size: int):
    """Mean loss and accuracy over a split, in batches (the last padded and masked)."""
    count = len(labels)
    padding = -count % batch_size
    images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(padding, labels.dtype)])
    mask = (np.arange(count + padding) < count).astype(np.float32)
    sums = [
        evaluate_batch(
            state.params,
            state.batch_stats,
            images[start : start + batch_size],
            labels[start : start + batch_size],
            mask[start : start + batch_size],
        )
        for start in range(0, count + padding, batch_size)
    ]
    loss_sum, correct = np.sum(jax.device_get(sums), axis=0)
    return {"loss": float(loss_sum / count), "acc": float(correct / count)}


# --- one run ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunSettings:
    """What a command line may override in a config."""

    seed: int = 0
    epochs: int | None = None
    ns_dtype: str | None = None
    out_dir: str | pathlib.Path | None = None
    data_dir: str | pathlib.Path | None = None  # a prepared TFDS copy instead of [data]
    quiet: bool = False


def load_data(config: dict[str, Any], settings: RunSettings) -> Data:
    """The TFDS copy in ``settings.data_dir`` if one is given, else the config's ``[data]``."""
    if settings.data_dir is not None:
        return load_tfds_cifar10(settings.data_dir)
    return load_cifar10(config.get("data"))


def resolved(config: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    return common.with_overrides(config, settings.ns_dtype, settings.epochs)


def train_and_evaluate(
    config: dict[str, Any], settings: RunSettings | None = None, data: Data | None = None
) -> dict[str, Any]:
    """Trains one config; returns the history and the best and final test accuracy.

    Writes ``metrics.jsonl``, ``summary.md`` and ``curves.png`` under
    ``settings.out_dir`` when it is set. ``data`` defaults to :func:`load_cifar10`.
    """
    settings = settings or RunSettings()
    config = resolved(config, settings)
    data = data or load_data(config, settings)
    train = config["train"]
    batch_size, epochs = train.get("batch_size", 256), train["epochs"]
    steps = len(data.train_labels) // batch_size
    if steps < 1:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(data.train_labels)} training images"
        )
    model = ResNet(model_config(config))
    variables = init_variables(model, settings.seed)
    tx, schedule = make_optimizer(config, variables["params"], steps)
    state = TrainState(
        variables["params"], variables["batch_stats"], jax.jit(tx.init)(variables["params"])
    )
    train_step = make_train_step(model, tx)
    evaluate_batch = make_evaluate_batch(model)
    train_images, train_labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    rng = np.random.default_rng(settings.seed + 1_000_003)
    augment_key = jax.random.key(settings.seed + 2_000_003)
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"
    label = config["name"]
    recorder = common.RunRecorder(settings.out_dir, label)
    bar = common.progress(epochs * steps, label, settings.quiet)

    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        learning_rate = float(schedule((epoch - 1) * steps))
        order = rng.permutation(len(data.train_labels))[: steps * batch_size]
        metrics = []
        for step, index in enumerate(order.reshape(steps, batch_size)):
            key = jax.random.fold_in(augment_key, (epoch - 1) * steps + step)
            state, step_metrics = train_step(state, train_images, train_labels, index, key)
            metrics.append(step_metrics)
            if bar is not None:
                bar.update()
        metrics = jax.device_get(metrics)
        test = evaluate(
            evaluate_batch,
            state,
            data.test_images,
            data.test_labels,
            train.get("eval_batch_size", 1000),
        )
        diagnostics = jax.device_get(ars2_jax.diagnostics(state.opt_state)) if is_ars2 else {}
        row = {
            "epoch": epoch,
            "learning_rate": learning_rate,
            "train_loss": float(np.mean([m["loss"] for m in metrics])),
            "train_acc": float(sum(m["correct"] for m in metrics) / (steps * batch_size)),
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            **{k: float(v) for k, v in diagnostics.items() if k in DIAGNOSTICS},
            "epoch_seconds": time.perf_counter() - start,
            "wall_seconds": recorder.elapsed(),
        }
        recorder.record(row)
        if bar is not None:
            bar.set_postfix(acc=f"{row['train_acc']:.3f}/{row['test_acc']:.3f}")
    if bar is not None:
        bar.close()

    history = recorder.history
    best = max(history, key=lambda r: r["test_acc"])
    result = {
        "name": config["name"],
        "label": label,
        "history": history,
        "best_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "final_acc": history[-1]["test_acc"],
        "epoch_seconds": statistics.median(r["epoch_seconds"] for r in history),
    }
    extra = [
        f"- seed {settings.seed}, {len(history)} epochs of {steps} steps (batch {batch_size})",
        f"- best test accuracy {100 * result['best_acc']:.2f}% (epoch {result['best_epoch']}), "
        f"final {100 * result['final_acc']:.2f}%",
        f"- median epoch (train + eval) {result['epoch_seconds']:.2f} s",
    ]
    if config["name"] in PUBLISHED:
        seed_best, seed_final = PUBLISHED[config["name"]]
        extra.append(f"- the seed's published best / final: {seed_best:.2f}% / {seed_final:.2f}%")
    result["milestones"] = recorder.finish(MILESTONES, f"Optimizer: `{config['optimizer']}`", extra)
    if settings.out_dir is not None:
        common.plot_curves(
            pathlib.Path(settings.out_dir) / "curves.png", {label: history}, CURVES, log_x=False
        )
    return result


# --- several runs -----------------------------------------------------------------------


def compare(
    configs: list[dict[str, Any]], settings: RunSettings, data: Data | None = None
) -> tuple[list[dict], str]:
    """Runs every config on the same data; writes ``comparison.md`` and ``curves.png``."""
    out = pathlib.Path(settings.out_dir or RESULTS / "compare")
    out.mkdir(parents=True, exist_ok=True)
    data = data or load_data(configs[0], settings)
    results, rows = [], []
    for config in configs:
        result = train_and_evaluate(
            config, dataclasses.replace(settings, out_dir=out / config["name"]), data
        )
        results.append(result)
        published = PUBLISHED.get(config["name"])
        rows.append(
            [
                config["name"],
                f"{100 * result['best_acc']:.2f} ({result['best_epoch']})",
                f"{100 * result['final_acc']:.2f}",
                "–" if published is None else f"{published[0]:.2f} / {published[1]:.2f}",
                f"{result['epoch_seconds']:.1f}",
            ]
        )
    columns = ["run", "best test acc % (epoch)", "final test acc %", "seed best / final", "epoch s"]
    header = f"# CIFAR-10 comparison\n\nSeed {settings.seed}; test accuracy."
    text = common.write_comparison(out / "comparison.md", header, columns, rows)
    common.plot_curves(
        out / "curves.png", {r["label"]: r["history"] for r in results}, CURVES, log_x=False
    )
    return results, text


# --- resources --------------------------------------------------------------------------


def estimate_resources(config: dict[str, Any]) -> dict[str, Any]:
    """Parameter count and XLA's FLOP count of one train step, without running it.

    The step (augmentation, forward, backward, the adversarial pass when ARS2-Neo
    syncs, the optimizer) is lowered on abstract arrays and counted by
    ``jax.stages.Lowered.cost_analysis``, plus the Newton-Schulz iterations that
    count misses (:func:`experiments.common.newton_schulz_loop_flops`); nothing is
    compiled or allocated.
    """
    model = ResNet(model_config(config))
    variables = jax.eval_shape(lambda: init_variables(model, 0))
    batch_size = config["train"].get("batch_size", 256)
    tx, _ = make_optimizer(config, variables["params"], steps_per_epoch=1)
    state = TrainState(
        variables["params"], variables["batch_stats"], jax.eval_shape(tx.init, variables["params"])
    )
    lowered = make_train_step(model, tx).lower(
        state,
        jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.uint8),
        jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        jax.random.key(0),
    )
    optimizer = config["optimizer"]
    loop_flops = 0.0
    if optimizer["name"] == "ars2_neo":
        loop_flops = common.newton_schulz_loop_flops(
            variables["params"], optimizer.get("ns_steps", 5)
        )
    return {
        "parameters": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"])),
        "flops_per_step": float(lowered.cost_analysis()["flops"]) + loop_flops,
    }


# --- command line -----------------------------------------------------------------------


def _config_path(name_or_path: str) -> pathlib.Path:
    return common.config_path(name_or_path, CONFIG_DIR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="one run: a config file or a name in configs/cifar10")
    parser.add_argument(
        "--compare",
        nargs="*",
        metavar="CONFIG",
        help=f"several runs into one table (default: {', '.join(DEFAULT_COMPARE)})",
    )
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=0, help="initial weights, order, augmentation")
    parser.add_argument("--ns-dtype", choices=sorted(common.DTYPES), help="ARS2-Neo's NS dtype")
    parser.add_argument("--out", help="output directory (default: results/cifar10/...)")
    parser.add_argument(
        "--data-dir", help="read a prepared TFDS copy of cifar10 in this TFDS data directory"
    )
    parser.add_argument(
        "--mock-data",
        type=int,
        metavar="N",
        help="tfds.testing.mock_data with N random examples per split (no download)",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print parameters and FLOPs per step of the config instead of training",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.estimate:
        for name in [args.config] if args.config else DEFAULT_COMPARE:
            config = common.load_config(_config_path(name))
            print(json.dumps({"config": config["name"], **estimate_resources(config)}))
        return
    settings = RunSettings(
        seed=args.seed,
        epochs=args.epochs,
        ns_dtype=args.ns_dtype,
        out_dir=args.out,
        data_dir=args.data_dir,
        quiet=args.quiet,
    )
    try:
        data = None
        if args.mock_data:
            with mock_data(args.mock_data):
                data = load_tfds_cifar10(check=False)
        if args.config and args.compare is None:
            config = common.load_config(_config_path(args.config))
            out = args.out or RESULTS / config["name"]
            train_and_evaluate(config, dataclasses.replace(settings, out_dir=out), data)
            print(pathlib.Path(out, "summary.md").read_text())
            return
        names = args.compare or ([args.config] if args.config else list(DEFAULT_COMPARE))
        _, text = compare([common.load_config(_config_path(n)) for n in names], settings, data)
    except common.DataUnavailable as error:
        parser.exit(2, f"error: {error}\n")
    print(text)


if __name__ == "__main__":
    main()
