"""`compress quantize`: presets, held-out fidelity, fallback report, FP8 refusal and simulation."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    r = _cli("export", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "-o", str(d / "m.onnx"))
    assert r.returncode == 0, r.stderr
    return d / "m.onnx"


def test_int8_report_and_model(cnn, tmp_path):
    out = tmp_path / "m.int8.onnx"
    r = _cli("quantize", str(cnn), "--to", "int8", "--device", "host", "--json", "-", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["format"] == "int8" and rep["simulated"] is False
    assert rep["preset"]["name"].startswith("U8S8")  # the host has AVX-512 VNNI or AVX2: U8S8 either way
    assert rep["fidelity"]["cosine_mean"] > 0.98 and rep["speedup_vs_fp32"] > 0
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops or "QLinearConv" in ops
    assert "synthetic" in r.stderr  # uncalibrated scales are never silent


def test_fp8_needs_hardware_or_simulate(cnn, tmp_path):
    r = _cli("quantize", str(cnn), "--to", "fp8", "--device", "host", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "no FP8 hardware" in r.stderr and "--to int8" in r.stderr
    assert not (tmp_path / "x.onnx").exists()
    r = _cli("quantize", str(cnn), "--to", "fp8", "--simulate", "--json", "-", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["simulated"] is True and "speedup_vs_fp32" not in rep and rep["fidelity"]["cosine_mean"] > 0.98
    types = {i.data_type for i in onnx.load(str(tmp_path / "x.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT8E4M3FN in types


def test_tolerance_reports_layers_kept_in_float(cnn, tmp_path):
    r = _cli("quantize", str(cnn), "--to", "int8", "--tolerance", "0.0", "--no-measure", "--json", "-", "-o", str(tmp_path / "t.onnx"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    fb = rep["fallback"]
    assert fb["metric"] == "top1" and fb["tolerance"] == 0.0
    if fb["error_before"] > 0:  # something to fall back from: the most sensitive layers are named, with why
        assert rep["excluded_layers"] and all({"node", "op_type", "salience", "why"} <= set(e) for e in rep["excluded_layers"])
