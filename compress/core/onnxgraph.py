"""ONNX graph helpers that every writer of ONNX files here needs: who produces and who reads a value, which
values are constants, what can be dropped, and when weights must go to a side file.

Written once: the INT8, INC, FP8 and op-selection code each had their own copies, which had drifted (one
looked into If/Loop bodies, one did not).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# One protobuf holds at most 2 GiB: past that, weights are written to a `.data` file beside the model.
TWO_GB = 2 * 1024**3


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, as they would be stored (without loading external data)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Value name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes that read it, in graph order (empty names, ONNX's missing optionals, skipped)."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers and the outputs of Constant nodes."""
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by name, as arrays."""
    vals = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals


def nonfinite_initializers(model: onnx.ModelProto, among: set[str]) -> list[str]:
    """The float initializers named in `among` that hold NaN or Inf (a -inf attention mask elsewhere is fine)."""
    bad = []
    for t in model.graph.initializer:
        if t.name in among and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.BFLOAT16):
            if not np.isfinite(numpy_helper.to_array(t).astype(np.float32, copy=False)).all():
                bad.append(t.name)
    return bad


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value a node of the graph or of its subgraphs (If/Loop/Scan bodies) reads, and the graph outputs."""
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= used_names(g)
    return used


def drop_unused(model: onnx.ModelProto, *, constant_nodes: bool = False) -> None:
    """Drop initializers nothing reads (and their graph-input entries, which old-IR models have), so a file
    whose weights were replaced by quantized copies actually shrinks; with constant_nodes, unread Constant
    nodes too."""
    used = used_names(model.graph)
    dropped = {t.name for t in model.graph.initializer if t.name not in used}
    if dropped:
        keep = [t for t in model.graph.initializer if t.name not in dropped]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        inputs = [i for i in model.graph.input if i.name not in dropped]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    if constant_nodes:
        nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and not (set(n.output) & used))]
        if len(nodes) != len(model.graph.node):
            del model.graph.node[:]
            model.graph.node.extend(nodes)


def save_model(model: onnx.ModelProto, path: Path, external: bool | None = None) -> bool:
    """Save `model`; weights go to `<name>.data` when asked or when one protobuf cannot hold them."""
    if external is None:
        external = initializer_bytes(model) >= TWO_GB
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))
    return external


def graph_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of the Conv, ConvTranspose, Gemm and MatMul nodes for these input shapes, from
    onnx's shape inference (a node whose shapes it cannot infer counts 0): what `count_macs` gives for a torch
    module, for a model that arrives as ONNX (the demo CNN: 16.6 M against count_macs' 16.9 M, which also counts
    BatchNorm and pooling)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in input_shapes and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[vi.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph onnx cannot infer: no count rather than no model
        return 0
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
              for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output] if vi.type.HasField("tensor_type")}
    shapes.update({t.name: list(t.dims) for t in m.graph.initializer})
    total = 0
    for n in m.graph.node:
        out, ins = shapes.get(n.output[0], []), [shapes.get(i, []) for i in n.input]
        if not out or not all(out) or not ins or not all(ins[0]):
            continue
        if n.op_type in ("Conv", "ConvTranspose") and len(ins) > 1 and all(ins[1]):
            w = ins[1]  # [out, in/group, k...] (Conv) or [in, out/group, k...] (ConvTranspose)
            per = int(np.prod(w[1:])) if n.op_type == "Conv" else int(np.prod(w[2:])) * ins[0][1] // max(1, out[1])
            total += int(np.prod(out)) * per
        elif n.op_type in ("Gemm", "MatMul") and len(ins) > 1:
            transa = next((a.i for a in n.attribute if a.name == "transA"), 0)
            k = ins[0][-2] if (n.op_type == "Gemm" and transa) else ins[0][-1]
            total += int(np.prod(out)) * int(k)
    return total
