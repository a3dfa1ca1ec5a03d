"""The wheel holds everything the libraries need: built from the package sources, installed
with ``--no-deps`` into a virtual environment outside the checkout, it runs the README's JAX
example with ``ars2_jax`` imported from the installed wheel."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the wheel is built from; nothing else of the checkout goes into it.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ars2_jax", "ars2_torch")


def readme_jax_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## JAX / Optax\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def run(command: list[str], cwd: pathlib.Path, env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    # No build isolation: the build machines reach no index; setuptools is installed.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), "."], cwd=source)
    (built,) = dist.glob("ars2-*.whl")
    return built


def test_wheel_ships_both_packages_and_their_type_markers(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ars2_jax/__init__.py", "ars2_torch/__init__.py"} <= names
    assert {"ars2_jax/py.typed", "ars2_torch/py.typed"} <= names
    assert not any(name.startswith(("tests/", "experiments/", "models/")) for name in names)


def test_readme_example_runs_from_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        tmp_path,
    )
    python = venv / "bin" / "python"
    site_packages = pathlib.Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
        ).strip()
    )
    if sys.prefix != sys.base_prefix:
        # Run from a virtual environment, whose packages (jax, optax, ...) --system-site-packages
        # does not reach: put its site-packages on the path. A path added by a .pth file does not
        # have its own .pth files run, so an editable install of the checkout stays invisible.
        (site_packages / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    run([*pip, "install", "--no-deps", "--no-index", str(wheel)], tmp_path)

    script = tmp_path / "example.py"
    script.write_text(
        readme_jax_example()
        + "\nimport ars2_jax\nprint('ars2_jax from', ars2_jax.__file__, ars2_jax.__version__)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = run([str(python), "-I", str(script)], cwd=tmp_path, env=env)
    location = pathlib.Path(out.split("ars2_jax from ", 1)[1].split()[0])
    assert location.is_relative_to(site_packages), out
    assert not location.is_relative_to(ROOT), out
    assert "loss " in out
