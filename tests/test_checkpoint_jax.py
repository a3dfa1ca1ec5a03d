"""ars2_jax.checkpoint: exact resume, a new process, atomic saves, and clear errors."""

from __future__ import annotations

import functools
import gc
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ars2_jax import checkpoint
from tests import checkpoint_runs as runs
from tests.runners import jax_optimizer

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def straight_run():
    """``STEPS`` steps without interruption: (final state, history)."""
    return runs.jax_run(runs.jax_train_state(), runs.STEPS)


def assert_trees_bitwise_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(getattr(b, "dtype", None), jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def checkpoint_at_split(directory):
    state, history = runs.jax_run(runs.jax_train_state(), runs.SPLIT)
    checkpoint.save(directory, state, step=state["epoch"])
    return state, history


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    expected_state, expected_history = straight_run()
    saved, history = checkpoint_at_split(tmp_path)
    # New objects: a new optimizer's fresh state as the template.
    template = runs.jax_train_state(runs.jax_tx())
    restored = checkpoint.restore(tmp_path, like=template)
    assert_trees_bitwise_equal(restored, saved)
    assert type(restored["epoch"]) is int and restored["position"] == runs.SPLIT
    state, rest = runs.jax_run(restored, runs.STEPS)
    assert_trees_bitwise_equal(state, expected_state)
    runs.assert_bitwise_same_history(history + rest, expected_history)
    # The interval exercises the adaptive machinery: syncs, skipped syncs, shear.
    syncs = np.diff([int(h["sync_count"]) for h in expected_history[runs.SPLIT - 1 :]])
    assert 0 < syncs.sum() < len(syncs)


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    expected_state, expected_history = straight_run()
    _, history = checkpoint_at_split(tmp_path / "checkpoints")
    output = tmp_path / "resumed.npz"
    command = ["jax-resume", tmp_path / "checkpoints", output]
    subprocess.run(
        [sys.executable, "-m", "tests.checkpoint_runs", *command],
        cwd=REPOSITORY,
        check=True,
        timeout=300,
    )
    params, rest = runs.load_run(output)
    for name, value in expected_state["params"].items():
        np.testing.assert_array_equal(params[name], np.asarray(value), err_msg=name)
    runs.assert_bitwise_same_history(history + rest, expected_history)


def test_abstract_template_and_keep_last(tmp_path):
    state = runs.jax_train_state()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, {**state, "position": step}, step=step, keep=2)
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    # A template from jax.eval_shape (typed PRNG key included) restores as well.
    like = {**jax.eval_shape(lambda: runs.jax_train_state()), "epoch": 0, "position": 0}
    restored = checkpoint.restore(tmp_path, like=like)
    assert restored["position"] == 3
    assert_trees_bitwise_equal(restored, {**state, "position": 3})
    assert checkpoint.restore(tmp_path, like=state, step=2)["position"] == 2
    with pytest.raises(ValueError, match=r"step=3 must be after the latest checkpoint"):
        checkpoint.save(tmp_path, state, step=3)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"leaf \['name'\] is a str"):
        checkpoint.save(tmp_path, {"name": "run", "x": jnp.ones(2)}, step=1)
    with pytest.raises(ValueError, match="keep=0 must be None or an integer >= 1"):
        checkpoint.save(tmp_path, {"x": jnp.ones(2)}, step=1, keep=0)
    with pytest.raises(ValueError, match="step=-1 must be a non-negative integer"):
        checkpoint.save(tmp_path, {"x": jnp.ones(2)}, step=-1)
    # A template placed on a device by the user gets its arrays placed there too.
    device = jax.devices()[0]
    checkpoint.save(tmp_path, {"x": jnp.arange(3.0)}, step=2)
    restored = checkpoint.restore(tmp_path, like={"x": jax.device_put(jnp.zeros(3), device)})
    assert restored["x"].committed and restored["x"].devices() == {device}
    np.testing.assert_array_equal(restored["x"], [0.0, 1.0, 2.0])


def test_other_shapes_are_refused_naming_the_path(tmp_path):
    state = runs.jax_train_state()
    checkpoint.save(tmp_path, state, step=1)
    like = {**state, "params": {**state["params"], "linear": jnp.zeros((5, 7))}}
    with pytest.raises(ValueError, match=r"\['params'\]\['linear'\]: float32\(5, 6\) in the check"):
        checkpoint.restore(tmp_path, like=like)


