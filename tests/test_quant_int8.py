"""INT8 quantization: presets per device profile, pre-processing that recovers, calibration inputs, and INT8
models of the shipped CNN and encoder that stay close to fp32 on held-out inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compress.core.errors import InputError
from compress.evaluate.compare import fidelity, onnx_outputs
from compress.quantization import SEARCHED_METHODS
from compress.quantization.calib import CalibReader
from compress.quantization.int8 import (
    detect_family,
    pool_before_activation,
    quantize_int8,
    residual_add_to_sum,
    space_to_depth_stem,
    try_presets,
)
from compress.quantization.prep import preprocess
from compress.quantization.presets import candidates, preset_for
from compress.quantization.reuse import Prepared
from compress.tuning.space import Space
from compress.zoo import resnet_tiny
from devices.loader import load_profile
from export.metadata import read_metadata
from export.onnx_export import export_onnx

SEQ = 16  # conftest.encoder's sequence length


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _per_sample(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cnn") / "resnet_tiny.onnx"
    export_onnx(resnet_tiny(), {"image": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}, path)
    return path


def _images(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)}


def _tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, SEQ), np.int64)
    for i in range(n):  # varied lengths, padded like real batches
        mask[i, rng.integers(4, SEQ + 1):] = 0
    return {"input_ids": (rng.integers(1, 1000, (n, SEQ)) * mask).astype(np.int64), "attention_mask": mask}


# --------------------------------------------------------------------------------------------- presets


def test_presets_follow_each_profile():
    host = load_profile("host")
    h = preset_for(host)
    vnni = bool({"vnni", "avx_vnni", "amx"} & set(host.isa)) if host.arch == "x86_64" else None
    if vnni is not None:
        assert (h.signedness, h.quant_format, h.per_channel, h.reduce_range) == ("U8S8", "qdq", True, not vnni)

    p = preset_for(load_profile("x86-avx512-vnni"))
    assert (p.signedness, p.quant_format, p.per_channel, p.reduce_range, p.target) == ("U8S8", "qdq", True, False, "cpu")
    assert preset_for(load_profile("x86-avx2")).reduce_range is True

    rpi = candidates(load_profile("rpi4-cortex-a72"))
    assert [c.signedness for c in rpi] == ["S8S8", "U8S8"] and all(not c.reduce_range for c in rpi)
    assert [c.signedness for c in candidates(load_profile("x86-avx512-vnni"))] == ["U8S8"]

    qnn = preset_for(load_profile("snapdragon-8gen2-qnn"))
    assert (qnn.signedness, qnn.per_channel, qnn.target) == ("U8U8", False, "QNNExecutionProvider")
    assert qnn.options()["WeightSymmetric"] is False and qnn.options()["MinimumRealRange"] == 0.0001
    trt = preset_for(load_profile("jetson-orin-trt"))
    assert (trt.signedness, trt.target) == ("S8S8", "TensorrtExecutionProvider")
    assert trt.options() == {"ActivationSymmetric": True, "WeightSymmetric": True}
    assert trt.static_only and not p.static_only

    json.dumps([c.to_json() for c in rpi + [qnn, trt, h]])  # JSON-ready


def test_op_types_per_family_and_signedness_override():
    vnni = load_profile("x86-avx512-vnni")
    assert preset_for(vnni, family="transformer").op_types == ("MatMul", "Gemm", "Attention")
    cnn_ops = preset_for(vnni, family="cnn").op_types
    assert {"Conv", "Gemm", "MatMul", "Add", "MaxPool"} <= set(cnn_ops)
    # an accelerator quantizes everything it can run, transformers included
    assert "LayerNormalization" in preset_for(load_profile("snapdragon-8gen2-qnn"), family="transformer").op_types
    s8 = preset_for(vnni, "S8S8")
    assert (s8.activation_type, s8.weight_type) == ("int8", "int8")
    dyn = preset_for(vnni, family="transformer").dynamic_args()
    assert dyn["op_types_to_quantize"] == ["MatMul", "Attention"] and dyn["extra_options"]["MatMulConstBOnly"] is True


# -------------------------------------------------------------------------------------- pre-processing


def test_preprocess_recovers_when_quant_pre_process_fails(cnn, tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as si

    before = _sha(cnn)

    def broken(*args, **kwargs):
        raise TypeError("object of type 'NoneType' has no len()")  # what it raises on real transformer exports

    monkeypatch.setattr(si, "quant_pre_process", broken)
    info = preprocess(cnn, tmp_path / "pre.onnx")
    assert info["step"] == "onnx-shape"
    assert [a["step"] for a in info["attempts"]] == ["symbolic", "no-symbolic", "onnx-shape"]
    assert "TypeError" in info["attempts"][0]["error"] and info["attempts"][-1]["error"] == ""

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    info = preprocess(cnn, tmp_path / "pre2.onnx")
    assert info["step"] == "ort-basic"
    ort.InferenceSession(str(tmp_path / "pre2.onnx"), providers=["CPUExecutionProvider"])
    assert _sha(cnn) == before  # the source is only ever read


def test_what_shape_inference_leaves_behind_stays_out_of_the_working_directory(cnn, tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference saves sym_shape_infer_temp.onnx (and its weights under a random
    name) into the current directory when it cannot finish, as on ultralytics' YOLO: not the user's."""
    import onnxruntime.quantization.shape_inference as si

    real = si.quant_pre_process

    def incomplete(src, out, *args, skip_symbolic_shape=False, **kwargs):
        if not skip_symbolic_shape:
            onnx.save_model(onnx.load(src), "sym_shape_infer_temp.onnx", save_as_external_data=True,
                            size_threshold=0)
            raise Exception("Incomplete symbolic shape inference")
        return real(src, out, *args, skip_symbolic_shape=skip_symbolic_shape, **kwargs)

    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    monkeypatch.setattr(si, "quant_pre_process", incomplete)
    (tmp_path / "out").mkdir()
    info = preprocess(cnn, tmp_path / "out" / "pre.onnx")
    assert info["step"] == "no-symbolic" and "Incomplete symbolic" in info["attempts"][0]["error"]
    assert list(user.iterdir()) == [] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pre.onnx"]


