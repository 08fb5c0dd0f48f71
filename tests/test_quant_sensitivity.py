"""Sensitivity ranking and accuracy-aware fallback, on MLPs where chosen layers are made sensitive on purpose.

How a layer is made sensitive: the layer before it gets one output channel 1e5x larger (a weight-row outlier,
which per-channel weight scales absorb), and the layer itself a 1e-5x weight column for that channel, so the
model's output is unchanged in scale. The layer's INPUT then holds a 1e5x outlier channel: one per-tensor FP8
scale cannot cover both it and the other channels (E4M3's normal range spans only ~2.9e4), so the other
channels collapse to zero/subnormals when that input is quantized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.core.errors import InputError, UsageError
from compress.evaluate.compare import fidelity, onnx_outputs
from compress.quantization.fp8 import fp8_outputs, quantize_fp8
from compress.quantization.sensitivity import (
    SOURCE,
    QuantizedAlone,
    affordable,
    fallback,
    float_costs,
    layer_sensitivity,
    metric_error,
    quantizable_nodes,
    rank_by_cost,
    screened_sensitivity,
)
from export.metadata import read_metadata

WIDTH = 32


def make_mlp(path: Path, layers: int = 6, sensitive: tuple[int, ...] = (2,), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        if i in sensitive:
            w[:, 0] *= 1e-5  # reads the outlier channel
        if i + 1 in sensitive:
            w[0, :] *= 1e5  # Gemm transB=1: row 0 is output channel 0, the outlier
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}", transB=1))
        x = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", WIDTH])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    return path


def _feeds(seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, WIDTH)).astype(np.float32)} for _ in range(n)]


CALIB, EVAL = _feeds(1), _feeds(2)


def only(**kw):
    """quantize_only callback: just the named node in FP8."""
    return lambda src, dst, names: quantize_fp8(src, dst, CALIB, include=names, **kw)


def all_but(**kw):
    """fallback's quantize callback: everything except the named nodes in FP8."""
    return lambda src, dst, names: quantize_fp8(src, dst, CALIB, exclude=names, **kw)


@pytest.fixture()
def mlp(tmp_path):
    return make_mlp(tmp_path / "mlp.onnx")


def test_quantizable_nodes_lists_conv_matmul_gemm(mlp):
    assert quantizable_nodes(mlp) == [{"node": f"fc{i}", "op_type": "Gemm"} for i in range(6)]


def test_sensitive_layer_ranks_first(mlp):
    ref = onnx_outputs(mlp, EVAL)
    sens = layer_sensitivity(mlp, None, only(), EVAL, ref, runner=fp8_outputs)
    assert [r["node"] for r in sens][0] == "fc2"
    assert sorted(r["node"] for r in sens) == [f"fc{i}" for i in range(6)]
    # measured: fc2 0.034, the others <= 0.001 (fc1, whose weights hold the 1e5 row, is harmless per-channel)
    assert sens[0]["salience"] > 10 * sens[1]["salience"]
    assert all(s["salience"] >= t["salience"] for s, t in zip(sens, sens[1:]))
    assert {"cosine_mean", "cosine_min", "rel_l2", "op_type", "seconds"} <= set(sens[0])


def test_per_tensor_weights_make_the_weight_outlier_layer_sensitive_too(mlp):
    ref = onnx_outputs(mlp, EVAL)
    sens = layer_sensitivity(mlp, ["fc0", "fc1", "fc2", "fc3"], only(weight_per_channel=False), EVAL, ref, runner=fp8_outputs)
    assert {r["node"] for r in sens[:2]} == {"fc1", "fc2"}  # fc1: one scale for a 1e5 row and normal rows


def test_fallback_excludes_exactly_the_sensitive_layer(mlp, tmp_path):
    ref = onnx_outputs(mlp, EVAL)
    sens = layer_sensitivity(mlp, None, only(), EVAL, ref, runner=fp8_outputs)
    dst = tmp_path / "fallback.onnx"
    result = fallback(mlp, dst, all_but(), sens, EVAL, ref, tolerance=0.03, metric="cosine_min", runner=fp8_outputs)
    # measured: everything in FP8 -> 1 - cosine_min 0.25; fc2 in fp32 -> 0.009
    assert result["within_tolerance"] and result["path"] == str(dst)
    assert [e["node"] for e in result["excluded"]] == ["fc2"]
    assert result["excluded"][0]["op_type"] == "Gemm" and "rank 1" in result["excluded"][0]["why"]
    assert [s["excluded_count"] for s in result["steps"]] == [0, 1]
    assert result["steps"][0]["error"] > 0.1 and result["error"] <= 0.03
    assert read_metadata(dst)["quantization"]["excluded"] == ["fc2"]
    again = fidelity(ref, fp8_outputs(dst, EVAL))  # the written model is the one that was measured
    assert metric_error(again, "cosine_min") == pytest.approx(result["error"], abs=1e-9)


