"""Test-session settings.

XLA's CPU backend spends most of a test's time compiling; LLVM's optimization
level 0 compiles two to three times faster and runs the tests' tiny problems
just as well. The tests' torch tensors are tiny and pytest-xdist already runs
one worker per core: one intra-op thread each avoids oversubscribing the cores
(a torch step on 2 contended threads took 15x longer). Subprocesses started by
tests inherit both settings.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