# ----------------------------------------------------------------------------------------- calibration


def test_calib_reader_streams_casts_and_checks(encoder, tmp_path):
    data = _tokens(10, 0)
    npz = tmp_path / "calib.npz"
    np.savez(npz, input_ids=data["input_ids"].astype(np.int32), attention_mask=data["attention_mask"], extra=np.zeros(10))
    reader = CalibReader(encoder, npz, max_samples=4)
    feeds = []
    while (f := reader.get_next()) is not None:
        feeds.append(f)
    assert len(feeds) == 4 and feeds[0]["input_ids"].dtype == np.int64 and feeds[0]["input_ids"].shape == (1, SEQ)
    assert reader.info()["ignored_arrays"] == ["extra"]
    reader.rewind()
    assert np.array_equal(reader.get_next()["input_ids"], data["input_ids"][:1])
    reader.close()

    with pytest.raises(InputError, match="attention_mask"):
        CalibReader(encoder, {"input_ids": data["input_ids"]})
    with pytest.raises(InputError, match="axis 1"):
        CalibReader(encoder, {"input_ids": data["input_ids"][:, :8], "attention_mask": data["attention_mask"][:, :8]})

    synthetic = CalibReader(encoder, None, synthetic_samples=3)
    f0 = synthetic.feed(0)
    assert synthetic.info()["synthetic"] and f0["input_ids"].shape == (1, SEQ) and (f0["attention_mask"] == 1).all()
    assert np.array_equal(f0["input_ids"], synthetic.feed(0)["input_ids"])  # same after a rewind


# ---------------------------------------------------------------------------------------- quantization


def test_resnet_tiny_int8_matches_fp32_on_held_out_inputs(cnn, tmp_path):
    before = _sha(cnn)
    npz = tmp_path / "calib.npz"
    np.savez(npz, **_images(32, 0))
    dst = tmp_path / "int8.onnx"
    result = quantize_int8(cnn, dst, load_profile("host"), npz)
    assert result["family"] == "cnn" and result["mode"] == "static"
    assert result["graph"]["variant"] in ("as-exported", "s2d-stem") and "int8_timing" in result["graph"]

    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops or any(o.startswith("QLinear") for o in ops)
    held = _per_sample(_images(32, 1))
    fid = fidelity(onnx_outputs(cnn, held), onnx_outputs(dst, held))
    assert fid["cosine_mean"] >= 0.98, fid

    meta = read_metadata(dst)
    q = meta["quantization"]
    assert {"preset", "method", "excluded", "calibration"} <= set(q)
    assert q["preset"]["signedness"] == result["preset"]["signedness"] and q["method"] == "minmax"
    assert q["calibration"]["source"] == "npz" and q["calibration"]["samples"] == 32
    assert meta["inputs"][0]["name"] == "image"  # the export's metadata is kept
    assert _sha(cnn) == before
    assert not list(tmp_path.glob(".quant-*"))  # no work folders left behind


