"""Several JAX processes (``jax.distributed``, CPU collectives over gloo, on 127.0.0.1).

Multi-host data parallelism, proven on one machine: each process is started here
as ``python -m tests.multihost_worker`` (or ``python -m experiments.grokking``)
with ``--num-processes N --process-id I --coordinator 127.0.0.1:PORT``; the
processes find each other through process 0's coordinator and train one model on
global arrays, each feeding only its own rows of every global batch.

* The fixture in every SAM mode, float32 with float32 Newton-Schulz, on 2
  processes of 2 devices each, ends where one process on one device ends on the
  whole batches: SPEC §6b's 1e-5, the same sync steps, every adaptive decision
  well posed; every process holds bit-identical replicas.
* Every process sees a directory of this machine; directories of their own are
  refused for multi-process checkpoints with a clear error.
* A process that dies (``os._exit``) or freezes (``SIGSTOP``, its sockets left
  open) mid-run makes the others exit with an error within the heartbeat
  timeout, not hang; so does one that raises.
* ``experiments/grokking.py`` on 2 processes writes the metrics a single process
  writes, and only process 0 writes anything.

4 processes of one device run the fixture as well (the same results as 2 × 2),
but took 67 s on the shared 2-core machine (load average ~10), against 39 s for
2 × 2: the suite runs 2 × 2, several processes with several devices each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import distributed
from tests import data_parallel_problem as problem

ROOT = pathlib.Path(__file__).resolve().parents[1]
# LLVM's optimizations triple XLA's CPU compile time and change nothing compared
# here: both sides of every comparison are compiled alike.
XLA_FLAGS = "--xla_backend_optimization_level=0"
HEARTBEAT_S = 5
# A group of processes still running after this is killed and the test fails.
TIMEOUT_S = 240
# The survivors of a failure must be gone this long after it (heartbeat, error
# polling, and a loaded machine's delays).
STOP_WITHIN_S = HEARTBEAT_S + 20
# What JAX prints in a process that outlives another.
FAILURE_MESSAGES = (
    "Gloo all-reduce failed",
    "Terminating process because the JAX distributed service detected fatal errors",
)


@dataclasses.dataclass
class Finished:
    process_id: int
    returncode: int | None  # None: killed by the test (see wait)
    output: str  # stdout and stderr
    exit_time: float  # time.time() when it exited (or was killed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(local_devices: int = 1) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS")
    }
    flags = f"{XLA_FLAGS} --xla_force_host_platform_device_count={local_devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    return env


def report(finished: list[Finished]) -> str:
    """Every process's exit status and the end of its output, for an assertion message."""
    return "\n".join(
        f"--- process {f.process_id}: exit status {f.returncode}\n{f.output[-3000:]}"
        for f in finished
    )


