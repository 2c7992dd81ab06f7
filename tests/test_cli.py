"""`nasdsl show`: the per-layer table with its totals line, and the `--json` contract scripts rely on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nasdsl import cli
from nasdsl.graph.accounting import summary
from nasdsl.language.compiler import compile_file

ROOT = Path(__file__).resolve().parent.parent
PROXYLESS = ROOT / "spaces" / "proxyless.space"
TINY = """space tiny(input=3, resolution=8, classes=10)
param width = 1.0
let ch(c) = make_divisible(c * width, 4)
layer stem [gate=off] = conv(ch(8), k=3) > bn > relu
stage s [repeat=2, stride=2] { layer = mbconv(ch(8), k=k, e=3) for k in [3, 5] }
layer classifier = gap > linear(classes)
"""


def show(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["show", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.space"
    path.write_text(TINY)
    return path


def show_json(capsys, *args) -> dict:
    rc, out, err = show(capsys, *args, "--json")
    assert rc == 0 and err == ""
    assert out.endswith("\n") and out.count("\n") == 1      # one JSON object, one line
    return json.loads(out)


# ---- the table ---------------------------------------------------------------------------------------
def test_table_lists_every_layer_and_the_totals(capsys, tiny):
    rc, out, err = show(capsys, tiny)
    assert rc == 0 and err == ""
    lines = out.rstrip("\n").split("\n")
    assert lines[0].split() == ["layer", "blocks", "in", "out", "gates", "params", "FLOPs"]
    names = [line.split()[0] for line in lines[1:-2]]
    assert names == ["stem", "s.0", "s.1", "classifier"]
    assert lines[-2] == ""
    info = summary(compile_file(tiny))
    assert lines[-1] == (f"tiny: {info['params']:,} params, {info['flops']:,} FLOPs (MACs), {info['gates']:,} gated "
                         f"channels in {info['gate_groups']} groups, search space 10^{info['log10_space_size']:.1f}")


def test_table_rows(capsys, tiny):
    _, out, _ = show(capsys, tiny)
    rows = {line.split()[0]: line for line in out.splitlines()[1:-2]}
    assert "conv 8 k3 > bn > relu" in rows["stem"] and "3x8x8" in rows["stem"] and "8x8x8" in rows["stem"]
    assert " - " in rows["stem"]                                     # no gates in the stem
    assert "2x: mbconv 8 k3 e3 s2 | mbconv 8 k5 e3 s2" in rows["s.0"] and "8x4x4" in rows["s.0"]
    assert "(+residual)" in rows["s.1"] and "(+residual)" not in rows["s.0"]
    assert "gap > linear 10" in rows["classifier"]


def test_table_of_proxyless(capsys):
    _, out, _ = show(capsys, PROXYLESS)
    names = [line.split()[0] for line in out.splitlines()[1:-2]]
    assert names == ["stem", "first", *(f"s{s}.{i}" for s in range(1, 6) for i in range(4)), "s6.0", "head",
                     "classifier"]
    assert out.splitlines()[-1].startswith("proxyless: 16,034,168 params, ")
    assert all(len(line) < 200 for line in out.splitlines())          # long block lists are cut


# ---- --json --------------------------------------------------------------------------------------------
def test_json_contract(capsys, tiny):
    info = show_json(capsys, tiny)
    assert info["name"] == "tiny"
    for key, kind in [("params", int), ("flops", int), ("gates", int), ("log10_space_size", float),
                      ("layers", list)]:
        assert isinstance(info[key], kind) and not isinstance(info[key], bool), key
    assert [layer["name"] for layer in info["layers"]] == ["stem", "s.0", "s.1", "classifier"]
    for layer in info["layers"]:
        for key, kind in [("name", str), ("blocks", int), ("out_channels", int), ("flops", int), ("params", int)]:
            assert isinstance(layer[key], kind) and not isinstance(layer[key], bool), (layer["name"], key)
    assert [layer["blocks"] for layer in info["layers"]] == [1, 2, 2, 1]
    assert [layer["out_channels"] for layer in info["layers"]] == [8, 8, 8, 10]


def test_json_totals_are_the_sum_of_the_layers(capsys, tiny):
    info = show_json(capsys, tiny)
    assert info["params"] == sum(layer["params"] for layer in info["layers"])
    assert info["flops"] == sum(layer["flops"] for layer in info["layers"])
    assert info["gates"] == sum(layer["gates"] for layer in info["layers"]) > 0
    assert info["log10_space_size"] == pytest.approx(info["gates"] * 0.30102999566398)


def test_json_matches_the_library(capsys):
    info = show_json(capsys, PROXYLESS)
    assert info == json.loads(json.dumps(summary(compile_file(PROXYLESS))))
    assert (info["params"], info["flops"], info["gates"]) == (16_034_168, 2_260_347_776, 60_704)
    assert info["log10_space_size"] == pytest.approx(18273.7, abs=0.05)


# ---- --set ---------------------------------------------------------------------------------------------
def test_set_width_reduces_params(capsys):
    full = show_json(capsys, PROXYLESS)
    half = show_json(capsys, PROXYLESS, "--set", "width=0.5")
    assert half["params"] < full["params"] and half["flops"] < full["flops"] and half["gates"] < full["gates"]
    assert half["parameters"]["width"] == 0.5
    stem = {layer["name"]: layer for layer in half["layers"]}["stem"]
    assert stem["out_channels"] == 16


def test_set_header_fields_and_several_sets(capsys):
    info = show_json(capsys, PROXYLESS, "--set", "classes=100", "--set", "resolution=112")
    assert info["layers"][-1]["out_channels"] == 100
    assert info["input"] == [3, 112, 112]
    assert info["layers"][0]["out_shape"] == [32, 56, 56]


def test_set_on_the_table(capsys, tiny):
    rc, out, _ = show(capsys, tiny, "--set", "width=2")
    assert rc == 0 and "16x8x8" in out.splitlines()[1]


def test_bad_set_is_one_line(capsys, tiny):
    rc, out, err = show(capsys, tiny, "--set", "widht=2")
    assert rc == 2 and out == ""
    assert err == f"--set widht=2: unknown parameter 'widht' in {tiny} (did you mean 'width'?)\n"
    rc, out, err = show(capsys, tiny, "--json", "--set", "ch=2")
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("--set ch=2: 'ch'")


# ---- as a program ----------------------------------------------------------------------------------------
def test_show_as_a_subprocess(tiny):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "nasdsl", "show", str(tiny), "--json"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert json.loads(r.stdout)["name"] == "tiny"
    r = subprocess.run([sys.executable, "-m", "nasdsl", "show", str(tiny), "--set", "width=1e17"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{tiny}:4:30: conv: out must be at most 1,000,000, got 800000000000000000\n")


def test_check_every_shipped_space(capsys):
    paths = sorted((ROOT / "spaces").glob("*.space"))
    assert cli.main(["check", *map(str, paths)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines() == [f"{p}: ok" for p in paths]
