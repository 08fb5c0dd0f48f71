"""Dynamic INT8 simulated in float (compress.quantization.dynamic_sim): the arithmetic of onnxruntime's quantize_dynamic,
so the smoothing strengths are ranked on it and only the chosen one is quantized."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quantize_dynamic

from compress.evaluate import fidelity, onnx_outputs
from compress.quantization.dynamic_sim import fake_quant_per_column, simulate_dynamic
from compress.quantization.int8 import quantize_int8
from devices import load_profile

SEQ = 16  # conftest.encoder's sequence length
OPS = ["MatMul", "Gemm", "Attention"]


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, 1000, (1, SEQ)).astype(np.int64),
             "attention_mask": np.ones((1, SEQ), np.int64)} for _ in range(n)]


def test_the_simulation_is_the_quantizers_model(encoder, tmp_path):
    real = tmp_path / "dyn.onnx"
    quantize_dynamic(str(encoder), str(real), op_types_to_quantize=OPS, per_channel=True,
                     extra_options={"WeightSymmetric": True})
    sim = onnx.load(str(encoder))
    count = simulate_dynamic(sim, lambda n: True, OPS)
    integer = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(real)).graph.node)
    assert count == integer > 0
    feeds = _feeds(8, 1)
    ref = onnx_outputs(encoder, feeds)
    a, b = onnx_outputs(real, feeds), onnx_outputs(sim, feeds)
    same = fidelity(a, b)
    assert same["cosine_min"] > 0.99999, same
    # and as far from fp32 as the real one is: the figure the strengths are ranked on
    assert abs(fidelity(ref, a)["cosine_min"] - fidelity(ref, b)["cosine_min"]) < 2e-4


def test_weights_round_per_column_like_onnxruntime():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column keeps scale 1 and stays zero
    w[5, 2] = 40.0  # an outlier coarsens only its own column
    fq = fake_quant_per_column(w)
    assert np.all(fq[:, 3] == 0)
    step = np.abs(w).max(axis=0) / 127
    assert np.all(np.abs(fq - w) <= step / 2 + 1e-6)
    assert np.abs(fq[:, 2] - w[:, 2]).max() > 10 * np.abs(fq[:, 0] - w[:, 0]).max()


def test_graphs_it_cannot_simulate_are_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    before = m.SerializeToString()
    assert simulate_dynamic(m, lambda n: True, ["Conv", "MatMul"]) is None
    assert m.SerializeToString() == before  # untouched
    assert simulate_dynamic(m, lambda n: True, ["MatMul"]) == 0  # nothing asked for that it cannot do
    assert simulate_dynamic(m, lambda n: n.name != "c", ["Conv"]) == 0  # the Conv is excluded


def test_the_stage_ranks_strengths_on_the_simulation_and_quantizes_one(encoder, tmp_path, monkeypatch):
    import compress.quantization.int8 as int8

    calls: list[str] = []
    real = int8._quantize_dynamic

    def counted(src, dst, *a, **k):
        calls.append(dst.name)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(int8, "_quantize_dynamic", counted)
    tokens = {k: np.concatenate([f[k] for f in _feeds(24, 0)]) for k in ("input_ids", "attention_mask")}
    result = quantize_int8(encoder, tmp_path / "q.onnx", load_profile("host"), tokens)
    sm = result["smoothing"]
    assert len(sm["trials"]) == 4 and "simulated" in sm["chosen_on"]
    assert len(calls) == 1  # the chosen strength only
    chosen = "none" if sm["alpha"] is None else f"{sm['alpha']:g}"
    assert abs(sm["trials"][chosen]["cosine_min"] - result["fidelity_calibration"]["cosine_min"]) < 2e-4
