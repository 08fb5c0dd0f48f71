"""`compress compare`: two real profiles (and two run reports) figure by figure, and --max-regression's exit 3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from compress.core import InputError
from compress.report import changes, parse_limit
from compress.report import regression as compare_schema


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def profiles(tmp_path_factory, matmul_onnx) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cmp")
    model = matmul_onnx(d / "m.onnx", rows=64, width=512)
    out = []
    for name in ("a.json", "b.json"):
        r = _cli("profile", str(model), "--runs", "50", "--json", str(d / name))
        assert r.returncode == 0, r.stderr
        out.append(d / name)
    return out[0], out[1]


def _slower(src: Path, dst: Path, factor: float) -> Path:
    doc = json.loads(src.read_text())
    doc["latency_ms"] = {k: v * factor for k, v in doc["latency_ms"].items()}
    doc["spread"]["p50_ci_ms"] = [v * factor for v in doc["spread"]["p50_ci_ms"]]
    dst.write_text(json.dumps(doc))
    return dst


def test_two_real_profiles_compare_and_a_slowdown_is_caught(profiles, tmp_path):
    a, b = profiles
    same = _cli("compare", str(a), str(a), "--max-regression", "5%")
    assert same.returncode == 0, same.stderr
    two = _cli("compare", str(a), str(b), "--json", "-")  # no limit: the figures, never an exit 3
    assert two.returncode == 0, two.stderr
    assert {f["figure"] for f in json.loads(two.stdout)["figures"]} == {"p50", "p99", "peak RSS"}
    slow = _slower(a, tmp_path / "slow.json", 2.0)  # outside any CI a 1 ms MatMul gets here
    r = _cli("compare", str(a), str(slow), "--max-regression", "5%", "--json", "-")
    assert r.returncode == 3, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, json.loads(compare_schema.SCHEMA_FILE.read_text()))  # as a CI user would check it
    figs = {f["figure"]: f for f in doc["figures"]}
    assert doc["kind"] == "profile" and figs["p50"]["regressed"] and figs["p99"]["regressed"]
    assert figs["peak RSS"]["regressed"] is False
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "regressed 2 figures beyond --max-regression 5.0%" in line and "p50 " in line
    faster = _cli("compare", str(slow), str(a), "--max-regression", "5%")  # the other way is an improvement
    assert faster.returncode == 0, faster.stderr


def test_a_p50_within_both_confidence_intervals_is_noise(profiles):
    a, _ = profiles
    old = json.loads(a.read_text())
    new = json.loads(a.read_text())
    lo, hi = old["spread"]["p50_ci_ms"]
    new["latency_ms"]["p50"] = hi  # the top of the old interval: worse, but not outside the measurement's noise
    new["spread"]["p50_ci_ms"] = [lo, hi * 1.01]
    kind, figs = changes(old, new, "a", "b")
    p50 = next(c for c in figs if c.figure == "p50")
    assert p50.worse and p50.noise and not p50.regressed(0.0)


def test_run_reports_compare_per_variant(tmp_path):
    out = tmp_path / "run"
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--device", "host", "--quant", "int8",
             "--no-op-select", "--runs", "5", "--no-tune-threads", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    worse = json.loads(json.dumps(rep))
    for v in worse["variants"]:
        if v["name"] == "int8":
            v["speedup_vs_fp32"] = v["speedup_vs_fp32"] * 0.5
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    r = _cli("compare", str(out), str(tmp_path / "worse.json"), "--max-regression", "10%", "--json", "-")
    assert r.returncode == 3, r.stderr
    figs = {f["figure"]: f for f in json.loads(r.stdout)["figures"]}
    assert figs["int8 speedup"]["regressed"] and figs["int8 speedup"]["change"] == pytest.approx(-0.5)
    assert not figs["fp32 p50"]["regressed"]


def test_bad_inputs_are_one_line_errors(profiles, tmp_path):
    a, _ = profiles
    (tmp_path / "other.json").write_text(json.dumps({"schema": "edge-compress/report/1", "variants": []}))
    r = _cli("compare", str(a), str(tmp_path / "other.json"))
    assert r.returncode == 1 and "compare two profiles or two run reports" in r.stderr
    r = _cli("compare", str(a), str(a), "--max-regression", "lots")
    assert r.returncode == 2 and "--max-regression lots" in r.stderr
    with pytest.raises(InputError, match="schema"):
        changes({"schema": "x"}, {}, "x.json", "y.json")
    assert parse_limit("5%") == pytest.approx(0.05) and parse_limit("0.05") == pytest.approx(0.05)
