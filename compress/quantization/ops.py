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


# Ops whose every input is quantization arithmetic: scales, zero points, packed or quantized weights.
_QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "QGemm",
                     "QAttention", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger", "MatMulInteger")


def must_be_finite(graph: onnx.GraphProto) -> set[str]:
    """Names whose values must be finite in a model we quantize or write: the weights and biases of
    Conv/MatMul/Gemm and every input of a quantization op. Other constants may be -inf on purpose (masks)."""
    names: set[str] = set()
    for n in graph.node:
        if is_quantizable(n):
            names.update(n.input[1:])
        elif n.op_type in _QUANTIZATION_OPS or n.op_type.startswith("QLinear"):
            names.update(n.input)
    return names


def quantizable_positions(graph: onnx.GraphProto) -> list[int]:
    """Positions in graph.node of the quantizable nodes, in graph order."""
    return [i for i, n in enumerate(graph.node) if is_quantizable(n)]
