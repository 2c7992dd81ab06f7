"""Dependencies point one way: import-linter's contracts in pyproject.toml hold, and they cover every
package of nasdsl, so a new package cannot slip past them."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import nasdsl

ROOT = Path(__file__).resolve().parents[1]


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_package_is_in_a_layer():
    layered = {name.strip() for c in contracts() if c["type"] == "layers" for layer in c["layers"]
               for name in layer.split("|")}
    shared = {m for c in contracts() if c["type"] == "forbidden" for m in c["source_modules"]}
    package = Path(nasdsl.__file__).parent
    modules = {f"nasdsl.{p.name}" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules |= {f"nasdsl.{p.stem}" for p in package.glob("*.py") if not p.stem.startswith("_")}
    assert modules - layered - shared == set()


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_stage_importing_a_later_one_is_caught(tmp_path):
    """The contract is live: a copy of the package where the graph imports the pipeline fails it."""
    import shutil

    copy = tmp_path / "nasdsl"
    shutil.copytree(Path(nasdsl.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "graph" / "ir.py", "a") as f:
        f.write("\nimport nasdsl.pipeline.runner  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode != 0 and "nasdsl.graph is not allowed to import nasdsl.pipeline" in proc.stdout, proc.stdout
