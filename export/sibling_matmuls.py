"""Join the MatMuls that read one activation with constant weights into one MatMul and a Split.

A decoder layer multiplies the same normed hidden state by its Q, K and V projections, and again by its MLP's
gate and up projections: five products of one row by five weight matrices per decode step, each its own kernel
call. Joined (weights concatenated along N: the split of the result is exact, no arithmetic changes), a step makes
two calls with wider N, which is what onnxruntime-genai's builder writes for the same reason. On the
Llama-architecture decoder of bench/decode_formats.py (AMD EPYC, AVX-512 VNNI, one thread, decode after 192
tokens) a one-off interleaved A/B gave INT4 (MatMulNBits, block 32) 1.138 -> 0.817 ms per token and fp32 3.92
-> 3.92 ms, outputs identical (max abs difference 0.0); the bench itself, before and after: INT4 1.498 ms
(genai's 1.006) -> 1.065 ms (genai's 0.978). The quantizers then see one layer where there were
several: the salience mix picks one bit width for Q, K and V together.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def join_sibling_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place (see the module docstring); the number of MatMuls joined into others' places."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # Split takes its sizes as an input from opset 13
        return 0
    weights = {t.name: t for t in graph.initializer}
    siblings: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in weights \
                and len(weights[n.input[1]].dims) == 2:
            siblings[n.input[0]].append(n)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    taken = {t.name for t in graph.initializer}
    joined = 0
    for activation, group in siblings.items():
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in group]
        if len(group) < 2 or len({(a.shape[0], a.dtype) for a in arrays}) != 1:
            continue
        base = _unique(f"{group[0].name or group[0].output[0]}_joined", taken)
        graph.initializer.extend([numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{base}.weight"),
                                  numpy_helper.from_array(np.array([a.shape[1] for a in arrays], np.int64),
                                                          f"{base}.split")])
        replaced[id(group[0])] = [
            helper.make_node("MatMul", [activation, f"{base}.weight"], [f"{base}.out"], name=base),
            helper.make_node("Split", [f"{base}.out", f"{base}.split"], [n.output[0] for n in group],
                             name=f"{base}.split", axis=-1)]
        replaced.update({id(n): [] for n in group[1:]})  # the first one's place comes before theirs
        joined += len(group)
    if not joined:
        return 0
    nodes = [m for n in graph.node for m in replaced.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return joined


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while any(t.startswith(out + ".") for t in taken) or out in taken:
        k += 1
        out = f"{name}{k}"
    taken.update({f"{out}.weight", f"{out}.split"})
    return out