def run_group(
    tmp_path: pathlib.Path,
    command: list[str],
    processes: int,
    *,
    per_process: dict[int, list[str]] | None = None,
    local_devices: int = 1,
    with_flags: bool = True,
    reference: list[str] | None = None,
    stop: list[int] = (),
) -> tuple[list[Finished], Finished | None]:
    """Starts ``processes`` processes of ``command`` on a free port and waits for them.

    Each gets ``--num-processes``, ``--process-id``, ``--coordinator`` (or, with
    ``with_flags=False``, the ``JAX_*`` environment variables) and its own
    ``per_process`` arguments; ``reference`` (a command) runs alongside as a
    plain single process. The processes in ``stop`` may freeze: they are killed
    once every other process has exited. If the coordinator could not bind the
    port (another process took it since :func:`free_port`), starts again once.
    """
    per_process = per_process or {}
    for attempt in range(2):
        port = free_port()
        logs, started = [], []
        for i in range(processes):
            args = list(per_process.get(i, []))
            env = environment(local_devices)
            if with_flags:
                args += ["--num-processes", str(processes), "--process-id", str(i)]
                args += ["--coordinator", f"127.0.0.1:{port}"]
            else:
                env.update(
                    JAX_NUM_PROCESSES=str(processes),
                    JAX_PROCESS_ID=str(i),
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                )
            log = (tmp_path / f"attempt{attempt}-process{i}.log").open("w+")
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", *command, *args],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            logs.append(log)
        if reference is not None:
            log = (tmp_path / f"attempt{attempt}-reference.log").open("w+")
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", *reference],
                    cwd=ROOT,
                    env=environment(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            logs.append(log)
        finished = wait(started, logs, stop)
        if attempt == 0 and "Failed to add port" in finished[0].output:
            continue
        break
    if reference is not None:
        return finished[:-1], finished[-1]
    return finished, None


def wait(started: list[subprocess.Popen], logs: list, stop: list[int]) -> list[Finished]:
    """Waits for every process not in ``stop``; once one has failed, the others get
    ``STOP_WITHIN_S`` to stop. Whatever still runs then is killed."""
    deadline = time.monotonic() + TIMEOUT_S
    exit_times = [None] * len(started)
    try:
        while time.monotonic() < deadline:
            for i, process in enumerate(started):
                if exit_times[i] is None and process.poll() is not None:
                    exit_times[i] = time.time()
                    if process.returncode != 0:
                        deadline = min(deadline, time.monotonic() + STOP_WITHIN_S)
            if all(exit_times[i] is not None for i in range(len(started)) if i not in stop):
                break
            time.sleep(0.1)
    finally:
        for i, process in enumerate(started):
            if process.poll() is None:
                process.kill()
                process.wait()
                exit_times[i] = time.time()
    finished = []
    for i, (process, log) in enumerate(zip(started, logs)):
        log.seek(0)
        killed = process.returncode == -signal.SIGKILL
        finished.append(
            Finished(i, None if killed else process.returncode, log.read(), exit_times[i])
        )
        log.close()
    return finished


# --- the fixture: N processes equal one --------------------------------------------------


def load_result(path: pathlib.Path) -> dict:
    result = json.loads(path.read_text())
    for mode in result["modes"].values():
        mode["params"] = {n: np.asarray(v, np.float32) for n, v in mode["params"].items()}
    return result


def test_processes_equal_one_process_in_every_mode(tmp_path):
    processes, local_devices = 2, 2
    finished, single = run_group(
        tmp_path,
        ["tests.multihost_worker", "--heartbeat", str(HEARTBEAT_S)],
        processes,
        # One directory both processes see, then one of each process's own.
        per_process={
            i: ["--shared-directory", str(tmp_path), "--shared-directory", str(tmp_path / str(i))]
            + (["--out", str(tmp_path / "processes.json")] if i == 0 else [])
            for i in range(processes)
        },
        local_devices=local_devices,
        reference=["tests.multihost_worker", "--out", str(tmp_path / "single.json")],
    )
    assert all(f.returncode == 0 for f in [*finished, single]), report([*finished, single])
    got, expected = load_result(tmp_path / "processes.json"), load_result(tmp_path / "single.json")

    # The data lived where it should: each process held its own rows, the
    # params a copy on every device of every process.
    assert got["process_count"] == processes
    assert got["device_count"] == processes * local_devices
    local = problem.GLOBAL_BATCH // processes
    assert got["rows"] == [[i * local, (i + 1) * local] for i in range(processes)]
    assert got["batch_shape"] == [problem.GLOBAL_BATCH, 8]
    assert got["batch_local_shape"] == [problem.GLOBAL_BATCH // got["device_count"], 8]
    assert got["params_replicated"] and not got["params_fully_addressable"]
    assert expected["process_count"] == expected["device_count"] == 1
    shared, own = got["shared_directories"]
    assert shared == "shared"
    assert "is not shared: processes [1] do not see the file process 0 wrote" in own, own

    for mode, reference in expected["modes"].items():
        result = got["modes"][mode]
        moved = problem.relative_error(reference["params"], problem.initial_params())
        assert moved > 0.1, f"{mode}: the reference hardly trained ({moved:.2e})"
        assert result["sync_count"] == reference["sync_count"], f"{mode}: other sync steps"
        error = problem.relative_error(result["params"], reference["params"])
        assert error <= problem.TOLERANCE, f"{mode}: relative error {error:.2e}"
        # φ is a ratio of float32 sums over the batch, summed in another order.
        np.testing.assert_allclose(result["phi"], reference["phi"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(result["threshold"], reference["threshold"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(result["loss"], reference["loss"], rtol=1e-5)
    adaptive = expected["modes"]["adaptive"]
    problem.check_adaptive_decisions(
        problem.sync_pattern(adaptive["sync_count"]), adaptive["phi"], adaptive["threshold"]
    )


# --- a process that fails -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "failing"),
    [("die", 1), ("freeze", 0), ("raise", 1)],
    ids=["worker-dies", "coordinator-freezes", "worker-raises"],
)
def test_a_failing_process_stops_the_others(tmp_path, failure, failing):
    finished, _ = run_group(
        tmp_path,
        ["tests.multihost_worker", "--heartbeat", str(HEARTBEAT_S), "--modes", "base"],
        2,
        per_process={failing: [f"--{failure}-after-steps", "3"]},
        stop=[failing] if failure == "freeze" else [],
    )
    message = report(finished)
    when = re.search(rf"{failure} after step 3 at ([0-9.]+)", finished[failing].output)
    assert when, message
    for survivor in finished:
        if survivor.process_id == failing:
            continue
        assert survivor.returncode not in (0, None), message
        assert any(text in survivor.output for text in FAILURE_MESSAGES), message
        assert "step 20 done" not in survivor.output, message
        seconds = survivor.exit_time - float(when.group(1))
        assert seconds < STOP_WITHIN_S, f"stopped {seconds:.1f} s after the failure\n{message}"
    if failure == "raise":
        assert "Traceback" in finished[failing].output, message
        assert "exits on this error" in finished[failing].output, message


# --- the grokking command line --------------------------------------------------------------


def test_grokking_on_two_processes_and_on_three_devices_equals_one(tmp_path):
    """`experiments/grokking.py` on 2 processes, and on 3 devices (which do not divide
    tiny.toml's batch of 64: padded and masked), gives the metrics of 1 device."""
    grokking = ["experiments.grokking", "--config", "tiny", "--epochs", "2"]
    grokking += ["--ns-dtype", "float32", "--no-early-stop"]
    # Process 1 is started from the JAX_* environment variables and given another
    # output directory: it must write nothing there (nor print the summary).
    finished, single = run_group(
        tmp_path,
        grokking,
        2,
        per_process={i: ["--out", str(tmp_path / f"process-{i}")] for i in range(2)},
        with_flags=False,
        reference=[*grokking, "--quiet", "--out", str(tmp_path / "single")],
    )
    assert all(f.returncode == 0 for f in [*finished, single]), report([*finished, single])
    assert not (tmp_path / "process-1").exists()
    assert "# tiny (jax)" in finished[0].output and "# tiny (jax)" not in finished[1].output
    written = sorted(p.name for p in (tmp_path / "process-0").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "single").iterdir())
    # The script form of the command line, on 3 devices of one process.
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "grokking.py"),
            *grokking[1:],
            *("--devices", "3", "--quiet", "--out", str(tmp_path / "devices-3")),
        ],
        cwd=tmp_path,
        env=environment(local_devices=3),
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
    )

    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("process-0", "devices-3", "single")
    }
    for name in ("process-0", "devices-3"):
        assert len(rows[name]) == len(rows["single"]) == 2
        for got, expected in zip(rows[name], rows["single"]):
            assert got["sync_count"] == expected["sync_count"]
            for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "phi", "threshold"):
                assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (name, key)