def test_doubling_batches_bisect_back_to_the_sensitive_layers(tmp_path):
    src = make_mlp(tmp_path / "mlp12.onnx", layers=12, sensitive=(2, 5, 8))
    ref = onnx_outputs(src, EVAL)
    sens = layer_sensitivity(src, None, only(), EVAL, ref, runner=fp8_outputs)
    assert {r["node"] for r in sens[:3]} == {"fc2", "fc5", "fc8"}
    result = fallback(src, tmp_path / "out.onnx", all_but(), sens, EVAL, ref, tolerance=0.03, runner=fp8_outputs, growth="doubling")
    assert {e["node"] for e in result["excluded"]} == {"fc2", "fc5", "fc8"}
    assert [s["excluded_count"] for s in result["steps"]] == [0, 1, 2, 4, 3]  # 4 passes, bisection finds 3


def test_user_score_replaces_fidelity(mlp, tmp_path):
    ref = onnx_outputs(mlp, EVAL)

    def score(path: Path) -> float:  # e.g. an accuracy: here agreement of the argmax with fp32, 1.0 is best
        return float(fidelity(ref, fp8_outputs(path, EVAL))["top1_agreement"]) - float(
            np.mean(np.abs(np.concatenate([o[0] for o in fp8_outputs(path, EVAL)]) - np.concatenate([o[0] for o in ref]))))

    sens = layer_sensitivity(mlp, None, only(), EVAL, evaluate=score)
    assert sens[0]["node"] == "fc2" and "score" in sens[0]
    result = fallback(mlp, tmp_path / "out.onnx", all_but(), sens, EVAL, None, tolerance=0.05, evaluate=score)
    assert result["within_tolerance"] and [e["node"] for e in result["excluded"]] == ["fc2"]


def test_top1_metric_and_bad_arguments(mlp, tmp_path):
    ref = onnx_outputs(mlp, EVAL)
    sens = layer_sensitivity(mlp, None, only(), EVAL, ref, runner=fp8_outputs)
    result = fallback(mlp, tmp_path / "t.onnx", all_but(), sens, EVAL, ref, tolerance=0.05, metric="top1", runner=fp8_outputs)
    # measured: top-1 agreement 0.91 with everything in FP8, 0.98 with fc2 in fp32
    assert result["within_tolerance"] and [e["node"] for e in result["excluded"]] == ["fc2"]
    assert result["error"] == pytest.approx(1 - result["fidelity"]["top1_agreement"])
    with pytest.raises(UsageError, match="metric"):
        fallback(mlp, tmp_path / "x.onnx", all_but(), sens, EVAL, ref, tolerance=0.1, metric="accuracy")
    with pytest.raises(UsageError, match="tolerance"):
        fallback(mlp, tmp_path / "x.onnx", all_but(), sens, EVAL, ref, tolerance=-1)
    with pytest.raises(UsageError, match="fc99"):
        layer_sensitivity(mlp, ["fc99"], only(), EVAL, ref)


def test_failing_layer_is_listed_last_and_never_excluded(mlp):
    ref = onnx_outputs(mlp, EVAL)

    def flaky(src, dst, names):
        if names == ["fc4"]:
            raise InputError("fc4 cannot be quantized here")
        quantize_fp8(src, dst, CALIB, include=names)

    sens = layer_sensitivity(mlp, None, flaky, EVAL, ref, runner=fp8_outputs)
    assert sens[-1]["node"] == "fc4" and sens[-1]["salience"] is None and "fc4" in sens[-1]["error"]


def test_out_of_reach_tolerance_is_reported_and_nothing_written(mlp, tmp_path):
    """A quantizer that touches more than the ranked layers: no exclusion set can reach the tolerance."""
    ref = onnx_outputs(mlp, EVAL)
    sens = layer_sensitivity(mlp, ["fc0", "fc1"], only(), EVAL, ref, runner=fp8_outputs)
    dst = tmp_path / "never.onnx"
    result = fallback(mlp, dst, lambda s, d, names: quantize_fp8(s, d, CALIB, exclude=names), sens, EVAL, ref,
                      tolerance=0.01, runner=fp8_outputs)  # fc2 is never a candidate, so it stays quantized
    assert not result["within_tolerance"] and result["path"] is None and not dst.exists()
    assert "even with all 2 ranked layers" in result["note"]
    assert [s["excluded_count"] for s in result["steps"]] == [0, 1, 2]


