"""Which ONNX nodes quantization is about: the standard-domain ops with a weight operand (Conv, MatMul, Gemm).

INT8 adds onnxruntime's fused Attention (its weights are quantized inside it); FP8 Q/DQ, the per-layer
sensitivity sweep and the format advisor take exactly these three. One definition instead of three copies
that had started to differ without saying why.
"""

from __future__ import annotations

import onnx

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
INT8_OPS = (*QUANTIZABLE_OPS, "Attention")  # onnxruntime's quantizer also takes its fused Attention


def is_quantizable(node: onnx.NodeProto) -> bool:
    """A Conv/MatMul/Gemm of the standard domain (contrib ops of the same name are another contract)."""
    return node.op_type in QUANTIZABLE_OPS and node.domain in ("", "ai.onnx")


def quantizable_positions(graph: onnx.GraphProto) -> list[int]:
    """Positions in graph.node of the quantizable nodes, in graph order."""
    return [i for i, n in enumerate(graph.node) if is_quantizable(n)]