def test_other_sam_mode_is_refused_naming_the_shear_force(tmp_path):
    checkpoint.save(tmp_path, runs.jax_train_state(), step=1)
    # The sync mode keeps no shear force: the adaptive checkpoint does not fit it.
    tx = jax_optimizer("sync", ns_dtype=jnp.float32)
    like = {**jax.eval_shape(lambda: runs.jax_train_state(tx)), "epoch": 0, "position": 0}
    with pytest.raises(ValueError, match=r"shear_force\['linear'\]: in the checkpoint, not in the"):
        checkpoint.restore(tmp_path, like=like)
    with pytest.raises(ValueError, match="the SAM mode differs"):
        checkpoint.restore(tmp_path, like=like)


def test_missing_directory_and_step(tmp_path):
    like = runs.jax_train_state()
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(tmp_path / 'absent'))} does not exist"
    ):
        checkpoint.restore(tmp_path / "absent", like=like)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        checkpoint.restore(tmp_path / "empty", like=like)
    checkpoint.save(tmp_path / "run", like, step=1)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step=5; it holds \[1\]"):
        checkpoint.restore(tmp_path / "run", like=like, step=5)


def data_files(step_directory):
    """The files holding the arrays' (compressed) values."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(step_directory / "state")
        if os.path.basename(root) == "d"
        for name in names
    ]
    assert files
    return files


# Orbax reads the arrays concurrently; when one read fails, the reads still in
# flight report to an event loop that is gone, which Python prints as an ignored
# exception. Harmless; they are waited for here, so that no later test sees them.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_checkpoint_raises_naming_it(tmp_path):
    checkpoint.save(tmp_path, runs.jax_train_state(), step=1)
    for path in data_files(tmp_path / "1"):
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
    where = re.escape(str(tmp_path / "1"))
    with pytest.raises(ValueError, match=f"checkpoint {where} is truncated or corrupt"):
        checkpoint.restore(tmp_path, like=runs.jax_train_state())
    time.sleep(0.5)
    gc.collect()


def test_corrupt_manifest_raises_naming_it(tmp_path):
    checkpoint.save(tmp_path, runs.jax_train_state(), step=1)
    (tmp_path / "1" / "manifest" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match="1 is truncated or corrupt: its manifest cannot be read"):
        checkpoint.restore(tmp_path, like=runs.jax_train_state())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # As above.
def test_flipped_bytes_are_caught(tmp_path):
    state = runs.jax_train_state()
    checkpoint.save(tmp_path, state, step=1)
    largest = max(data_files(tmp_path / "1"), key=os.path.getsize)
    with open(largest, "rb") as file:
        original = file.read()
    messages = []
    for fraction in (0.1, 0.3, 0.5):
        corrupt = bytearray(original)
        corrupt[int(fraction * len(corrupt))] ^= 1
        with open(largest, "wb") as file:
            file.write(corrupt)
        with pytest.raises(
            ValueError, match=f"checkpoint {re.escape(str(tmp_path / '1'))} is .*corrupt"
        ) as error:
            checkpoint.restore(tmp_path, like=state)
        messages.append(str(error.value))
    # The storage layer decodes most flipped bytes into wrong values without a
    # complaint: the manifest's checksums are what catch them.
    assert any("do not match its checksum" in message for message in messages)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    state = runs.jax_train_state()
    checkpoint.save(tmp_path, state, step=1)

    def failing_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(Exception, match="disk full"):
        checkpoint.save(tmp_path, {**state, "position": 2}, step=2)
    monkeypatch.undo()
    assert checkpoint.all_steps(tmp_path) == [1]
    assert checkpoint.restore(tmp_path, like=state)["position"] == 0


def test_save_killed_halfway_keeps_the_previous_checkpoint(tmp_path):
    state = {**runs.jax_train_state(), "position": 1}
    checkpoint.save(tmp_path, state, step=1)
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint_runs", "jax-killed-save", tmp_path],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The worker has written every byte of checkpoint 2 and waits before its rename.
        assert worker.stdout.readline().strip() == "renaming"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
    finally:
        worker.kill()
        worker.stdout.close()
    leftovers = [name for name in os.listdir(tmp_path) if name not in ("1",)]
    assert leftovers and all(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers)
    assert checkpoint.all_steps(tmp_path) == [1]
    assert_trees_bitwise_equal(checkpoint.restore(tmp_path, like=state), state)
    # The next save clears what the killed one left.
    checkpoint.save(tmp_path, {**state, "position": 2}, step=2)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert checkpoint.restore(tmp_path, like=state)["position"] == 2