def test_rank_by_cost_puts_salience_per_millisecond_first():
    sens = [{"node": "a", "salience": 0.1}, {"node": "b", "salience": 0.05}, {"node": "c", "salience": 0.01},
            {"node": "d", "salience": 0.02}, {"node": "e", "salience": None}]
    # a costs 1 ms in float, b 0.01 (under the floor: counts as 0.05), c nothing; d was not timed
    ranked = rank_by_cost(sens, {"a": 1.0, "b": 0.01, "c": 0.0}, floor_ms=0.05)
    assert [r["node"] for r in ranked] == ["b", "c", "a", "d", "e"]  # 1.0, 0.2, 0.1 per ms; then the rest as they were
    assert ranked[0]["float_cost_ms"] == 0.01 and "float_cost_ms" not in ranked[3]
    assert "float_cost_ms" not in sens[0]  # the caller's rows are left as they were


def test_float_costs_time_one_float_layer_at_a_time_against_the_quantized_model(mlp, tmp_path):
    quantized = tmp_path / "all.onnx"
    all_but()(mlp, quantized, [])
    seen: list[dict[str, list[str]]] = []

    def timer(models):  # a model's "time": 1 ms per Gemm left in float, read from the file that was written
        seen.append({k: read_metadata(v)["quantization"]["excluded"] for k, v in models.items()})
        return {k: 2.0 + len(read_metadata(v)["quantization"]["excluded"]) for k, v in models.items()}

    def timed(models):  # the unquantized source has no quantization metadata: it "takes" 9 ms
        src = {k: v for k, v in models.items() if k == SOURCE}
        assert src == {SOURCE: mlp}
        return {**timer({k: v for k, v in models.items() if k != SOURCE}), SOURCE: 9.0}

    costs, base, source = float_costs(mlp, quantized, all_but(), ["fc2", "fc4"], timed)
    assert base == 2.0 and source == 9.0 and costs == {"fc2": 1.0, "fc4": 1.0}
    assert seen == [{"": [], "fc2": ["fc2"], "fc4": ["fc4"]}]  # each variant keeps just its layer, all timed at once


def test_affordable_counts_layers_until_the_model_is_no_faster_than_its_source():
    ranked = [{"node": "a", "float_cost_ms": 1.0}, {"node": "b", "float_cost_ms": 2.0}, {"node": "c"},
              {"node": "d", "float_cost_ms": 0.5}]
    assert affordable(ranked, base_ms=2.0, source_ms=10.0) == 4  # 2 + 1 + 2 + 1.17 (c: the mean) + 0.5 < 10
    assert affordable(ranked, base_ms=2.0, source_ms=5.0) == 1  # 2 + 1 = 3 < 5; + 2 reaches it
    assert affordable(ranked, base_ms=6.0, source_ms=5.0) == 0  # already slower with nothing in float
    assert affordable([{"node": "a"}], base_ms=1.0, source_ms=2.0) == 1  # nothing timed: no cost known, no bound


def test_fallback_stops_at_max_excluded_and_says_why(tmp_path):
    mlp = make_mlp(tmp_path / "three.onnx", layers=12, sensitive=(2, 5, 8))
    ref = onnx_outputs(mlp, EVAL)
    sens = layer_sensitivity(mlp, None, only(), EVAL, ref, runner=fp8_outputs)
    dst = tmp_path / "capped.onnx"
    result = fallback(mlp, dst, all_but(), sens, EVAL, ref, tolerance=0.03, runner=fp8_outputs,
                      max_excluded=2, max_why="test bound")
    assert not result["within_tolerance"] and result["path"] is None and not dst.exists()
    assert [s["excluded_count"] for s in result["steps"]] == [0, 1, 2]  # the three sensitive layers: 3 never tried
    assert result["max_excluded"] == 2 and "no faster than its source (test bound)" in result["note"]
    result = fallback(mlp, dst, all_but(), sens, EVAL, ref, tolerance=0.03, runner=fp8_outputs, max_excluded=3)
    assert result["within_tolerance"] and dst.exists() and "max_excluded" not in result


# ------------------------------------------------------------------------------ copied single-layer models


def _int8(mlp, tmp_path, exclude=()):
    from compress.quantization.int8 import quantize_int8
    from devices.loader import load_profile

    calib = {"x": np.concatenate([f["x"] for f in CALIB])}
    full = tmp_path / "full-int8.onnx"
    quantize_int8(mlp, full, load_profile("host"), calib, exclude=list(exclude), tune=False, announce=False)
    calls: list[list[str]] = []

    def alone(src, dst, names):
        calls.append(list(names))
        quantize_int8(src, dst, load_profile("host"), calib, include=names, tune=False, announce=False)

    return full, alone, calls


