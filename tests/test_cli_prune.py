"""`compress prune` end to end: the report, the exported model, sparsity sizes and usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_prune_cnn_report_and_model(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", image=rng.standard_normal((12, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "p.onnx"
    r = _cli("prune", "compress.zoo:resnet_tiny", "--calib", str(tmp_path / "calib.npz"), "--ratio", "0.5", "--round-to", "4",
             "--recover-steps", "20", "--json", "-", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    s = rep["structural"]
    assert s["params_after"] < 0.5 * s["params_before"] and s["macs_after"] < s["macs_before"]
    assert rep["calibration"] == {"source": str(tmp_path / "calib.npz"), "samples": 12, "train_samples": 9, "held_out": True}
    assert rep["recovery"]["method"] == "distillation" and rep["recovery"]["steps"] >= 1
    for key in ("cosine_min", "cosine_mean", "rel_l2", "top1_agreement"):
        assert key in rep["fidelity"] and key in rep["fidelity_before_recovery"]
    assert rep["onnx"]["parity"]["ok"]
    lat = rep["measured"]["latency"]
    assert set(lat["wall_ms"]) == {"original", "pruned"} and lat["rounds"] >= 30
    n_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(out)).graph.initializer)
    assert n_params < 0.5 * s["params_before"]


def test_prune_allocation_measured_reports_where_it_cut(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", image=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    r = _cli("prune", "compress.zoo:resnet_tiny", "--calib", str(tmp_path / "calib.npz"), "--ratio", "0.5", "--round-to", "4",
             "--allocation", "measured", "--recover-steps", "5", "--json", "-", "-o", str(tmp_path / "p.onnx"))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["structural"]
    alloc = s["allocation"]
    assert alloc["method"] == "measured" and set(alloc["ratios"]) == {"stem", "layers.0", "layers.1", "layers.2", "layers.3", "fc"}
    assert all(0 <= v <= 0.75 for v in alloc["ratios"].values()) and any(alloc["ratios"].values())
    assert alloc["baseline_ms"] > 0 and alloc["probes"] and s["ratio"] == 0.5 and s["ratios"] == alloc["ratios"]
    assert alloc["probe_recovery_steps"] == 5  # each probe recovered as the stage does, for --recover-steps at most
    assert s["macs_after"] < s["macs_before"]


def test_prune_2to4_sparsity_reports_zipped_size_honestly(tmp_path):
    out = tmp_path / "s.onnx"
    r = _cli("prune", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--sparsity", "0.5", "--pattern", "2:4",
             "--no-recover", "--no-measure", "--json", "-", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["structural"] is None and rep["sparsity"]["pattern"] == "2:4"
    z = rep["measured"]["zipped_bytes"]
    assert z["pruned"] < 0.8 * z["original"]
    assert "latency" not in rep["measured"] and "will not drop" in rep["measured"]["note"]
    assert "no --calib" in r.stderr  # random inputs are never used silently


@pytest.mark.parametrize("args,text", [
    (["--input-shape", "1,3,32,32", "--ratio", "1.5"], "--ratio 1.5"),
    (["--input-shape", "1,3,32,32"], "give --ratio"),
    (["--input-shape", "1,3,32,32", "--ratio", "0.5", "--importance", "magic"], "magic"),
    (["--input-shape", "1,3,32,32", "--ratio", "0.5", "--ignore", "no.such.layer"], "no.such.layer"),
    (["--input-shape", "1,3,32,32", "--ratio", "0.5", "--allocation", "measured", "--global"], "does not combine with --global"),
])
def test_prune_usage_errors(tmp_path, args, text):
    r = _cli("prune", "compress.zoo:resnet_tiny", *args, "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2, r.stderr
    assert text in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.onnx").exists()
