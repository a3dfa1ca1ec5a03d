"""The CIFAR-10 experiment: augmentation, the per-epoch cosine, SAM-safe BatchNorm, a mock run.

Nothing is downloaded: small Parquet files in the hub's format stand in for
``uoft-cs/cifar10`` behind the same ``datasets.load_dataset`` call, and
``tfds.testing.mock_data`` for a prepared TFDS copy.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ars2_jax
from experiments import cifar10, common
from models.resnet import ResNet, ResNetConfig

CONFIGS = cifar10.CONFIG_DIR


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)


def test_crop_keeps_the_size_and_shifts_within_the_zero_padding():
    images = jnp.asarray(_images(3), jnp.float32)
    offsets = jnp.array([[4, 4], [0, 0], [8, 1]])
    cropped = cifar10.crop(images, offsets, padding=4)
    assert cropped.shape == images.shape
    np.testing.assert_array_equal(cropped[0], images[0])  # offset = padding: unchanged
    # Offset (0, 0): the image moves 4 down and 4 right, zeros come in at the top left.
    np.testing.assert_array_equal(cropped[1, 4:, 4:], images[1, :-4, :-4])
    assert not cropped[1, :4].any() and not cropped[1, :, :4].any()
    # Offset (8, 1): 4 up and 3 right.
    np.testing.assert_array_equal(cropped[2, :-4, 3:], images[2, 4:, :-3])
    assert not cropped[2, -4:].any() and not cropped[2, :, :3].any()


def test_flip_mirrors_exactly_the_flagged_images():
    images = jnp.asarray(_images(2))
    flipped = cifar10.flip(images, jnp.array([True, False]))
    np.testing.assert_array_equal(flipped[0], np.asarray(images[0])[:, ::-1])
    np.testing.assert_array_equal(flipped[1], images[1])


def test_cutout_zeroes_a_16x16_square_clipped_at_the_border():
    images = jnp.ones((3, 32, 32, 3))
    centers = jnp.array([[16, 16], [3, 30], [0, 0]])
    cut = np.asarray(cifar10.cutout(images, centers, size=16))
    expected = np.ones((3, 32, 32, 3))
    expected[0, 8:24, 8:24] = 0  # rows and columns [c - 8, c + 8)
    expected[1, 0:11, 22:32] = 0  # [-5, 11) x [22, 38), clipped
    expected[2, 0:8, 0:8] = 0
    np.testing.assert_array_equal(cut, expected)


def test_augment_is_keyed_and_leaves_one_cutout_per_image():
    images = jnp.asarray(_images(64))
    augment = jax.jit(cifar10.augment)
    out = augment(jax.random.key(0), images)
    assert out.shape == (64, 32, 32, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, augment(jax.random.key(0), images))
    assert not np.array_equal(out, augment(jax.random.key(1), images))
    # Normalized pixels are never exactly 0 (0.4914·255 is no integer), so the zeros
    # are the cutout: a 16×16 square clipped at the border, 8×8 to 16×16 pixels.
    zeros = np.all(np.asarray(out) == 0, axis=-1).sum(axis=(1, 2))
    assert zeros.min() >= 64 and zeros.max() <= 256
    assert (zeros == 256).any() and (zeros < 256).any()
    # The images are normalized with the CIFAR-10 channel statistics.
    np.testing.assert_allclose(
        cifar10.normalize(jnp.full((1, 3), 255)),
        [[(1 - m) / s for m, s in zip(cifar10.MEAN, cifar10.STD)]],
        rtol=1e-6,
    )


def test_epoch_cosine_schedule_is_torch_cosine_annealing_stepped_per_epoch():
    schedule = cifar10.epoch_cosine_schedule(1e-3, epochs=60, steps_per_epoch=195)
    for count in (0, 194, 195, 196, 30 * 195, 59 * 195 + 194, 60 * 195):
        epoch = count // 195
        expected = 1e-3 * (1 + math.cos(math.pi * epoch / 60)) / 2
        assert float(schedule(count)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        cifar10.epoch_cosine_schedule(1e-3, epochs=60, steps_per_epoch=0)


@pytest.mark.parametrize("name", ["ars2_neo_sync", "adamw", "muon"])
def test_learning_rate_of_every_track_follows_the_schedule(name):
    """At fixed params and gradients, every track's update is its learning rate times a
    direction that does not depend on it: the scheduled optimizer's updates are the
    constant-rate optimizer's times ``schedule(count) / learning_rate``, leaf by leaf."""
    config = common.load_config(CONFIGS / f"{name}.toml")
    config["train"]["epochs"] = 3
    params = {"conv": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)}
    base = {"conv": jnp.linspace(-1.0, 1.0, 72).reshape(3, 3, 2, 4), "bias": jnp.arange(1.0, 5)}
    grad_fn = lambda p: jax.tree.map(lambda g, x: g + 0.1 * x, base, p)
    scheduled, schedule = cifar10.make_optimizer(config, params, steps_per_epoch=2)
    constant = common.optax_optimizer(
        config["optimizer"], muon_dimension_numbers=cifar10.muon_dimension_numbers(params)
    )

    def run(tx):
        @jax.jit
        def step(state, scale):
            grads = jax.tree.map(lambda g: g * scale, base)
            return tx.update(grads, state, params, grad_fn=grad_fn)

        state, updates = tx.init(params), []
        for t in range(7):
            update, state = step(state, 1.0 + 0.1 * t)
            updates.append(update)
        return updates

    rates = np.array([float(schedule(count)) for count in range(7)])
    np.testing.assert_allclose(rates / rates[0], [1, 1, 0.75, 0.75, 0.25, 0.25, 0], atol=1e-7)
    for t, (with_schedule, without) in enumerate(zip(run(scheduled), run(constant))):
        for leaf in ("conv", "bias"):
            np.testing.assert_allclose(
                with_schedule[leaf], without[leaf] * rates[t] / rates[0], rtol=1e-5, atol=1e-12
            )


