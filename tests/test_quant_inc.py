"""The INC backend: INC 3.x PT2E static INT8 in torch, written as an ONNX QDQ model that onnxruntime runs with
INT8 kernels and that stays close to fp32; device presets mapped to INC's config; failures as one-line
ModelErrors that leave no file behind."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.core.errors import ModelError, UsageError
from compress.evaluate.compare import fidelity, onnx_outputs, torch_outputs
from compress.quantization.inc import fold_weight_quantization, inc_config, quantize_inc, read_backend
from compress.quantization.presets import preset_for
from compress.zoo import encoder_tiny, resnet_tiny
from devices.loader import load_profile
from export.metadata import read_metadata

pytest.importorskip("neural_compressor.torch.quantization")

SEQ = 16


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, SEQ, dtype=torch.int64)
    for i in range(n):  # varied lengths, padded like real batches
        mask[i, int(torch.randint(4, SEQ + 1, (1,), generator=gen)):] = 0
    return {"input_ids": torch.randint(1, 1000, (n, SEQ), generator=gen) * mask, "attention_mask": mask}


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def cnn_int8(tmp_path_factory):
    """resnet_tiny through INC, calibrated on 32 random images (4 batches of 8)."""
    dst = tmp_path_factory.mktemp("inc_cnn") / "resnet_tiny_inc.onnx"
    model = resnet_tiny()
    calib = [{"image": _images(8, seed)} for seed in range(1, 5)]
    result = quantize_inc(model, {"image": _images(1, 0)}, calib, dst, load_profile("host"), source="compress.zoo:resnet_tiny")
    return model, dst, result


def test_resnet_tiny_inc_int8_is_qdq_runs_int8_kernels_and_matches_fp32(cnn_int8):
    model, dst, result = cnn_int8
    assert dst.is_file() and result["path"] == str(dst) and result["backend"] == "inc"
    assert result["size_bytes"] == dst.stat().st_size
    ops = _ops(dst)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]  # QDQ, weights via DQ
    qdq = result["qdq"]
    # Every Conv/Gemm weight is an int8 initializer read through DequantizeLinear (12 convs + the classifier).
    assert qdq["weighted_ops"] == qdq["weights_via_dq"] == 13 and qdq["float_weight_ops"] == []
    assert qdq["folded_weight_quantizers"] == 13
    weights = [t for t in onnx.load(str(dst)).graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights) == 13 and not any(t.data_type == TensorProto.FLOAT and len(t.dims) >= 2
                                          for t in onnx.load(str(dst)).graph.initializer)
    # The four convs whose outputs X86InductorQuantizer leaves in float (fused conv + add) got their QDQ, and
    # onnxruntime runs every conv and the Gemm as integer kernels.
    assert len(qdq["completed_convs"]) == 4
    k = result["int8_kernels"]
    assert k["int8"] == {"QLinearConv": 12, "QGemm": 1} and k["float_weight_ops"] == 0

    # Fidelity on held-out random images. Per-channel int8 weights and per-tensor uint8 activations calibrated on
    # the same distribution keep the per-sample logit cosine near 0.998 (0.9984 min on the calibration set); 0.99
    # leaves room for run-to-run observer noise while still failing on a wrong scale, a dropped bias or a
    # layer left unquantized with a mismatched range (those land below 0.9).
    held = [{"image": _images(16, seed)} for seed in (100, 101)]
    fid = fidelity(torch_outputs(model, held), onnx_outputs(dst, held))
    assert fid["cosine_min"] >= 0.99 and fid["nonfinite_samples"] == 0, fid
    assert fid["top1_agreement"] >= 0.9, fid
    assert result["fidelity_calibration"]["samples"] == 32 and result["fidelity_calibration"]["cosine_min"] >= 0.99


def test_inc_model_has_a_free_batch_axis_and_says_which_backend_made_it(cnn_int8):
    model, dst, result = cnn_int8
    assert result["export"]["dynamic_batch"] and result["export"]["mode"] == "strict"
    assert result["export"]["opset"] == load_profile("host").opset
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert sess.run(None, {"image": _images(3, 7).numpy()})[0].shape == (3, 10)
    meta = read_metadata(dst)
    q = meta["quantization"]
    assert q["format"] == "int8" and q["backend"] == "inc" and q["mode"] == "static"
    assert q["preset"]["signedness"] == "U8S8" and q["inc"]["config"]["act_dtype"] == "uint8"
    assert q["calibration"] == {"source": "batches", "batches": 4, "samples": 32}
    assert meta["source"] == "compress.zoo:resnet_tiny" and meta["inputs"][0]["dynamic_axes"] == {"0": "batch"}
    assert read_backend(dst) == "inc"
    assert not list(dst.parent.glob(".quant-inc-*")) and not list(dst.parent.glob(".partial-*"))


def test_without_completion_onnxruntime_runs_the_fused_add_convs_in_float(tmp_path):
    """Why completion exists: X86InductorQuantizer's conv+add pattern leaves those conv outputs unquantized."""
    dst = tmp_path / "raw.onnx"
    calib = [{"image": _images(8, 1)}]
    result = quantize_inc(resnet_tiny(), {"image": _images(1, 0)}, calib, dst, load_profile("host"), complete=False, tune=False)
    assert result["qdq"]["completed_convs"] == [] and result["qdq"]["weights_via_dq"] == 13
    assert result["int8_kernels"]["float_weight_ops"] == 4
    assert any("in float" in n for n in result["notes"])


