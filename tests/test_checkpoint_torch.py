"""ars2_torch.checkpoint and ARS2Neo.load_state_dict: exact resume, atomic saves, clear errors."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from ars2_torch import ARS2Neo, checkpoint
from tests import checkpoint_runs as runs
from tests import parity_problem as problem
from tests.runners import torch_groups

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def straight_run():
    """``STEPS`` steps without interruption: (final params, history)."""
    params, optimizer, generator = runs.torch_objects()
    history = runs.torch_run(params, optimizer, generator, 0, runs.STEPS)
    return runs.torch_numpy(params), history


def checkpoint_at_split(directory):
    params, optimizer, generator = runs.torch_objects()
    history = runs.torch_run(params, optimizer, generator, 0, runs.SPLIT)
    checkpoint.save_step(
        directory,
        runs.SPLIT,
        params={n: p.detach() for n, p in params.items()},
        optimizer=optimizer,
        generator=generator.get_state(),
        position=runs.SPLIT,
    )
    return history


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    expected_params, expected_history = straight_run()
    history = checkpoint_at_split(tmp_path)
    params, optimizer, generator = runs.torch_objects()
    saved = checkpoint.load(tmp_path)
    optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved["params"][name])
    rest = runs.torch_run(params, optimizer, generator, saved["position"], runs.STEPS)
    for name, value in runs.torch_numpy(params).items():
        np.testing.assert_array_equal(value, expected_params[name], err_msg=name)
    runs.assert_bitwise_same_history(history + rest, expected_history)
    syncs = np.diff([int(h["sync_count"]) for h in expected_history[runs.SPLIT - 1 :]])
    assert 0 < syncs.sum() < len(syncs)


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    expected_params, expected_history = straight_run()
    history = checkpoint_at_split(tmp_path / "checkpoints")
    output = tmp_path / "resumed.npz"
    command = ["torch-resume", tmp_path / "checkpoints", output]
    subprocess.run(
        [sys.executable, "-m", "tests.checkpoint_runs", *command],
        cwd=REPOSITORY,
        check=True,
        timeout=300,
    )
    params, rest = runs.load_run(output)
    for name, value in expected_params.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    runs.assert_bitwise_same_history(history + rest, expected_history)


def test_save_load_and_keep_last(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_step(tmp_path, step, keep=2, position=step)
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000002.pt", "checkpoint_00000003.pt"]
    assert checkpoint.load(tmp_path)["position"] == 3
    assert checkpoint.load(tmp_path, step=2)["position"] == 2
    assert checkpoint.load(tmp_path / "checkpoint_00000003.pt")["position"] == 3
    with pytest.raises(ValueError, match="step=3 must be after the latest checkpoint"):
        checkpoint.save_step(tmp_path, 3, position=3)
    with pytest.raises(ValueError, match="keep=0 must be None or an integer >= 1"):
        checkpoint.save_step(tmp_path, 4, keep=0)
    with pytest.raises(ValueError, match="step=-1 must be a non-negative integer"):
        checkpoint.save_step(tmp_path, -1)
    # save() alone writes one file, replacing it atomically.
    model = torch.nn.Linear(3, 2)
    path = checkpoint.save(tmp_path / "model.pt", model=model, epoch=1)
    checkpoint.save(path, model=model, epoch=2)
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 2 and set(loaded["model"]) == {"weight", "bias"}


def adaptive_optimizer(shapes=None):
    params = {
        n: torch.nn.Parameter(torch.zeros(shape)) for n, shape in (shapes or problem.SHAPES).items()
    }
    return ARS2Neo(torch_groups(params), **problem.sam_settings("adaptive")), params


@functools.cache
def stepped_state_dict():
    """An ARS2Neo state dict after two adaptive steps (read, never modified, by the tests)."""
    params, optimizer, generator = runs.torch_objects()
    runs.torch_run(params, optimizer, generator, 0, 2)
    return optimizer.state_dict()


def test_state_of_other_shapes_is_refused():
    state_dict = stepped_state_dict()
    optimizer, _ = adaptive_optimizer({**problem.SHAPES, "linear": (6, 7)})
    with pytest.raises(
        ValueError,
        match=r"param group 0, parameter 0: its 'exp_avg' has shape \(6, 5\), "
        r"the parameter \(6, 7\)",
    ):
        optimizer.load_state_dict(state_dict)
    assert not optimizer.state  # Nothing was loaded.


def test_state_of_another_sam_mode_is_refused():
    state_dict = stepped_state_dict()
    params = {n: torch.nn.Parameter(torch.zeros(shape)) for n, shape in problem.SHAPES.items()}
    optimizer = ARS2Neo(torch_groups(params), **problem.sam_settings("sync"))
    with pytest.raises(ValueError, match=r"other SAM settings .*'k': \(6, 1\)"):
        optimizer.load_state_dict(state_dict)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"checkpoint {re.escape(str(tmp_path / 'absent.pt'))} does not"
    ):
        checkpoint.load(tmp_path / "absent.pt")
    with pytest.raises(
        FileNotFoundError, match=f"directory {re.escape(str(tmp_path / 'absent'))} does not exist"
    ):
        checkpoint.all_steps(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        checkpoint.load(tmp_path)
    checkpoint.save_step(tmp_path, 1, position=1)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step=4; it holds \[1\]"):
        checkpoint.load(tmp_path, step=4)
    with pytest.raises(FileNotFoundError, match=r"directory .*absent does not exist"):
        checkpoint.save(tmp_path / "absent" / "run.pt", position=1)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.99, 0.0])
def test_truncated_file_raises_naming_it(tmp_path, keep_fraction):
    path = checkpoint.save(tmp_path / "run.pt", optimizer=stepped_state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: int(keep_fraction * len(data))])
    with pytest.raises(
        ValueError, match=f"checkpoint {re.escape(str(path))} is truncated or corrupt"
    ):
        checkpoint.load(path)


def test_flipped_bytes_fail_the_crc_check(tmp_path):
    path = checkpoint.save(tmp_path / "run.pt", optimizer=stepped_state_dict())
    data = bytearray(path.read_bytes())
    # torch.load itself would load these: it does not check the CRC-32s.
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=f"checkpoint {re.escape(str(path))} is corrupt: record .* CRC-32"
    ):
        checkpoint.load(path)


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "run.pt"
    path.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save_step(tmp_path, 1, position=1)
    real_save = torch.save

    def failing_save(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(10)  # Half-written, then the disk fills up.
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_step(tmp_path, 2, position=2)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path / "checkpoint_00000001.pt", position=5)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint_00000001.pt"]  # No temporary file left.
    assert checkpoint.load(tmp_path)["position"] == 1


def test_save_killed_halfway_keeps_the_previous_checkpoint(tmp_path):
    checkpoint.save_step(tmp_path, 1, position=1)
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint_runs", "torch-killed-save", tmp_path],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The worker has written checkpoint 2 to its temporary file and waits before
        # the os.replace that would publish it.
        assert worker.stdout.readline().strip() == "renaming"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
    finally:
        worker.kill()
        worker.stdout.close()
    leftovers = sorted(set(os.listdir(tmp_path)) - {"checkpoint_00000001.pt"})
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint_00000002.pt.")
    assert checkpoint.all_steps(tmp_path) == [1]
    assert checkpoint.load(tmp_path)["position"] == 1
    checkpoint.save_step(tmp_path, 2, position=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]
    assert checkpoint.load(tmp_path)["position"] == 2
