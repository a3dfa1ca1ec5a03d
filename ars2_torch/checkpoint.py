"""Atomic checkpoints for PyTorch runs: ``torch.save`` to a temporary file, then ``os.replace``.

:func:`save` writes one file; :func:`save_step` numbers the checkpoints of a run in
a directory and keeps the last few; :func:`load` reads a file, or a directory's
latest checkpoint, and says clearly when it is missing, truncated or corrupt.

An object with a ``state_dict`` method (a module, an optimizer such as
:class:`ars2_torch.ARS2Neo`, a scheduler) is stored as its ``state_dict()``: hand
the loaded entry back to its ``load_state_dict``. ``ARS2Neo.load_state_dict``
refuses the state of another configuration (other SAM settings, other tensor
shapes) with a ``ValueError``.

A failed or killed save never touches the previous checkpoints: the data go to a
temporary file beside the target, flushed to disk, which then replaces the
target in one ``os.replace``. What a killed save leaves behind is a hidden
``.*.tmp`` file, which :func:`save_step` removes on its next call.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import pathlib
import pickle
import re
import tempfile
import zipfile
from typing import Any

import torch

__all__ = ["all_steps", "load", "save", "save_step"]

CHECKPOINT_NAME = "checkpoint_{step:08d}.pt"
_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pt")
_TEMPORARY = re.compile(r"\.checkpoint_\d+\.pt\..*\.tmp")


def _fsync_directory(directory: pathlib.Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(path: str | os.PathLike, /, **objects: Any) -> pathlib.Path:
    """Writes ``objects`` (a dict of them) to ``path`` with ``torch.save``, atomically.

    Args:
      path: the file to write; its directory must exist. An existing file is
        replaced only once the new one is complete.
      **objects: what to store; objects with a ``state_dict`` method are stored as
        their ``state_dict()``.

    Returns:
      ``path``.

    Example:
      >>> import tempfile, pathlib, torch
      >>> from ars2_torch import ARS2Neo, checkpoint
      >>> model = torch.nn.Linear(3, 2)
      >>> opt = ARS2Neo(model.parameters(), lr=1e-2)
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.pt"
      >>> _ = checkpoint.save(path, model=model, optimizer=opt, epoch=4)
      >>> loaded = checkpoint.load(path)
      >>> model.load_state_dict(loaded["model"]); opt.load_state_dict(loaded["optimizer"])
      <All keys matched successfully>
      >>> loaded["epoch"]
      4
    """
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: directory {path.parent} does not exist")
    payload = {
        name: value.state_dict() if callable(getattr(value, "state_dict", None)) else value
        for name, value in objects.items()
    }
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)
    return path


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the checkpoints :func:`save_step` wrote in ``directory``, increasing.

    Args:
      directory: a directory written by :func:`save_step`.

    Returns:
      The steps, increasing.

    Raises:
      FileNotFoundError: ``directory`` does not exist.

    Example:
      >>> import tempfile, torch
      >>> from ars2_torch import checkpoint
      >>> directory = tempfile.mkdtemp()
      >>> for epoch in (1, 2, 3):
      ...     _ = checkpoint.save_step(directory, epoch, keep=2, weights=torch.ones(2) * epoch)
      >>> checkpoint.all_steps(directory)
      [2, 3]
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    return sorted(
        int(match.group(1)) for match in map(_CHECKPOINT.fullmatch, os.listdir(directory)) if match
    )


def save_step(
    directory: str | os.PathLike, step: int, /, *, keep: int | None = None, **objects: Any
) -> pathlib.Path:
    """Writes checkpoint ``step`` of a run into ``directory`` (see :func:`save`).

    The file is ``directory/checkpoint_<step>.pt``. Once it is complete, the
    checkpoints beyond the ``keep`` latest are deleted, and so are the temporary
    files of saves that were killed.

    Args:
      directory: the run's checkpoint directory (created if needed).
      step: the checkpoint's number (for example the epoch); must be larger than
        every checkpoint already in ``directory``.
      keep: how many checkpoints to keep; ``None`` keeps all.
      **objects: what to store, as in :func:`save`.

    Returns:
      The path written.

    Example:
      >>> import tempfile, torch
      >>> from ars2_torch import ARS2Neo, checkpoint
      >>> model = torch.nn.Linear(3, 2)
      >>> opt = ARS2Neo(model.parameters(), lr=1e-2)
      >>> directory = tempfile.mkdtemp()
      >>> checkpoint.save_step(directory, 10, model=model, optimizer=opt, epoch=10).name
      'checkpoint_00000010.pt'
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer")
    step = int(step)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep={keep!r} must be None or an integer >= 1")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    steps = all_steps(directory)
    if steps and step <= steps[-1]:
        raise ValueError(
            f"step={step} must be after the latest checkpoint in {directory}, step {steps[-1]}"
        )
    # One writer per directory: a temporary file here is what a killed save left.
    for name in os.listdir(directory):
        if _TEMPORARY.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)
    path = save(directory / CHECKPOINT_NAME.format(step=step), **objects)
    if keep is not None:
        for old in all_steps(directory)[:-keep]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / CHECKPOINT_NAME.format(step=old))
    return path


def _check_archive(path: pathlib.Path) -> None:
    """``torch.load`` does not verify the archive's CRC-32s; a flipped byte would load."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"checkpoint {path} is truncated or corrupt: it is not a torch.save archive"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"checkpoint {path} is truncated or corrupt: {error}") from error
    if bad is not None:
        raise ValueError(f"checkpoint {path} is corrupt: record {bad} fails its CRC-32 check")


def load(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    map_location: Any = None,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save` or :func:`save_step`.

    Args:
      path: a file, or a directory of :func:`save_step` checkpoints.
      step: with a directory, the checkpoint to read; ``None``: the latest.
      map_location: passed to ``torch.load``.
      weights_only: passed to ``torch.load``: ``True`` (the default) unpickles
        tensors, containers and plain Python values only, not arbitrary objects;
        pass ``False`` for a trusted file holding other objects.

    Returns:
      The dict of stored objects.

    Raises:
      FileNotFoundError: the file or directory does not exist, the directory holds
        no checkpoint, or not the requested ``step``.
      ValueError: the file is truncated or corrupt.

    Example:
      >>> import tempfile, torch
      >>> from ars2_torch import checkpoint
      >>> directory = tempfile.mkdtemp()
      >>> for epoch in (1, 2):
      ...     _ = checkpoint.save_step(directory, epoch, weights=torch.full((2,), float(epoch)))
      >>> checkpoint.load(directory)["weights"], checkpoint.load(directory, step=1)["weights"]
      (tensor([2., 2.]), tensor([1., 1.]))
    """
    path = pathlib.Path(path)
    if path.is_dir():
        steps = all_steps(path)
        if not steps:
            raise FileNotFoundError(f"checkpoint directory {path} holds no checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{path} holds no checkpoint {step=}; it holds {steps}")
        path = path / CHECKPOINT_NAME.format(step=step)
    elif step is not None:
        raise ValueError(f"step={step} needs a directory, but {path} is not one")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise  # Not corruption: the file holds objects weights_only refuses.
        raise ValueError(f"checkpoint {path} is corrupt: {error}") from error
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"checkpoint {path} is truncated or corrupt: {type(error).__name__}: {error}"
        ) from error