def test_vmapped_seeds_split_over_three_devices_equal_one_device(tmp_path):
    """`--seeds 0-2 --seed-mode vmap --devices 3`: each device trains one seed."""
    from experiments import common, grokking, grokking_compare

    command = [sys.executable, "-m", "experiments.grokking", "--config", "tiny", "--seeds", "0-2"]
    command += ["--seed-mode", "vmap", "--devices", "3", "--epochs", "2", "--no-early-stop"]
    command += ["--ns-dtype", "float32", "--quiet", "--out", str(tmp_path / "devices-3")]
    subprocess.run(
        command,
        cwd=ROOT,
        env=environment(local_devices=3),
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    settings = grokking.RunSettings(
        epochs=2,
        early_stop=False,
        ns_dtype="float32",
        quiet=True,
        out_dir=tmp_path / "one" / "tiny",
    )
    config = common.load_config(ROOT / "configs" / "grokking" / "tiny.toml")
    grokking_compare.train_seeds(config, [0, 1, 2], settings, seed_mode="vmap")
    for seed in range(3):
        rows = {
            name: [
                json.loads(line)
                for line in (tmp_path / name / "tiny" / f"seed-{seed}" / "metrics.jsonl").open()
            ]
            for name in ("devices-3", "one")
        }
        assert len(rows["devices-3"]) == len(rows["one"]) == 2
        for got, expected in zip(rows["devices-3"], rows["one"]):
            assert got["sync_count"] == expected["sync_count"]
            for key in ("train_loss", "eval_loss", "eval_acc", "phi"):
                assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (seed, key)


def test_seeds_must_split_evenly_over_devices(tmp_path):
    from experiments import common, grokking, grokking_compare

    config = common.load_config(ROOT / "configs" / "grokking" / "tiny.toml")
    settings = grokking.RunSettings(epochs=1, quiet=True, out_dir=tmp_path, devices=2)
    with pytest.raises(ValueError, match="3 seeds do not split over 2 devices"):
        grokking_compare.train_seeds(config, [0, 1, 2], settings, seed_mode="vmap")


# --- arguments ------------------------------------------------------------------------------


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for name in (distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() == 1
    assert distributed.initialize(num_processes=1, process_id=0) == 1
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.initialize() == 1


@pytest.mark.parametrize(
    ("arguments", "environment_variables", "message"),
    [
        (dict(num_processes=2), {}, "needs a process_id"),
        (dict(num_processes=2, process_id=2), {}, "process_id=2 must be in [0, 2)"),
        (dict(num_processes=1, process_id=1), {}, "process_id=1 must be 0"),
        (dict(num_processes=0), {}, "num_processes=0 must be >= 1"),
        (dict(num_processes=2, process_id=0), {}, "needs a coordinator"),
        (dict(coordinator="localhost", num_processes=2, process_id=0), {}, "HOST:PORT"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
        ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}, "process_id=5"),
        (
            dict(
                coordinator="127.0.0.1:1234",
                num_processes=2,
                process_id=1,
                heartbeat_timeout_seconds=0,
            ),
            {},
            "heartbeat_timeout_seconds=0 must be >= 1",
        ),
    ],
)
def test_initialize_refuses_inconsistent_arguments(
    monkeypatch, arguments, environment_variables, message
):
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment_variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.initialize(**arguments)


def test_one_process_helpers():
    mesh = distributed.parallel.make_mesh(1)
    assert distributed.local_rows(8, mesh) == slice(0, 8)
    batch = distributed.global_batch({"x": np.arange(8.0).reshape(4, 2)}, mesh)
    assert batch["x"].shape == (4, 2) and batch["x"].sharding.spec == distributed.P("data")
    with pytest.raises(ValueError, match=r"leaf \['x'\] of shape \(\)"):
        distributed.global_batch({"x": np.float32(1.0)}, mesh)
    replicated = distributed.replicate({"w": np.ones(3)}, mesh)
    assert replicated["w"].sharding.is_fully_replicated
    distributed.check_identical(replicated, "anything")  # one process: nothing to compare
    distributed.check_shared_directory("/nonexistent")  # one process: nothing to check