def test_encoder_tiny_int8_keeps_per_sample_cosine(encoder, tmp_path):
    dst = tmp_path / "int8.onnx"
    result = quantize_int8(encoder, dst, load_profile("x86-avx512-vnni"), _tokens(24, 0))
    assert result["family"] == "transformer" and result["mode"] == "dynamic"
    assert "smoothing" in result and result["smoothing"]["alpha"] in (None, 0.5, 0.7, 0.85)
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    held = _per_sample(_tokens(24, 1))
    fid = fidelity(onnx_outputs(encoder, held), onnx_outputs(dst, held))
    assert fid["cosine_min"] >= 0.99, fid
    assert read_metadata(dst)["quantization"]["mode"] == "dynamic"


def _weight_is_float(model: onnx.ModelProto, node_name: str) -> bool:
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    w = inits.get(node.input[1])
    return w is not None and w.data_type == onnx.TensorProto.FLOAT


def test_exclude_keeps_the_named_node_in_float(cnn, tmp_path):
    src = onnx.load(str(cnn))
    convs = [n.name for n in src.graph.node if n.op_type == "Conv"]
    dst = tmp_path / "int8.onnx"
    result = quantize_int8(cnn, dst, load_profile("host"), _images(8, 0), exclude=[convs[1]], tune=False)
    out = onnx.load(str(dst))
    assert _weight_is_float(out, convs[1]) and not _weight_is_float(out, convs[2])
    assert result["excluded"] == [convs[1]] and read_metadata(dst)["quantization"]["excluded"] == [convs[1]]

    only = tmp_path / "only.onnx"
    result = quantize_int8(cnn, only, load_profile("host"), _images(8, 0), include=[convs[2]])
    out = onnx.load(str(only))
    assert not _weight_is_float(out, convs[2]) and _weight_is_float(out, convs[1])
    assert convs[1] in result["excluded"] and convs[2] not in result["excluded"]

    with pytest.raises(InputError, match="no node named 'nope'"):
        quantize_int8(cnn, tmp_path / "x.onnx", load_profile("host"), _images(8, 0), exclude=["nope"])