def test_copied_int8_layers_are_the_models_the_quantizer_writes(mlp, tmp_path):
    """Each layer quantized alone is copied from the whole INT8 model instead of re-running onnxruntime's
    quantizer: the same saliences (fc2 1.0, fc1 0.59: its output's outlier row is rounded, as onnxruntime
    rounds a quantized node's output), with the quantizer run only to check the copies (at most 4 times)."""
    full, alone, calls = _int8(mlp, tmp_path)
    ref = onnx_outputs(mlp, EVAL)
    real = {r["node"]: r["salience"] for r in layer_sensitivity(mlp, None, alone, EVAL, ref)}
    calls.clear()
    rows, info = screened_sensitivity(mlp, full, [f"fc{i}" for i in range(6)], alone, EVAL, ref)
    assert info["copied"] is True and info["measured"] == 6 and info["predicted"] == 0
    assert 1 <= len(calls) <= 4
    assert [r["node"] for r in rows[:2]] == ["fc2", "fc1"]
    for r in rows[:3]:
        assert r["salience"] == pytest.approx(real[r["node"]], rel=1e-3), r["node"]


def test_fp8_copies_round_inputs_only_as_its_quantizer_does(mlp, tmp_path):
    full = tmp_path / "full-fp8.onnx"
    quantize_fp8(mlp, full, CALIB)
    ref = onnx_outputs(mlp, EVAL)
    real = {r["node"]: r["salience"] for r in layer_sensitivity(mlp, None, only(), EVAL, ref, runner=fp8_outputs)}
    alone = QuantizedAlone(mlp, full)
    assert alone.calibrate([f"fc{i}" for i in range(6)], only(), EVAL[0], fp8_outputs) and alone.output is False
    copied = layer_sensitivity(mlp, None, alone.quantize_only(only()), EVAL, ref, runner=fp8_outputs)
    assert copied[0]["node"] == "fc2"
    for r in copied:
        assert r["salience"] == pytest.approx(real[r["node"]], rel=0.05, abs=1e-5), r["node"]


def test_the_proxy_screens_which_layers_are_measured_and_loses_none(mlp, tmp_path):
    full, alone, calls = _int8(mlp, tmp_path, exclude=["fc4"])  # fc4 float in the whole model: nothing to rank
    rows, info = screened_sensitivity(mlp, full, [f"fc{i}" for i in range(6)], alone, EVAL, onnx_outputs(mlp, EVAL),
                                      measure=2)
    assert sorted(r["node"] for r in rows) == ["fc0", "fc1", "fc2", "fc3", "fc5"] and info["float_in_quantized"] == 1
    measured = [r for r in rows if not r.get("predicted")]
    assert info["measured"] == len(measured) == 2 and info["predicted"] == 3
    assert rows[0]["node"] == "fc2" and rows[0]["salience"] == pytest.approx(1.0, abs=1e-3)  # the proxy's first
    assert all(r["salience"] is not None for r in rows) and ["fc4"] not in calls


def test_a_layer_the_copies_cannot_make_is_measured_by_the_quantizer(mlp, tmp_path):
    full, alone, calls = _int8(mlp, tmp_path)
    model = onnx.load(str(full))
    next(n for n in model.graph.node if n.name == "fc3").name = "renamed"  # no node fc3 there any more
    onnx.save(model, str(full))
    rows, info = screened_sensitivity(mlp, full, [f"fc{i}" for i in range(6)], alone, EVAL, onnx_outputs(mlp, EVAL),
                                      measure=2)
    assert info["copied"] is True and ["fc3"] in calls
    assert "fc3" in {r["node"] for r in rows if not r.get("predicted")}  # measured: it cannot be predicted either


def test_copies_unlike_the_quantizer_are_not_used(mlp, tmp_path):
    """A quantizer whose single-layer model no copy matches (here: it writes the fp32 model back) is run for
    every layer, as before."""
    import shutil

    full, _, _ = _int8(mlp, tmp_path)
    calls = []

    def unlike(src, dst, names):
        calls.append(names)
        shutil.copy(src, dst)

    rows, info = screened_sensitivity(mlp, full, [f"fc{i}" for i in range(6)], unlike, EVAL, onnx_outputs(mlp, EVAL))
    assert info["copied"] is False and len(calls) == 4 + 6
    assert all(r["salience"] == pytest.approx(0.0, abs=1e-9) for r in rows)
