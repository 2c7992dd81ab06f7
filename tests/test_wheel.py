"""The package works from a regular (non-editable) wheel install: the shipped recipes are package data.

An editable install or a checkout on sys.path finds `nasdsl/recipes/*.yaml` whether or not the wheel
carries them, so only a real wheel, installed into a fresh folder and imported from outside the
checkout, shows that users who `pip install nasdsl` get the recipes too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from; the copy keeps the build's own files (build/, *.egg-info) out of the checkout,
# which other runs and engineers share.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "nasdsl")

CHECK = """
import sys
from pathlib import Path
import nasdsl, nasdsl.recipe as recipe
site = Path(sys.argv[1]).resolve()
assert Path(nasdsl.__file__).resolve().is_relative_to(site), nasdsl.__file__
assert recipe.load_recipe().name == "cpu"
assert recipe.load_recipe("resnet56_cifar").batch_size == 64
shipped = sys.argv[2].split(",")
assert recipe.available_recipes() == shipped, recipe.available_recipes()
assert [name for name, _ in recipe.describe_recipes()] == shipped
assert all(line for _, line in recipe.describe_recipes())
print("ok", len(shipped))
"""


def _copy_sources(dest: Path) -> None:
    """The files a wheel is built from, without caches, venvs or earlier build output."""
    dest.mkdir()
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            shutil.copy2(source, dest / name)


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows its output, which pip otherwise keeps to itself."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_install_ships_the_recipes(tmp_path):
    source, wheels, site, elsewhere = (tmp_path / d for d in ("src", "wheels", "site", "elsewhere"))
    _copy_sources(source)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "-w", str(wheels), str(source))
    (wheel,) = wheels.glob("nasdsl-*.whl")
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel))
    assert list((site / "nasdsl" / "recipes").glob("*.yaml")), "the wheel carries no recipes (package data)"

    shipped = sorted(p.stem for p in (ROOT / "nasdsl" / "recipes").glob("*.yaml"))
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)
    result = _run(sys.executable, "-c", CHECK, str(site), ",".join(shipped), cwd=elsewhere, env=env)
    assert result.stdout.split() == ["ok", str(len(shipped))]
    # the command line of the installed wheel, from outside the checkout: a dry run, then a short
    # search with the default recipe (a copy of the shipped space; the checkout's spaces/ is not used)
    space = elsewhere / "proxyless.space"
    shutil.copy(ROOT / "spaces" / "proxyless.space", space)
    env["OMP_NUM_THREADS"] = "1"
    cli = [sys.executable, "-c", "import sys, nasdsl.cli; assert nasdsl.cli.__file__.startswith(sys.argv[1]); "
                                 "sys.argv[1:2] = []; sys.exit(nasdsl.cli.main())", str(site)]
    plan = json.loads(_run(*cli, "search", "proxyless.space", "--dry-run", "--json", cwd=elsewhere, env=env).stdout)
    assert plan["recipe"] == "cpu" and plan["data"] == "digits"
    _run(*cli, "search", "proxyless.space", "-q", "--set", "width=0.25", "--set", "weights.epochs=1",
         "--set", "architecture.epochs=1", "--set", "finetune.epochs=1", cwd=elsewhere, env=env)
    summary = json.loads((elsewhere / "runs" / "proxyless" / "summary.json").read_text())
    assert summary["derived"]["top1"] > 0 and (elsewhere / "runs" / "proxyless" / "model" / "config.json").is_file()