def test_encoder_tiny_through_inc_quantizes_every_linear(tmp_path):
    dst = tmp_path / "encoder_inc.onnx"
    model = encoder_tiny()
    calib = [_tokens(8, seed) for seed in range(1, 5)]
    result = quantize_inc(model, _tokens(1, 0), calib, dst, load_profile("host"))
    assert result["qdq"]["weights_via_dq"] == result["qdq"]["weighted_ops"] == 12  # 2 layers x q, k, v, out, 2 FFN
    assert result["int8_kernels"]["int8"] == {"MatMulIntegerToFloat": 12} and result["int8_kernels"]["float_weight_ops"] == 0
    assert result["graph"]["variant"] in ("as-exported", "residual-sum") and result["graph"]["tuned"]
    held = [_tokens(16, 100)]
    fid = fidelity(torch_outputs(model, held), onnx_outputs(dst, held))
    assert fid["cosine_min"] >= 0.99, fid  # sentence embeddings: per-sentence cosine, as compress.quantization.int8 asks
    assert read_metadata(dst)["quantization"]["backend"] == "inc"


class DataDependent(torch.nn.Module):
    """Runs in eager mode, but its branch on a tensor's value cannot be traced by torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = self.conv(image)
        if y.sum() > 0:
            return y.relu()
        return y


def test_untraceable_module_raises_one_line_model_error_and_leaves_nothing(tmp_path):
    dst = tmp_path / "out.onnx"
    calib = [{"image": _images(2, 1)}]
    with pytest.raises(ModelError) as err:
        quantize_inc(DataDependent().eval(), {"image": _images(1, 0)}, calib, dst, load_profile("host"))
    msg = str(err.value)
    assert msg.startswith("torch.export failed") and "\n" not in msg and "strict" in msg
    assert list(tmp_path.iterdir()) == []  # no output, no work folder

    dst.write_bytes(b"earlier model")  # an earlier output is left as it was
    with pytest.raises(ModelError):
        quantize_inc(DataDependent().eval(), {"image": _images(1, 0)}, calib, dst, load_profile("host"))
    assert dst.read_bytes() == b"earlier model" and list(tmp_path.iterdir()) == [dst]


def test_presets_map_to_inc_config_or_are_refused():
    cfg, notes = inc_config(preset_for(load_profile("x86-avx512-vnni")))
    assert (cfg["act_dtype"], cfg["act_sym"], cfg["w_dtype"], cfg["w_sym"], cfg["w_granularity"]) == \
        ("uint8", False, "int8", True, "per_channel") and notes == []
    s8, _ = inc_config(preset_for(load_profile("rpi4-cortex-a72"), signedness="S8S8"))
    assert s8["act_dtype"] == "int8"
    trt, _ = inc_config(preset_for(load_profile("jetson-orin-trt")))
    assert trt["act_dtype"] == "int8" and trt["act_sym"] is True
    _, avx2_notes = inc_config(preset_for(load_profile("x86-avx2")))
    assert any("reduce_range" in n for n in avx2_notes)  # INC has no 7-bit weights: said, not hidden
    with pytest.raises(UsageError, match="int8 weights only"):
        inc_config(preset_for(load_profile("snapdragon-8gen2-qnn")))  # U8U8
    with pytest.raises(UsageError):
        inc_config(preset_for(load_profile("host")), method="entropy")


def test_weight_quantizer_folding_is_exact(tmp_path):
    """float weight -> QuantizeLinear (per channel) -> Clip -> DequantizeLinear, as torchlib writes INC's weights,
    becomes an int8 initializer -> DequantizeLinear with the same outputs."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "zp"), numpy_helper.from_array(np.array(-127, np.int8), "lo"),
             numpy_helper.from_array(np.array(127, np.int8), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], axis=0),
             helper.make_node("Clip", ["wq", "lo", "hi"], ["wc"]),
             helper.make_node("DequantizeLinear", ["wc", "s", "zp"], ["wd"], axis=0),
             helper.make_node("MatMul", ["x", "wt"], ["y"]),
             helper.make_node("Transpose", ["wd"], ["wt"])]
    nodes = nodes[:3] + [nodes[4], nodes[3]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "a.onnx"))
    assert fold_weight_quantization(model) == 1
    onnx.save(model, str(tmp_path / "b.onnx"))
    assert Counter(n.op_type for n in model.graph.node) == {"DequantizeLinear": 1, "Transpose": 1, "MatMul": 1}
    assert {t.name: t.data_type for t in model.graph.initializer}["wc"] == TensorProto.INT8
    feeds = [{"x": rng.standard_normal((2, 6)).astype(np.float32)}]
    assert np.array_equal(onnx_outputs(tmp_path / "a.onnx", feeds)[0][0], onnx_outputs(tmp_path / "b.onnx", feeds)[0][0])
