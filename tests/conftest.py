"""Test-session settings.

XLA's CPU backend spends most of a test's time compiling; LLVM's optimization
level 0 compiles two to three times faster and runs the tests' tiny problems
just as well. Subprocesses started by tests inherit the setting.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