def test_resnet18_size_and_tracks():
    model = ResNet(ResNetConfig())
    variables = jax.eval_shape(lambda: cifar10.init_variables(model, 0))
    params = variables["params"]
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 11_173_962
    labels = jax.tree_util.tree_leaves_with_path(ars2_jax.default_param_labels(params))
    ars2 = [jax.tree_util.keystr(path) for path, label in labels if label == "ars2"]
    # 1 stem + 16 block + 3 shortcut convolutions, and the classifier kernel.
    assert len(ars2) == 21 and all(name.endswith("['kernel']") for name in ars2)
    adamw = [jax.tree_util.keystr(path) for path, label in labels if label == "adamw"]
    assert all(name.endswith(("['scale']", "['bias']")) for name in adamw)
    assert "['classifier']['bias']" in adamw
    is_dims = lambda x: isinstance(x, optax.contrib.MuonDimensionNumbers)
    dims = jax.tree.leaves(cifar10.muon_dimension_numbers(params), is_leaf=is_dims)
    assert len(dims) == 20  # every conv kernel on Muon; classifier and BatchNorm on Adam


def test_sam_step_keeps_the_base_pass_batch_statistics():
    """The running averages after a SAM step are those of the base forward pass,
    bitwise; the adversarial pass (training mode, other weights) computes others."""
    config = common.load_config(CONFIGS / "tiny.toml")
    # One stage of one block (compiles faster than tiny.toml's two); tiny.toml's optimizer.
    model = ResNet(ResNetConfig(stage_sizes=(1,), widths=(4,)))
    variables = cifar10.init_variables(model, 0)
    tx, _ = cifar10.make_optimizer(config, variables["params"], steps_per_epoch=1)
    state = cifar10.TrainState(
        variables["params"], variables["batch_stats"], tx.init(variables["params"])
    )
    images, labels = jnp.asarray(_images(16)), jnp.arange(16, dtype=jnp.int32) % 10
    index, key = jnp.arange(16), jax.random.key(3)

    @jax.jit
    def running_stats(params, batch_stats):
        inputs = cifar10.augment(key, images[index])
        variables = {"params": params, "batch_stats": batch_stats}
        _, mutated = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
        return mutated["batch_stats"]

    base = running_stats(state.params, state.batch_stats)
    moved = jax.tree.map(lambda p: p * 1.05, state.params)
    other = running_stats(moved, state.batch_stats)  # what an adversarial pass would give
    params, batch_stats = state.params, state.batch_stats
    new_state, metrics = cifar10.make_train_step(model, tx)(state, images, labels, index, key)

    assert int(ars2_jax.diagnostics(new_state.opt_state)["sync_count"]) == 1
    for expected, actual, init, leak in zip(
        jax.tree.leaves(base),
        jax.tree.leaves(new_state.batch_stats),
        jax.tree.leaves(batch_stats),
        jax.tree.leaves(other),
    ):
        np.testing.assert_array_equal(actual, expected)
        assert not np.array_equal(actual, init)
        assert not np.allclose(leak, expected)
    assert not any(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params))
    )
    assert np.isfinite(float(metrics["loss"]))


