"""The dynamically quantized model with one MatMul back in float, made by editing that model rather than by
running the quantizer again: what the float fallback times to learn what keeping a layer in float costs.

onnxruntime's dynamic INT8 turns `MatMul(x, W)` into DynamicQuantizeLinear(x) (shared by the MatMuls reading
x), MatMulInteger with the int8 weight, a Cast and a Mul by the two scales. Putting `MatMul(x, W')` back in place
of the node's own part of that chain, with W' its int8 weight dequantized (the smoothed weight the quantizer
saw, to within its rounding), gives the model that quantizing with the node excluded gives, up to that rounding:
the same nodes run, the same shapes. On all-MiniLM-L6-v2 (bench/fallback_cost.py, AMD EPYC, 2 cores) the
float costs of 12 MatMuls took 38.2 and 32.4 s with the quantizer (onnxruntime quantizes every weight per channel
in Python), 7.0 and 6.4 s with copies, and ranked alike within timing noise: Spearman 0.59-0.83 between copies
and quantizer, 0.80 between the quantizer's two runs (FFN MatMuls 0.08-0.32 ms of ~5.8, the small ones 0-0.09). Static Q/DQ graphs are not edited here (a float node there changes which tensors are quantized around
it): `write` declines and the quantizer makes those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.core import drop_unused, save_model

_CHAIN_OPS = {"MatMulInteger", "Cast", "Mul"}


class KeptFloat:
    """Copies of `quantized` (dynamic INT8) with one MatMul of `src` (the fp32 model it was made from) in float."""

    def __init__(self, src: str | Path, quantized: str | Path) -> None:
        self.q = onnx.load(str(quantized), load_external_data=True)
        fp = onnx.load(str(src), load_external_data=False)
        self.fp_nodes = {n.name: n for n in fp.graph.node}
        self.producer = {o: n for n in self.q.graph.node for o in n.output}
        self.inits = {t.name: t for t in self.q.graph.initializer}

    def _chain(self, name: str) -> tuple[list[onnx.NodeProto], str, np.ndarray] | None:
        """(the nodes that compute `name` in `quantized` and nothing else, the float input x, W dequantized)."""
        fn = self.fp_nodes.get(name)
        if fn is None or fn.op_type != "MatMul" or len(fn.output) != 1:
            return None
        root = self.producer.get(fn.output[0])
        if root is None or root.op_type != "Mul" or root.name in self.fp_nodes:
            return None
        chain, todo = [], [root]
        while todo:
            node = todo.pop()
            chain.append(node)
            for t in node.input:
                p = self.producer.get(t)
                if p is not None and p.op_type in _CHAIN_OPS and p.name not in self.fp_nodes and p not in chain:
                    todo.append(p)
        mmi = [n for n in chain if n.op_type == "MatMulInteger"]
        if len(mmi) != 1 or len(mmi[0].input) < 4:
            return None
        a_q, w_q, _, w_zp = mmi[0].input[:4]
        dql = self.producer.get(a_q)
        scales = [t for n in chain if n.op_type == "Mul" for t in n.input if t in self.inits and t != w_zp]
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or w_q not in self.inits or len(scales) != 1:
            return None
        w = numpy_helper.to_array(self.inits[w_q]).astype(np.float32)
        zp = numpy_helper.to_array(self.inits[w_zp]).astype(np.float32) if w_zp in self.inits else 0.0
        scale = numpy_helper.to_array(self.inits[scales[0]]).astype(np.float32)
        if w.ndim != 2 or np.size(scale) not in (1, w.shape[1]):
            return None
        return chain, dql.input[0], (w - zp) * scale

    def write(self, dst: Path, name: str) -> bool:
        """Write `quantized` with `name` in float to `dst`; False (nothing written) where the node is not a dynamic
        INT8 MatMul there."""
        made = self._chain(name)
        if made is None:
            return False
        chain, x, weight = made
        model = onnx.ModelProto()
        model.CopyFrom(self.q)
        gone = {n.name for n in chain}
        out = chain[0].output[0]  # the root's: the fp32 node's own output name
        nodes = []
        for n in model.graph.node:
            if n.name == chain[0].name:
                nodes.append(helper.make_node("MatMul", [x, f"{name}.float_weight"], [out], name=name))
            elif n.name not in gone:
                nodes.append(n)
        used = {t for n in nodes for t in n.input} | {o.name for o in model.graph.output}
        nodes = [n for n in nodes if n.op_type != "DynamicQuantizeLinear" or used & set(n.output)]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.append(numpy_helper.from_array(weight, f"{name}.float_weight"))
        drop_unused(model)
        save_model(model, dst)
        return True
