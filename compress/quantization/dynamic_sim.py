"""Dynamic INT8 simulated in float: the same arithmetic as onnxruntime's `quantize_dynamic`, without running it.

Why: choosing a smoothing strength for a transformer ran onnxruntime's quantizer once per strength, and its
per-channel weight quantization is a Python loop over every output column (on all-MiniLM-L6-v2, 1.1 s of the
1.9 s each of four runs took). Here each MatMul onnxruntime would quantize reads its activation through
DynamicQuantizeLinear -> DequantizeLinear (the very op its dynamic graph uses, per tensor, uint8) and a weight
rounded per column to int8 the way onnxruntime rounds it (symmetric, [-127, 127], scale = max|w| / 127, round
half to even), so the outputs differ from the quantized model's only by float accumulation: the strengths are
ranked as the real models would rank them, and only the chosen one is quantized for real.

Only MatMuls with a constant 2-D float32 weight are simulated; a graph where onnxruntime would quantize
anything else (Attention, LSTM, Conv among the op types asked for) is not (`simulate_dynamic` returns None)
and its strengths are then each quantized for real.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.core import drop_unused

# what onnxruntime's dynamic (IntegerOps) registry quantizes beyond MatMul; Gemm is not in it
_INTEGER_OPS_OTHER = ("Conv", "Attention", "LSTM")


def fake_quant_per_column(w: np.ndarray) -> np.ndarray:
    """w rounded per column (last axis) to symmetric int8 and back, as onnxruntime quantizes a MatMul weight."""
    absmax = np.abs(w).max(axis=0).astype(np.float64)
    scale = (2.0 * absmax / 254.0).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)
    q = np.clip(np.rint(w / scale), -127, 127)
    return (q * scale).astype(np.float32)


def simulable(model: onnx.ModelProto, quantized: Callable[[onnx.NodeProto], bool],
              op_types: Sequence[str]) -> Optional[list[onnx.NodeProto]]:
    """The MatMuls onnxruntime's quantize_dynamic would quantize, all simulable; None where the graph has
    something it would quantize that is not simulated here. `quantized(node)`: whether the quantizer is asked
    to quantize the node (its include/exclude lists); `op_types`: the op types it is asked for."""
    inits = {t.name: t for t in model.graph.initializer}
    asked = set(op_types)
    todo: list[onnx.NodeProto] = []
    for n in model.graph.node:
        if n.op_type in _INTEGER_OPS_OTHER and n.op_type in asked and quantized(n):
            return None
        if n.op_type != "MatMul" or "MatMul" not in asked or not quantized(n) or len(n.input) != 2:
            continue
        w = inits.get(n.input[1])
        if w is None:
            continue  # onnxruntime's dynamic MatMul quantizes constant weights only
        if n.input[0] in inits or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            return None
        todo.append(n)
    return todo


def simulate_dynamic(model: onnx.ModelProto, quantized: Callable[[onnx.NodeProto], bool],
                     op_types: Sequence[str]) -> Optional[int]:
    """Rewrite `model` in place into its simulated dynamic INT8 form; the number of MatMuls simulated, or None
    (and the model untouched) where it is not simulable (see `simulable`).

    A weight read only by simulated MatMuls is rounded in place (no second copy of the weights held: MiniLM's
    90 MB).
    """
    todo = simulable(model, quantized, op_types)
    if not todo:
        return None if todo is None else 0
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    simulated = {id(n) for n in todo}
    readers: dict[str, bool] = {}  # weight -> read by anything not simulated
    for n in g.node:
        for i in n.input:
            if i in inits:
                readers[i] = readers.get(i, False) or id(n) not in simulated
    weights: dict[str, str] = {}
    acts: dict[str, str] = {}
    before: dict[int, list[onnx.NodeProto]] = {}
    for n in todo:
        b = n.input[1]
        if b not in weights:
            fq = fake_quant_per_column(numpy_helper.to_array(inits[b]))
            if readers.get(b) or b in {o.name for o in g.output}:
                weights[b] = f"{b}_simq"
                g.initializer.append(numpy_helper.from_array(fq, weights[b]))
            else:
                weights[b] = b
                inits[b].CopyFrom(numpy_helper.from_array(fq, b))
        a = n.input[0]
        if a not in acts:  # one quantize per activation tensor, as onnxruntime shares it between consumers
            acts[a] = f"{a}_simdq"
            q, s, z = f"{a}_simq", f"{a}_simq_scale", f"{a}_simq_zp"
            before[id(n)] = [helper.make_node("DynamicQuantizeLinear", [a], [q, s, z], name=f"{a}_simq"),
                             helper.make_node("DequantizeLinear", [q, s, z], [acts[a]], name=f"{a}_simdq")]
        n.input[0], n.input[1] = acts[a], weights[b]
    order = list(g.node)
    del g.node[:]
    for n in order:  # each activation's quantize goes just before its first consumer: topological order holds
        g.node.extend(before.get(id(n), []))
        g.node.append(n)
    drop_unused(model)
    return len(todo)
