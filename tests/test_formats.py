"""`compress formats`: the advice follows what INT8 and FP8 measure on the data, within what the device runs fast.

Two tiny MLPs built here: a benign one (Gaussian weights and inputs, where INT8's uniform grid is the more
precise) and an outlier one whose middle layer has a few output channels 100x larger (weight outliers: per-
channel INT8 fixes them) that feed the last layer as huge activation channels (activation outliers: per-tensor
INT8 activations lose the small channels, FP8's relative precision keeps them), as LayerNorm-fed outlier
channels do in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.cli import main
from compress.quantization.advisor import FORMATS, _recommend, advise, device_formats
from devices.loader import load_profile

HOT = [3, 17, 40]


def _mlp(path: Path, outliers: bool) -> Path:
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.25, (16, 16)).astype(np.float32)
    w1 = rng.normal(0, 0.25, (16, 64)).astype(np.float32)
    w2 = rng.normal(0, 0.15, (64, 8)).astype(np.float32)
    if outliers:
        w1[:, HOT] *= 100.0
        w2[HOT, :] /= 100.0  # the next layer scales them back: the small channels still matter
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a0"], name="fc0"),
             helper.make_node("Relu", ["a0"], ["a"], name="relu0"),
             helper.make_node("MatMul", ["a", "w1"], ["h0"], name="fc1"),
             helper.make_node("Relu", ["h0"], ["h"], name="relu1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])],
                          [numpy_helper.from_array(w, n) for w, n in ((w0, "w0"), (w1, "w1"), (w2, "w2"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("formats")
    np.savez(d / "calib.npz", x=np.random.default_rng(1).normal(size=(16, 4, 16)).astype(np.float32))
    (d / "junk.onnx").write_bytes(b"\x08\x01junk" * 100)
    return {"outlier": _mlp(d / "outlier.onnx", True), "benign": _mlp(d / "benign.onnx", False),
            "calib": d / "calib.npz", "junk": d / "junk.onnx", "dir": d}


_CACHE: dict[tuple[str, str], dict[str, Any]] = {}


def _advice(files: dict[str, Path], model: str, device: str) -> dict[str, Any]:
    if (model, device) not in _CACHE:
        _CACHE[(model, device)] = advise(files[model], load_profile(device), str(files["calib"]))
    return _CACHE[(model, device)]


def _layer(report: dict[str, Any], node: str) -> dict[str, Any]:
    return next(r for r in report["layers"] if r["node"] == node)


def _err(report: dict[str, Any], node: str, fmt: str) -> float:
    return _layer(report, node)["errors"][fmt]["one_minus_cos_mean"]


def test_outlier_layers_rank_worst_for_int8_per_tensor(files):
    r = _advice(files, "outlier", "nvidia-h100-trt-fp8")
    worst = r["worst_layer"]["int8_per_tensor"]
    assert worst in ("fc1", "fc2")
    assert _err(r, "fc0", "int8_per_tensor") < 0.1 * _err(r, worst, "int8_per_tensor")
    # weight outliers (fc1): per-channel INT8 scales fix them
    assert _layer(r, "fc1")["weight"]["channel_spread"] > 20
    assert _err(r, "fc1", "int8_per_tensor") > 10 * _err(r, "fc1", "int8_per_channel")
    # activation outliers (fc2): per-tensor activation scales hurt both INT8s, FP8 keeps the small channels
    assert _layer(r, "fc2")["activation"]["kurtosis"] > 20
    for int8 in ("int8_per_tensor", "int8_per_channel"):
        assert _err(r, "fc2", int8) > 10 * _err(r, "fc2", "fp8_e4m3fn")
    assert r["swept_layers"] == r["quantizable_layers"] == 3 and r["sweep_note"] is None


def test_fp8_hardware_gets_fp8_only_where_it_measures_better(files):
    out = _advice(files, "outlier", "nvidia-h100-trt-fp8")
    w = out["whole_model"]
    assert w["fp8_e4m3fn"]["error"] < min(w["int8_per_tensor"]["error"], w["int8_per_channel"]["error"]) / 10
    assert out["recommendation"]["format"] == "fp8_e4m3fn" and out["recommendation"]["within_tolerance"]
    ben = _advice(files, "benign", "nvidia-h100-trt-fp8")
    w = ben["whole_model"]
    best_int8 = min(w["int8_per_tensor"]["error"], w["int8_per_channel"]["error"])
    assert best_int8 < min(w["fp8_e4m3fn"]["error"], w["fp8_e5m2"]["error"])  # Gaussian data: INT8 is finer
    assert ben["recommendation"]["format"].startswith("int8_")
    assert ben["recommendation"]["error"] == best_int8


def test_cpu_profile_never_fp8_even_when_fp8_measures_better(files):
    r = _advice(files, "outlier", "host")
    assert not r["device"]["formats"]["fp8_e4m3fn"]["fast"]
    assert r["device"]["formats"]["fp8_e4m3fn"]["why"] == "fp8: false"
    assert r["whole_model"]["fp8_e4m3fn"]["error"] < r["whole_model"]["int8_per_channel"]["error"]
    assert not r["recommendation"]["format"].startswith("fp8")
    assert not _advice(files, "benign", "host")["recommendation"]["format"].startswith("fp8")


def test_above_tolerance_names_the_layers_to_keep_in_float(files):
    r = advise(files["outlier"], load_profile("x86-avx512-vnni"), str(files["calib"]))
    rec = r["recommendation"]
    assert rec["format"].startswith("int8_") and rec["error"] > r["tolerance"]
    assert rec["within_tolerance"] and "fc2" in rec["keep_float"]
    assert rec["error_with_float_layers"] <= r["tolerance"]
    assert "fp8" in rec["reason"] and "fp8: false" in rec["reason"]  # says what it could not use, and why


def test_no_fast_format_means_fp32(files):
    r = advise(files["benign"], load_profile("rpi4-cortex-a72"), str(files["calib"]), max_layers=0)
    assert r["recommendation"]["format"] == "fp32" and "int8_dot: false" in r["recommendation"]["reason"]
    assert r["swept_layers"] == 0 and "capped" in r["sweep_note"]


def test_avx2_without_dot_products_still_runs_int8_fast(files):
    """x86 without VNNI multiplies 8-bit pairs with VPMADDUBSW: measured faster than fp32, so INT8 is advised."""
    r = advise(files["benign"], load_profile("x86-avx2"), str(files["calib"]), max_layers=0)
    assert r["recommendation"]["format"].startswith("int8_") and "avx2" in r["device"]["formats"]["int8_per_tensor"]["why"]
    assert not r["device"]["formats"]["fp8_e4m3fn"]["fast"]


def test_recommendation_follows_measurements_not_a_rule():
    h100, npu = load_profile("nvidia-h100-trt-fp8"), load_profile("snapdragon-8gen2-qnn")

    def whole(**errs: float) -> dict[str, dict[str, float]]:
        return {f: {"error": errs.get(f, 0.5)} for f in FORMATS}

    fp8_better = whole(int8_per_tensor=0.02, int8_per_channel=0.01, fp8_e4m3fn=0.001)
    int8_better = whole(int8_per_tensor=0.002, int8_per_channel=0.001, fp8_e4m3fn=0.004)
    tie = whole(int8_per_tensor=0.003, int8_per_channel=0.003, fp8_e4m3fn=0.003, fp8_e5m2=0.003)
    assert _recommend(fp8_better, device_formats(h100), 0.01, "cosine_min")["format"] == "fp8_e4m3fn"
    assert _recommend(int8_better, device_formats(h100), 0.01, "cosine_min")["format"] == "int8_per_channel"
    assert _recommend(tie, device_formats(h100), 0.01, "cosine_min")["format"] == "int8_per_tensor"
    # the QNN NPU runs per-tensor INT8 only: per-channel's better figure cannot be used there
    caps = device_formats(npu)
    assert not caps["int8_per_channel"]["fast"] and "per_channel: false" in caps["int8_per_channel"]["why"]
    assert _recommend(int8_better, caps, 0.01, "cosine_min")["format"] == "int8_per_tensor"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_json_markdown_and_plot(files, capsys):
    d = files["dir"]
    code, out, err = _cli(capsys, "formats", str(files["outlier"]), "--device", "nvidia-h100-trt-fp8", "--calib",
                          str(files["calib"]), "--plot", str(d / "p.png"), "-o", str(d / "r.md"), "--json", "-")
    assert code == 0, err
    r = json.loads(out)
    assert {"model", "device", "metric", "tolerance", "calibration", "formats", "whole_model", "layers",
            "swept_layers", "quantizable_layers", "worst_layer", "recommendation", "method"} <= set(r)
    assert r["metric"] == "cosine_min" and r["formats"] == list(FORMATS)
    for f in FORMATS:
        assert {"error", "one_minus_cos_mean", "cosine_min", "rel_l2"} <= set(r["whole_model"][f])
        assert set(r["device"]["formats"][f]) == {"fast", "why"}
    for layer in r["layers"]:
        assert set(layer["errors"]) == set(FORMATS)
        assert {"max_over_std", "kurtosis"} <= set(layer["activation"])
    assert {"format", "reason", "within_tolerance", "keep_float"} <= set(r["recommendation"])
    assert (d / "p.png").read_bytes()[:4] == b"\x89PNG"
    md = (d / "r.md").read_text()
    assert "fp8_e4m3fn" in md and "| fc2 |" in md and "![per-layer error per format](p.png)" in md


def test_cli_table(files, capsys):
    code, out, _ = _cli(capsys, "formats", str(files["benign"]), "--device", "host", "--calib", str(files["calib"]))
    assert code == 0
    assert "WHOLE MODEL" in out and "fc1" in out and "recommended: int8_" in out


@pytest.mark.parametrize("args, code, words", [
    (["{dir}/missing.onnx", "--device", "host"], 1, "not found"),
    (["{junk}", "--device", "host"], 1, "not a readable ONNX model"),
    (["{outlier}", "--device", "no-such-device"], 1, "no-such-device"),
    (["{outlier}", "--device", "host", "--tolerance", "1.5"], 2, "--tolerance"),
    (["{outlier}", "--device", "host", "--tolerance", "-0.1"], 2, "--tolerance"),
    (["{outlier}", "--device", "host", "--max-layers", "-1"], 2, "--max-layers"),
    (["{outlier}", "--device", "host", "--calib", "{dir}/nope.npz"], 1, "nope.npz"),
    (["{outlier}", "--device", "host", "-o", "{outlier}"], 2, "also an input"),
])
def test_cli_errors(files, capsys, args, code, words):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    before = sorted(p.name for p in files["dir"].iterdir())
    got, _, err = _cli(capsys, "formats", *args)
    assert got == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert sorted(p.name for p in files["dir"].iterdir()) == before
