"""Test-session settings.

XLA's CPU backend spends most of a test's time compiling; LLVM's optimization
level 0 compiles two to three times faster and runs the tests' tiny problems
just as well. The tests' torch tensors are tiny and pytest-xdist already runs
one worker per core: one intra-op thread each avoids oversubscribing the cores
(a torch step on 2 contended threads took 15x longer). Subprocesses started by
tests inherit both settings.
"""

import os
import pathlib
import subprocess
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()


@pytest.fixture
def offline_command(tmp_path):
    """Runs ``python -m <module> <args>`` as on a fresh install with no network.

    The Hugging Face caches are empty (``HF_HOME`` under ``tmp_path / "hf"``) and
    the hub is unreachable (``HF_HUB_OFFLINE``), which ``datasets`` reports at once
    instead of after its retries. Returns the ``subprocess.CompletedProcess``.
    """

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
        env["HF_DATASETS_OFFLINE"] = "1"
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )

    return run
