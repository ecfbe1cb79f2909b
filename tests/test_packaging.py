"""Packaging: the wheel ships every module and the built-in recipes, and an installed copy finds them.

The wheel is built from a copy of the source tree (so nothing is written into the checkout) without
build isolation (offline, the installed setuptools), installed into a fresh virtual environment that
sees the system site-packages (torch, transformers, ...), and run from a folder outside the source
tree: ``hfptq recipes`` must list the recipes shipped in the package, not the checkout's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hfptq", src / "hfptq", ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=src)
    return next(out.glob("hfptq-*.whl"))


def test_wheel_holds_every_module_and_the_builtin_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hfptq").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()  # a package missing from pyproject's list would drop its modules
    assert RECIPES and {f"hfptq/builtin_recipes/{name}" for name in RECIPES} <= names


def test_installed_wheel_lists_its_recipes_outside_the_source_tree(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # no pip inside the venv (ensurepip is slow): this interpreter's pip installs into it
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], check=True)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    # one interpreter start (importing hfptq costs seconds): where the recipes come from, then the command
    script = ("import sys, hfptq.recipes as r; print(r.builtin_recipes_dir()); "
              "from hfptq.cli import main; sys.exit(main(['recipes']))")
    done = subprocess.run([str(bin_dir / "python"), "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    where, *lines = done.stdout.splitlines()
    assert Path(where).is_relative_to(env_dir) and Path(where).name == "builtin_recipes", where
    assert [line.split()[0] for line in lines] == [Path(n).stem for n in RECIPES]
    assert (bin_dir / "hfptq").is_file()  # the console script of the installed copy
