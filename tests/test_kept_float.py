"""The float fallback's timing copies: dynamic INT8 with one MatMul put back in float by editing the quantized
model, against the quantizer's own model with that node excluded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch

from compress.evaluate import fidelity, onnx_outputs
from compress.quantization.int8 import quantize_int8
from compress.quantization.kept_float import KeptFloat
from compress.quantization.sensitivity import quantizable_nodes
from compress.zoo import resnet_tiny
from devices import load_profile
from export import export_onnx

SEQ = 16  # conftest.encoder's sequence length


def _tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1, 1000, (n, SEQ)).astype(np.int64),
            "attention_mask": np.ones((n, SEQ), np.int64)}


def test_a_copy_is_the_quantizers_model_with_the_node_excluded(encoder, tmp_path):
    host = load_profile("host")
    first = quantize_int8(encoder, tmp_path / "q.onnx", host, _tokens(16, 0))
    assert first["mode"] == "dynamic"
    recipe = {**first["recipe"], "smoothing_alpha": 0.7}  # smoothed weights too: the copy dequantizes them
    q = tmp_path / "q7.onnx"
    quantize_int8(encoder, q, host, _tokens(16, 0), recipe=recipe, tune=False)
    copies = KeptFloat(encoder, q)
    feeds = [{k: v[i:i + 1] for k, v in _tokens(4, 1).items()} for i in range(4)]
    nodes = [n["node"] for n in quantizable_nodes(encoder)]
    written = 0
    for name in nodes[:4]:
        mine, theirs = tmp_path / "mine.onnx", tmp_path / "theirs.onnx"
        if not copies.write(mine, name):
            continue
        written += 1
        quantize_int8(encoder, theirs, host, _tokens(16, 0), recipe=recipe, tune=False, exclude=[name])
        ops = [Counter(n.op_type for n in onnx.load(str(p)).graph.node if n.op_type != "Mul") for p in (mine, theirs)]
        assert ops[0] == ops[1], name  # the same kernels run (the smoothing Muls aside)
        assert any(n.name == name and n.op_type == "MatMul" for n in onnx.load(str(mine)).graph.node)
        fid = fidelity(onnx_outputs(theirs, feeds), onnx_outputs(mine, feeds))
        assert fid["cosine_min"] > 0.999, (name, fid)
    assert written >= 2


def test_static_graphs_are_left_to_the_quantizer(tmp_path):
    src = tmp_path / "cnn.onnx"
    export_onnx(resnet_tiny(), {"image": torch.randn(1, 3, 32, 32)}, src)
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantize_int8(src, tmp_path / "q.onnx", load_profile("host"), {"image": images})
    copies = KeptFloat(src, tmp_path / "q.onnx")
    assert not any(copies.write(tmp_path / "c.onnx", n["node"]) for n in quantizable_nodes(src))
    assert not (tmp_path / "c.onnx").exists()
