"""Packaging: the wheel installs one import root, ``mnemo``, and coexists with a user's own ``models``.

The repository keeps models/, training/, service/ and benchmarks/ at its top; setuptools maps them to
mnemo.models, mnemo.training, ... (pyproject's package-dir). These tests build the real wheel and
install it into a fresh virtual environment, as a user's ``pip install`` would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, ROOT]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out)
    (built,) = out.glob("mnemo-*.whl")
    return built


def test_wheel_has_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"mnemo"}
    for sub in ("models/memory", "training", "service", "benchmarks"):
        assert f"mnemo/{sub}/__init__.py" in names
    assert "mnemo/service/static/index.html" in names  # package data travels with the mapped folder


def test_installed_wheel_beside_a_foreign_models_package(wheel: Path, tmp_path: Path) -> None:
    """A user's own top-level ``models`` neither shadows ours nor is shadowed by it."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # Dependencies come from this interpreter's site-packages; the package itself only from the wheel.
    fresh_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(fresh_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel]
    subprocess.run(install, check=True, capture_output=True)
    user = tmp_path / "user_code"
    (user / "models").mkdir(parents=True)
    (user / "models" / "__init__.py").write_text("WHO = 'the user'\n")
    env = {**os.environ, "PYTHONPATH": str(user)}

    listed = subprocess.run(
        [env_dir / "bin" / "mnemo", "models"], cwd=user, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert "memorizer" in listed.stdout and "daad" in listed.stdout

    both = subprocess.run(
        [python, "-c", "import models, mnemo.models as m; print(models.WHO, m.__file__)"],
        cwd=user, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert both.returncode == 0, both.stderr
    who, path = both.stdout.rsplit(" ", 1)
    assert who == "the user"
    assert Path(path.strip()).is_relative_to(fresh_site), "mnemo.models must come from the installed wheel"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_installs_torch_again_only_when_a_given_torch_differs_from_the_venvs(tmp_path):
    """``make install TORCH=...`` swaps the build in an existing .venv; later plain ``make`` keeps it."""
    venv_dir = tmp_path / "venv"
    venv_dir.mkdir()
    (venv_dir / ".installed").touch()  # newer than pyproject.toml: installed

    def plan(*args: str) -> str:
        cmd = ["make", "-n", "-C", str(ROOT), f"VENV={venv_dir}", "install", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    assert "pip install" not in plan()  # a .venv without .torch holds the default
    assert 'pip install --quiet "torch==9.9"' in plan("TORCH=torch==9.9")
    (venv_dir / ".torch").write_text("torch==9.9\n")
    assert "pip install" not in plan()  # plain make keeps the build installed
    assert "pip install" not in plan("TORCH=torch==9.9")
    assert 'pip install --quiet "torch==2.13.0"' in plan("TORCH=torch==2.13.0")