def _write_hub_parquet(directory, counts=(("train", 40), ("test", 16))):
    # The hub copy's on-disk format: Parquet with an Image feature (PNG bytes) "img"
    # and a ClassLabel "label", written by datasets itself.
    import datasets
    from PIL import Image

    features = datasets.Features(img=datasets.Image(), label=datasets.ClassLabel(num_classes=10))
    files, arrays = {}, {}
    for seed, (split, count) in enumerate(counts):
        images = _images(count, seed)
        labels = np.arange(count) % 10
        rows = {"img": [Image.fromarray(image) for image in images], "label": labels.tolist()}
        files[split] = str(directory / f"{split}.parquet")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(files[split])
        arrays[split] = (images, labels)
    return {"path": "parquet", "data_files": files, "cache_dir": str(directory / "hf")}, arrays


def test_local_parquet_in_the_hub_format_reaches_the_first_batch(tmp_path):
    data_table, arrays = _write_hub_parquet(tmp_path)
    data = cifar10.load_cifar10(data_table)
    np.testing.assert_array_equal(data.train_images, arrays["train"][0])  # PNG: lossless
    np.testing.assert_array_equal(data.train_labels, arrays["train"][1])
    np.testing.assert_array_equal(data.test_images, arrays["test"][0])
    assert data.train_labels.dtype == np.int32
    config = common.load_config(CONFIGS / "tiny.toml")
    config["data"] = data_table
    result = cifar10.train_and_evaluate(config, cifar10.RunSettings(epochs=1, quiet=True))
    (row,) = result["history"]
    assert math.isfinite(row["train_loss"]) and 0 <= row["test_acc"] <= 1


def test_missing_local_files_and_unprepared_tfds_copy_say_what_to_do(tmp_path):
    missing = {"path": "parquet", "data_files": {"train": str(tmp_path / "no.parquet")}}
    with pytest.raises(common.DataUnavailable, match=r"no\.parquet.*--mock-data"):
        cifar10.load_cifar10(missing)
    with pytest.raises(common.DataUnavailable, match="no prepared TFDS cifar10 in"):
        cifar10.load_tfds_cifar10(tmp_path / "tfds")


def test_offline_with_empty_caches_exits_with_one_clear_message(tmp_path, offline_command):
    # A fresh install with no network: no traceback, status 2, what to do instead.
    done = offline_command("experiments.cifar10", "--config", "ars2_neo_sync")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "uoft-cs/cifar10 could not be loaded" in done.stderr
    assert "--mock-data" in done.stderr and str(tmp_path / "hf") in done.stderr


def test_mock_data_loads_through_tfds_data_source():
    with cifar10.mock_data(num_examples=24):
        data = cifar10.load_tfds_cifar10(check=False)
    assert data.train_images.shape == data.test_images.shape == (24, 32, 32, 3)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    assert 0 <= data.train_labels.min() and data.train_labels.max() < 10


def test_tiny_config_on_mock_data_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    cifar10.main(f"--config tiny --mock-data 64 --quiet --out {out}".split())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = common.load_config(CONFIGS / "tiny.toml")
    epochs = config["train"]["epochs"]
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    # The per-epoch cosine: epoch e runs at lr·(1 + cos(π(e-1)/epochs))/2.
    lr = config["optimizer"]["learning_rate"]
    for row in rows:
        expected = lr * (1 + math.cos(math.pi * (row["epoch"] - 1) / epochs)) / 2
        assert row["learning_rate"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert 0 <= row["test_acc"] <= 1 and math.isfinite(row["train_loss"])
        # 64 examples in batches of 16: 4 SAM steps per epoch.
        assert row["sync_count"] == 4 * row["epoch"]
    summary = (out / "summary.md").read_text()
    best = max(row["test_acc"] for row in rows)
    assert f"best test accuracy {100 * best:.2f}%" in summary
    assert f"final {100 * rows[-1]['test_acc']:.2f}%" in summary
    assert (out / "curves.png").stat().st_size > 0
