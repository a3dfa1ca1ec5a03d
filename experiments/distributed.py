"""Training on several processes (one per host) with ``jax.distributed``.

Past one host, JAX runs one process per host; each drives its own devices and
all of them together run one program on *global arrays*, whose mesh
(:func:`experiments.parallel.make_mesh`, over ``jax.devices()``) spans every
process's devices. ARS2-Neo needs nothing more: the params and the optimizer
state are replicated global arrays, the batch is sharded over the mesh, the
gradients XLA computes are global means, so every process computes the same φ,
perturbation and shear force and takes the same sync branch (SPEC §5.1).

What this module adds to :mod:`experiments.parallel`:

* :func:`initialize` starts the distributed runtime (a no-op for one process),
  with the CPU collectives on gloo and a short heartbeat, from arguments or
  environment variables;
* :func:`replicate`: :func:`experiments.parallel.replicate` for any number of
  processes (every process passes the same values: the initial params and
  state, data every process holds);
* :func:`local_rows` and :func:`global_batch`: each process loads only its rows
  of a global batch, and they become one global array;
* :func:`check_identical`: whether a tree is the same in every process (the
  data, the replicated params), through a tiny all-gather of checksums;
* :func:`check_shared_directory`: whether every process sees the same
  directory (multi-process checkpoints need one);
* :func:`is_main_process`: the process that logs and writes files.

When a process dies, the others stop within about ``heartbeat_timeout_seconds``
(JAX's coordination service, not this module): a process waiting in a collective
on the dead one fails at once (gloo: "Connection reset by peer" or "Connection
closed by peer"), and the coordination service, which misses the dead process's
heartbeats, terminates every other process ("Terminating process because the
JAX distributed service detected fatal errors"), blocked or not; that holds for
a process frozen with its sockets open, and for process 0, the coordinator,
too. A process that raises does not die, though: at exit it waits for the others
at JAX's shutdown barrier (up to 300 s) while they wait for it in their next
collective. So :func:`initialize` makes an uncaught exception end the process
at once (``os._exit(1)`` after the traceback is printed), which turns an error
into a death the others notice. A process that hangs while alive (its heartbeats
go on) is not detected.

Example (two processes on one machine; run each line in its own shell)::

  JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 python train.py
  JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 python train.py

where ``train.py`` does::

  from experiments import distributed, parallel
  distributed.initialize()                     # before any other JAX call
  mesh = parallel.make_mesh()                  # every device of every process
  params, opt_state = distributed.replicate((params, tx.init(params)), mesh)
  step = parallel.jit_sharded(parallel.train_step(loss_fn, tx), mesh)
  rows = distributed.local_rows(global_batch_size, mesh)
  for batch in batches:                        # this process's copy of each global batch
      local = {name: value[rows] for name, value in batch.items()}
      params, opt_state, loss = step(params, opt_state, distributed.global_batch(local, mesh))
"""

from __future__ import annotations

import itertools
import os
import pathlib
import secrets
import sys
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import parallel

# jax.distributed.initialize reads JAX_COORDINATOR_ADDRESS itself, but the process
# count and id only from a cluster it detects (Slurm, MPI, TPU, ...); for a cluster
# it cannot detect (two machines started by hand) we read these two.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# JAX's defaults are 100 s and 300 s: a process would wait 100 s for a dead peer.
HEARTBEAT_TIMEOUT_S = 10
INITIALIZATION_TIMEOUT_S = 120  # processes started by hand on several machines