def test_encoder_exclude_keeps_matmul_float(encoder, tmp_path):
    src = onnx.load(str(encoder))
    inits = {t.name for t in src.graph.initializer}
    mm = [n.name for n in src.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    dst = tmp_path / "int8.onnx"
    quantize_int8(encoder, dst, load_profile("host"), _tokens(8, 0), exclude=[mm[0]], tune=False)
    out = onnx.load(str(dst))
    kept = [n for n in out.graph.node if n.name == mm[0]]
    assert kept and kept[0].op_type == "MatMul"
    assert not any(n.name == mm[1] and n.op_type == "MatMul" for n in out.graph.node)


def test_synthetic_calibration_warns_once(cnn, tmp_path, capsys):
    result = quantize_int8(cnn, tmp_path / "int8.onnx", load_profile("host"), None, tune=False)
    assert result["calibration"]["synthetic"] and "no calibration data" in capsys.readouterr().err
    result = quantize_int8(cnn, tmp_path / "again.onnx", load_profile("host"), None, tune=False, announce=False)
    assert result["calibration"]["synthetic"] and capsys.readouterr().err == ""  # a re-quantization: said already
    try_presets(cnn, tmp_path / "arm.onnx", load_profile("rpi4-cortex-a72"), None, rounds=2, tune=False)
    assert capsys.readouterr().err.count("no calibration data") == 1  # two candidates, one warning


def test_try_presets_times_both_arm_candidates(cnn, tmp_path):
    dst = tmp_path / "int8.onnx"
    result = try_presets(cnn, dst, load_profile("rpi4-cortex-a72"), _images(8, 0), rounds=10, tune=False)
    presets = result["presets"]
    assert presets["tried"] == ["S8S8-QDQ-perchannel", "U8S8-QDQ-perchannel"]
    assert set(presets["timing"]) == {"S8S8", "U8S8"} and presets["chosen"] in presets["tried"]
    assert read_metadata(dst)["quantization"]["candidates"]["chosen"] == presets["chosen"]
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------- graph rewrites


def test_graph_rewrites_are_exact(cnn, encoder, tmp_path):
    assert detect_family(onnx.load(str(cnn))) == "cnn" and detect_family(onnx.load(str(encoder))) == "transformer"
    m = onnx.load(str(cnn))
    assert space_to_depth_stem(m) == 1
    onnx.save(m, str(tmp_path / "s2d.onnx"))
    held = _per_sample(_images(4, 2))
    assert fidelity(onnx_outputs(cnn, held), onnx_outputs(tmp_path / "s2d.onnx", held))["rel_l2"] < 1e-5

    e = onnx.load(str(encoder))
    assert residual_add_to_sum(e) == 5  # embeddings + 2 per layer
    onnx.save(e, str(tmp_path / "sum.onnx"))
    held = _per_sample(_tokens(4, 2))
    assert fidelity(onnx_outputs(encoder, held), onnx_outputs(tmp_path / "sum.onnx", held))["rel_l2"] < 1e-5


def test_a_stem_kept_in_float_keeps_its_max_pool_in_float_under_onnxruntime_optimisations(cnn, tmp_path):
    """Conv -> Relu -> MaxPool with the Conv kept in float: onnxruntime's QDQ propagation would hoist the next
    layer's QuantizeLinear above the MaxPool, which then runs on uint8 (91 us against 3 on `make demo`'s CNN,
    AVX2 kernels); pooling before the Relu (exact) leaves nothing to hoist it through."""
    m = onnx.load(str(cnn))
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    assert space_to_depth_stem(onnx.load(str(cnn)), kept_float=convs[:1]) == 0  # a float stem keeps its form
    assert pool_before_activation(m, convs[1:]) == 0  # only a Conv -> Relu -> MaxPool chain moves
    assert pool_before_activation(m, convs[:1]) == 1
    onnx.save(m, str(tmp_path / "pool-first.onnx"))
    held = _per_sample(_images(4, 2))
    assert fidelity(onnx_outputs(cnn, held), onnx_outputs(tmp_path / "pool-first.onnx", held))["rel_l2"] < 1e-6

    dst = tmp_path / "int8.onnx"
    result = quantize_int8(cnn, dst, load_profile("host"), _images(8, 0), exclude=convs[:1], recipe={"graph": "s2d-stem"})
    assert result["preprocess"]["pool_before_activation"] == 1 and result["graph"]["variant"] == "as-exported" and _weight_is_float(onnx.load(str(dst)), convs[0])
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
        so = ort.SessionOptions()
        so.graph_optimization_level, so.optimized_model_filepath = level, str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(tmp_path / "optimized.onnx"))
        made_by = {o: n.op_type for n in opt.graph.node for o in n.output}
        pools = [made_by.get(n.input[0], "input") for n in opt.graph.node if n.op_type == "MaxPool"]
        assert pools and not any(p.endswith("QuantizeLinear") for p in pools), (level, pools)


def test_external_data_source_is_read_not_touched(cnn, tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(cnn)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=1024)
    before = (_sha(src), _sha(tmp_path / "ext.onnx.data"))
    info = preprocess(src, tmp_path / "pre.onnx")
    assert info["external_data"] and (tmp_path / "pre.onnx.data").exists()
    dst = tmp_path / "int8.onnx"
    quantize_int8(src, dst, load_profile("host"), _images(8, 0), tune=False)
    held = _per_sample(_images(8, 1))
    assert fidelity(onnx_outputs(src, held), onnx_outputs(dst, held))["cosine_mean"] >= 0.98
    assert (_sha(src), _sha(tmp_path / "ext.onnx.data")) == before


def test_recipe_replays_the_measured_choices(encoder, cnn, tmp_path):
    first = quantize_int8(encoder, tmp_path / "a.onnx", load_profile("host"), _tokens(8, 0))
    recipe = first["recipe"]
    assert recipe["graph"] == first["graph"]["variant"] and "smoothing_alpha" in recipe
    again = quantize_int8(encoder, tmp_path / "b.onnx", load_profile("host"), _tokens(8, 0), recipe=recipe)
    assert again["recipe"] == recipe and again["smoothing"]["chosen_on"] == "recipe"
    assert "fp32_timing" not in again["graph"]  # nothing measured again
    assert read_metadata(tmp_path / "b.onnx")["quantization"]["recipe"] == recipe

    c = quantize_int8(cnn, tmp_path / "c.onnx", load_profile("host"), _images(8, 0), recipe={"graph": "s2d-stem"})
    assert c["graph"]["variant"] == "s2d-stem" and "int8_timing" not in c["graph"]
    assert any(n.op_type == "SpaceToDepth" for n in onnx.load(str(tmp_path / "c.onnx")).graph.node)


def _same_model(a: Path, b: Path) -> bool:
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    inits = lambda m: {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}  # noqa: E731
    nodes = lambda m: [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    return inits(ma) == inits(mb) and nodes(ma) == nodes(mb)


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_requantizing_with_what_was_prepared_gives_the_same_model(encoder, cnn, tmp_path, family, monkeypatch):
    """Re-quantizations with other layers kept in float reuse the preprocessed model, the reference outputs, the
    graph rewrites, smoothing's ranges and the static ranges (onnxruntime's calibration cache): the same models
    as quantizing from scratch, with the calibration pass and pre-processing done once."""
    src, data = (cnn, _images(8, 0)) if family == "cnn" else (encoder, _tokens(8, 0))
    first = quantize_int8(src, tmp_path / "first.onnx", load_profile("host"), data)
    recipe = {**first["recipe"], **({"smoothing_alpha": 0.7} if family == "transformer" else {})}
    nodes = [n.name for n in onnx.load(str(src)).graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    reuse = Prepared(tmp_path / "prepared")
    import compress.quantization.int8 as int8

    calls = {"preprocess": 0}
    real = int8.preprocess

    def counted(*a, **k):
        calls["preprocess"] += 1
        return real(*a, **k)

    monkeypatch.setattr(int8, "preprocess", counted)
    for k, kept in enumerate([nodes[1:2], nodes[2:4], nodes[1:2]]):
        kw = dict(exclude=kept, recipe=recipe, tune=False)
        quantize_int8(src, tmp_path / f"plain{k}.onnx", load_profile("host"), data, **kw)
        quantize_int8(src, tmp_path / f"reused{k}.onnx", load_profile("host"), data, reuse=reuse, **kw)
        assert _same_model(tmp_path / f"plain{k}.onnx", tmp_path / f"reused{k}.onnx"), kept
    assert calls["preprocess"] == 3 + 1  # three plain, once for all the reused
    if family == "cnn":  # the static ranges are kept per graph: the layers kept in float do not change it here
        assert len(list((tmp_path / "prepared").glob("ranges-minmax-*.json"))) == 1
    else:
        assert reuse.equivalent == {first["recipe"]["graph"]: (True, "")} or first["recipe"]["graph"] == "as-exported"
        assert reuse.amax  # smoothing's per-channel ranges, per tensor
    other = tmp_path / "other.onnx"  # another source (or the same file changed) starts afresh
    other.write_bytes(src.read_bytes())
    quantize_int8(other, tmp_path / "o.onnx", load_profile("host"), data, exclude=nodes[1:2], recipe=recipe, reuse=reuse)
    assert reuse.source[0] == str(other.resolve()) and calls["preprocess"] == 3 + 2


def test_non_finite_scales_and_weights_are_found_and_masks_are_not():
    """What the quantize stage refuses to write (issue 16): a NaN or Inf scale, zero point or weight; a -inf
    constant that is not quantization arithmetic (an attention mask) is left alone."""
    from onnx import TensorProto, helper, numpy_helper

    from compress.core import nonfinite_initializers
    from compress.quantization.ops import must_be_finite

    inits = [numpy_helper.from_array(np.array(np.nan, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
             numpy_helper.from_array(np.full((4, 4), np.inf, np.float32), "w"),
             numpy_helper.from_array(np.array([0.0, -np.inf, -np.inf, 0.0], np.float32), "mask")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w"], ["y0"]),
             helper.make_node("Add", ["y0", "mask"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph)
    names = must_be_finite(model.graph)
    assert {"x_scale", "x_zp", "w"} <= names and "mask" not in names
    assert sorted(nonfinite_initializers(model, names)) == ["w", "x_scale"]


def test_onnxruntime_entropy_calibration_gives_minmax_scales_so_a_search_skips_it(cnn, tmp_path):
    """quantize_static runs its entropy calibrator at 128 bins for 128 levels (no option reaches them): the KL
    search keeps the whole range. Should onnxruntime change that, this fails and entropy goes back in the search."""
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        dst = tmp_path / f"{method}.onnx"
        quantize_int8(cnn, dst, load_profile("host"), _images(16, 0), method=method, tune=False)
        scales[method] = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(dst)).graph.initializer
                          if i.name.endswith("_scale")}
    assert scales["minmax"] and scales["minmax"].keys() == scales["entropy"].keys()
    assert all(np.array_equal(scales["minmax"][k], scales["entropy"][k]) for k in scales["minmax"])
    assert any(not np.array_equal(scales["minmax"][k], scales["percentile"][k]) for k in scales["minmax"])
    assert "entropy" not in SEARCHED_METHODS and Space().methods == list(SEARCHED_METHODS)


def test_a_tensor_too_narrow_for_histogram_bins_fails_percentile_in_one_line(tmp_path):
    """onnxruntime's percentile collector bins each tensor's float32 values over their own range; a tensor that
    spans a few float32 steps (here 1 +- 2e-7: LCNet-050's hard-swish blocks with random weights) cannot be cut
    into 2048 bins. That is a ModelError naming the way out, and minmax still quantizes the model."""
    from onnx import TensorProto, helper, numpy_helper

    from compress.core import ModelError

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "tiny"], ["scaled"]), helper.make_node("Add", ["scaled", "one"], ["narrow"]),
             helper.make_node("Conv", ["narrow", "w"], ["y"], name="conv")]
    inits = [numpy_helper.from_array(np.array(2e-7, np.float32), "tiny"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "narrow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    src = tmp_path / "narrow.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    feeds = {"x": rng.uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32)}
    with pytest.raises(ModelError, match="percentile calibration failed .* --method minmax avoids it"):
        quantize_int8(src, tmp_path / "p.onnx", load_profile("host"), feeds, method="percentile", tune=False)
    assert not (tmp_path / "p.onnx").exists()
    quantize_int8(src, tmp_path / "m.onnx", load_profile("host"), feeds, method="minmax", tune=False)
    assert (tmp_path / "m.onnx").exists()


def _detector_head(path: Path) -> Path:
    """A detector's output as YOLO writes it: boxes in pixels (0-400 here) joined with sigmoid class scores."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "wb"], ["raw"], name="box_conv"),
             helper.make_node("Mul", ["raw", "stride"], ["boxes"], name="decode"),
             helper.make_node("Conv", ["x", "wc"], ["logits"], name="cls_conv"),
             helper.make_node("Sigmoid", ["logits"], ["scores"], name="sigmoid"),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], name="join", axis=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(np.array(100.0, np.float32), "stride"),
             numpy_helper.from_array(rng.standard_normal((6, 3, 1, 1)).astype(np.float32), "wc")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_concat_of_boxes_and_scores_stays_float_so_the_scores_survive(tmp_path, monkeypatch):
    """One INT8 scale for [boxes in pixels, scores in 0-1] rounds every score to 0 or one step (YOLOv8n: all
    scores one value); the Concat is kept in float, the convs stay INT8, and the scores keep their resolution."""
    import compress.quantization.int8 as int8

    src = _detector_head(tmp_path / "head.onnx")
    feeds = {"x": np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    held = [{"x": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)}]
    ref = onnx_outputs(src, held)[0][0]

    def scores_error(dst: Path) -> float:
        return float(np.abs(onnx_outputs(dst, held)[0][0][:, 4:] - ref[:, 4:]).max())

    kept = quantize_int8(src, tmp_path / "kept.onnx", load_profile("host"), feeds, tune=False)
    assert [j["node"] for j in kept["float_joins"]] == ["join"]
    assert kept["float_joins"][0]["input_amax"][0] > 16 * kept["float_joins"][0]["input_amax"][1]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 2 and "Concat" in ops
    assert kept["recipe"]["float_joins"] == kept["float_joins"]  # measured once: a re-quantization replays them
    monkeypatch.setattr(int8, "MIXED_RANGE", 1e9)  # the rule off: one scale for both
    shared = quantize_int8(src, tmp_path / "shared.onnx", load_profile("host"), feeds, tune=False)
    assert "float_joins" not in shared
    # measured: 0.023 (the logits' own INT8 step through the sigmoid) against 0.9998 (scores rounded to 0 or 1.6)
    assert scores_error(tmp_path / "kept.onnx") < 0.05 and scores_error(tmp_path / "shared.onnx") > 0.5