def _from_env(value: int | None, name: str) -> int | None:
    if value is not None or not os.environ.get(name):
        return value
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} must be an integer") from None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_S,
    initialization_timeout: int = INITIALIZATION_TIMEOUT_S,
    exit_on_error: bool = True,
) -> int:
    """Joins this process to a multi-process JAX run; a no-op for one process.

    Call it first, before anything touches a JAX device. Every argument left
    ``None`` comes from the environment: ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. With no process count anywhere,
    or a count of 1, nothing is initialized and the run is an ordinary
    single-process one. Otherwise the CPU collectives go through gloo (XLA's CPU
    backend has no other cross-process transport; GPU and TPU use their own)
    and ``jax.distributed.initialize`` connects to the coordinator, which process
    0 starts on the coordinator's port.

    Args:
      coordinator: ``HOST:PORT`` of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      heartbeat_timeout_seconds: a process silent for this long counts as dead,
        and the others are terminated (JAX's default is 100 s).
      initialization_timeout: how long to wait for every process to connect.
      exit_on_error: install a ``sys.excepthook`` that prints an uncaught
        exception and ends the process with ``os._exit(1)``, skipping the exit
        handlers (JAX's shutdown barrier among them), so that the other
        processes stop within the heartbeat timeout instead of waiting for it.

    Returns:
      The number of processes.

    Raises:
      ValueError: an argument (or environment variable) is missing, not an
        integer, or inconsistent with the others.
    """
    num_processes = _from_env(num_processes, ENV_NUM_PROCESSES)
    process_id = _from_env(process_id, ENV_PROCESS_ID)
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"process_id={process_id} must be 0 for a single process")
        return 1
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if process_id is None:
        raise ValueError(f"num_processes={num_processes} needs a process_id (or {ENV_PROCESS_ID})")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
    if coordinator is None:
        raise ValueError(
            f"num_processes={num_processes} needs a coordinator HOST:PORT (or {ENV_COORDINATOR})"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator={coordinator!r} must be HOST:PORT")
    for name, seconds in (
        ("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
        ("initialization_timeout", initialization_timeout),
    ):
        if seconds < 1:
            raise ValueError(f"{name}={seconds} must be >= 1")
    if jax.distributed.is_initialized():
        raise ValueError("jax.distributed is already initialized in this process")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout,
    )
    if exit_on_error:
        sys.excepthook = _exit_after(sys.excepthook)
    return num_processes


def _exit_after(excepthook):
    def hook(kind, value, traceback):
        excepthook(kind, value, traceback)
        print(
            f"process {jax.process_index()} exits on this error: the other processes stop "
            f"when they miss its heartbeats",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    return hook


def is_main_process() -> bool:
    """Whether this process is process 0, the one that logs and writes outputs."""
    return jax.process_index() == 0


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A full copy of every leaf of ``tree`` on every device of ``mesh``, in every process.

    With one process, :func:`experiments.parallel.replicate`. With several, every
    process passes its own copy of the same values; each places it on its own
    devices (no transfer between processes), and :func:`check_identical`
    verifies that the copies agree. ``jax.device_put`` would check that too, but
    with an all-gather of every leaf (one compilation per shape), and it refuses
    typed PRNG keys; this handles them, and Python scalars become arrays as with
    ``device_put``.

    Raises:
      RuntimeError: the processes passed different values.
    """
    if jax.process_count() == 1:
        return parallel.replicate(tree, mesh)
    check_identical(tree, "the values to replicate")
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def local_rows(global_size: int, mesh: Mesh, axis_name: str = parallel.DATA_AXIS) -> slice:
    """The rows of a global batch of ``global_size`` examples that this process loads.

    They are the rows that the devices of this process hold when the batch is
    split over ``axis_name`` (contiguous, one block per process, for a mesh
    from :func:`experiments.parallel.make_mesh`). With one process: all rows.

    Raises:
      ValueError: ``global_size`` is not divisible by the axis size, or this
        process's rows are not one contiguous block.
    """
    size = mesh.shape[axis_name]
    if global_size % size:
        raise ValueError(
            f"global_size={global_size} must be divisible by the {size} devices of "
            f"axis {axis_name!r}"
        )
    sharding = NamedSharding(mesh, P(axis_name))
    indices = sharding.addressable_devices_indices_map((global_size,)).values()
    blocks = sorted({(rows.start or 0, rows.stop or global_size) for (rows,) in indices})
    if any(stop != start for (_, stop), (start, _) in itertools.pairwise(blocks)):
        raise ValueError(f"this process's rows {blocks} of axis {axis_name!r} are not contiguous")
    return slice(blocks[0][0], blocks[-1][1])


def global_batch(local_batch: Any, mesh: Mesh, axis_name: str = parallel.DATA_AXIS) -> Any:
    """One global batch, split over ``axis_name``, from every process's own rows.

    Each process passes the rows :func:`local_rows` names (the same number in
    every process); the result is a global array per leaf whose leading
    dimension is the sum over processes. With one process it places the batch
    as :func:`experiments.parallel.shard_batch` does.

    Raises:
      ValueError: a leaf's leading dimension is not divisible by this process's
        devices on ``axis_name``.
    """
    sharding = NamedSharding(mesh, P(axis_name))
    local_devices = len(mesh.local_devices)
    for path, leaf in jax.tree_util.tree_leaves_with_path(local_batch):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % local_devices:
            raise ValueError(
                f"local batch leaf {jax.tree_util.keystr(path)} of shape {np.shape(leaf)} must "
                f"have a leading dimension divisible by this process's {local_devices} devices"
            )
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, leaf), local_batch
    )


def check_identical(tree: Any, what: str) -> None:
    """Raises if ``tree`` is not the same, bit for bit, in every process.

    Compares a CRC-32 checksum per leaf through one all-gather (a few bytes, not
    the data). Leaves are host arrays or fully replicated global arrays (this
    process's copy is checked). Every process must call it with the same
    structure; a no-op with one process.

    Raises:
      RuntimeError: naming ``what``, the leaves that differ, and their checksums
        per process.
    """
    if jax.process_count() == 1:
        return
    paths, checksums = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        data = np.ascontiguousarray(np.asarray(leaf))
        paths.append(jax.tree_util.keystr(path))
        checksums.append(zlib.crc32(data.tobytes()) ^ zlib.crc32(repr(data.shape).encode()))
    local = np.asarray(checksums, np.uint32).view(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(local)).view(np.uint32)
    differ = [i for i in range(len(paths)) if len(set(gathered[:, i])) > 1]
    if differ:
        lines = [
            f"  {paths[i]}: CRC-32 per process {list(map(int, gathered[:, i]))}" for i in differ
        ]
        raise RuntimeError(f"{what} differ between processes:\n" + "\n".join(lines))


def check_shared_directory(directory: str | os.PathLike) -> None:
    """Raises unless every process sees ``directory`` as process 0 does.

    Multi-process checkpoints (Orbax) are written by every process into one
    directory, so on several machines it must be on a shared filesystem. Process 0
    writes a random token into the directory; every process reads it back. A
    no-op with one process.

    Raises:
      ValueError: naming the processes that do not see process 0's file.
    """
    if jax.process_count() == 1:
        return
    marker = pathlib.Path(directory) / ".ars2-shared-directory-check"
    if is_main_process():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(secrets.randbits(31)))
    multihost_utils.sync_global_devices("check_shared_directory")
    try:
        seen = int(marker.read_text())
    except (OSError, ValueError):
        seen = -1
    tokens = np.asarray(multihost_utils.process_allgather(np.int32(seen))).ravel()
    if is_main_process():
        marker.unlink()
    blind = [process for process, token in enumerate(tokens) if token != tokens[0]]
    if blind:
        raise ValueError(
            f"directory={str(directory)!r} is not shared: processes {blind} do not see the file "
            "process 0 wrote there; multi-process checkpoints need a directory every process "
            "sees (a shared filesystem)"
        )
