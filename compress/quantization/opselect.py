"""Latency-aware op selection: time every quantized op against its fp32 self on the device, keep fp32 where
INT8 is not faster, and keep the selection only if the whole model then runs faster.

Why per op: INT8 pays for big convolutions and matrix products with VNNI/dot-product units, but not always
for the rest. Depthwise and 3-channel convolutions are bound by memory or im2col, small Gemms by the
quantize/requantize around them, and CPUs without VNNI (AVX2) or without dot-product instructions (older ARM
cores) lose on ops that win elsewhere. A whole-model A/B says only that INT8 is slower overall; this says
which ops to leave alone.

How: each quantized op is cut out of both models as a region with its real boundaries, fed with the real
tensors that reach it (one run of each full model, the boundary tensors added as outputs), and run under
onnxruntime's profiler with the device's providers, threads and session options, fp32 and INT8 regions
alternating. A region runs alone, so onnxruntime wraps it in layout conversions (NCHWc reorders,
NHWC transposes) that the full graph pays once; those kernels are left out of the op's time.
- static QDQ: the INT8 region runs from the quantized tensors that feed the op's DequantizeLinear inputs to
  the QuantizeLinear after it (through a fused Relu/Clip), which onnxruntime fuses into one QLinear kernel
  as it does in the full graph; the fp32 region spans the same float tensors in the fp32 model.
- dynamic (transformer MatMuls): both regions run from the op's float input to its float output; the INT8
  one holds the activation quantization, the integer MatMul and the rescale.
Per-op times decide which ops to try in fp32; quantizing again without them and timing both whole models
interleaved decides whether to keep it (new Q/DQ pairs at the borders cost too, and only the whole model
shows that).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import helper

from compress.core import first_line, onnxgraph, sessions

# onnxruntime's layout transformers put these around an op that runs alone; the full graph pays them once
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput", "Transpose"})
# ops that a fused QLinear kernel absorbs after the op (the QuantizeLinear range does the clipping)
ABSORBED = frozenset({"Relu", "Clip"})
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# ops whose INT8 kernels do arithmetic; pooling, Concat, Reshape & co. are quantized only to keep tensors 8-bit,
# and alone they run on kernels the full graph does not use (uint8 MaxPool in NCHW instead of NhwcMaxPool)
SELECT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul")
REGION_RUNS = 24  # per region and model, in alternating blocks; medians of kernel time
BLOCK = 4
NOT_FASTER = 1.0  # an op stays fp32 when its INT8 time is at least this fraction of its fp32 time
KEEP_MARGIN = 0.02  # the selection must make the whole model this much faster to be kept

QuantizeFn = Callable[[Path, Path, list[str]], None]  # (fp32 src, dst, nodes to keep in fp32)
WholeTimer = Callable[[dict[str, Path]], dict[str, float]]  # {name: model} -> {name: ms}


@dataclass
class Region:
    """One op's span in both models: float boundaries in fp32, the matching boundaries in the INT8 model."""

    node: str
    op_type: str
    fp32_inputs: list[str]
    fp32_outputs: list[str]
    int8_inputs: list[str]
    int8_outputs: list[str]


@dataclass
class OpTiming:
    node: str
    op_type: str
    fp32_us: Optional[float] = None
    int8_us: Optional[float] = None
    error: str = ""
    kernels: dict[str, list[str]] = field(default_factory=dict)

    @property
    def speedup(self) -> Optional[float]:
        if not self.fp32_us or not self.int8_us:
            return None
        return self.fp32_us / self.int8_us

    def to_json(self) -> dict[str, Any]:
        s = self.speedup
        out = {"node": self.node, "op_type": self.op_type,
               "fp32_us": None if self.fp32_us is None else round(self.fp32_us, 2),
               "int8_us": None if self.int8_us is None else round(self.int8_us, 2),
               "speedup": None if s is None else round(s, 3)}
        if self.error:
            out["error"] = self.error
        return out


# ------------------------------------------------------------------------------------------ regions


def _activation_inputs(node: onnx.NodeProto, consts: set[str]) -> list[str]:
    return [i for i in node.input if i and i not in consts]


def _through_absorbed(tensor: str, consumers: Mapping[str, list[onnx.NodeProto]]) -> str:
    """Follow a single-consumer chain of Relu/Clip: a QLinear kernel absorbs them, so the region ends after."""
    while len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type in ABSORBED:
        tensor = consumers[tensor][0].output[0]
    return tensor


def find_regions(fp32: onnx.ModelProto, int8: onnx.ModelProto, op_types: Sequence[str]) -> list[Region]:
    """The quantized ops of `int8` that exist as nodes of `fp32` (same name), with their boundaries."""
    f_nodes = {n.name: n for n in fp32.graph.node if n.name}
    f_consts = onnxgraph.constant_names(fp32.graph)
    f_tensors = set(onnxgraph.producers(fp32.graph)) | {i.name for i in fp32.graph.input}
    q_nodes = {n.name: n for n in int8.graph.node if n.name}
    q_prod, q_cons = onnxgraph.producers(int8.graph), onnxgraph.consumers(int8.graph)
    q_tensors = set(q_prod) | {i.name for i in int8.graph.input}
    regions = []
    for name, fnode in f_nodes.items():
        if fnode.op_type not in op_types or fnode.domain not in ("", "ai.onnx"):
            continue
        f_in = _activation_inputs(fnode, f_consts)
        if not f_in:
            continue
        qnode = q_nodes.get(name)
        if qnode is not None and qnode.op_type == fnode.op_type:  # static QDQ: DQ -> op -> [Relu] -> Q
            dq = [q_prod.get(i) for i in qnode.input if i in q_prod]
            dq_act = [d for d in dq if d is not None and d.op_type == "DequantizeLinear" and d.input[0] in q_prod]
            if not dq_act:
                continue  # not quantized (excluded, or an op the preset leaves alone)
            end = _through_absorbed(qnode.output[0], q_cons)
            qs = [c for c in q_cons.get(end, []) if c.op_type == "QuantizeLinear"]
            if len(qs) != 1 or end not in f_tensors:
                continue
            regions.append(Region(name, fnode.op_type, f_in, [end], [d.input[0] for d in dq_act], [qs[0].output[0]]))
        elif qnode is None:  # dynamic: the op was replaced; its float input and output stay
            out = fnode.output[0]
            if out in q_tensors and all(i in q_tensors for i in f_in):
                regions.append(Region(name, fnode.op_type, f_in, [out], list(f_in), [out]))
    return regions


def _value_info(name: str, arr: np.ndarray) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
    return helper.make_tensor_value_info(name, elem, list(arr.shape))


def extract(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str],
            values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The nodes between `inputs` and `outputs` (walking back from the outputs), as a model of their own."""
    prod = onnxgraph.producers(model.graph)
    stop = set(inputs) | {i.name for i in model.graph.initializer}
    keep: list[onnx.NodeProto] = []
    seen: set[int] = set()
    todo = list(outputs)
    while todo:
        t = todo.pop()
        if t in stop or t not in prod:
            if t not in stop:
                raise ValueError(f"tensor {t!r} is neither produced in the region nor one of its inputs")
            continue
        node = prod[t]
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        todo.extend(i for i in node.input if i)
    order = {id(n): k for k, n in enumerate(model.graph.node)}
    keep.sort(key=lambda n: order[id(n)])
    used = {i for n in keep for i in n.input}
    inits = [i for i in model.graph.initializer if i.name in used and i.name not in inputs]
    graph = helper.make_graph(keep, "region", [_value_info(i, values[i]) for i in inputs],
                              [_value_info(o, values[o]) for o in outputs], inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return out


def boundary_values(model_path: Path, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model once with `names` added as outputs: the real tensors that reach each region."""

    model = onnx.load(str(model_path))
    present = {o.name for o in model.graph.output}
    for n in names:
        if n not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
            present.add(n)
    sess = sessions.session(model, level="basic")  # values only; keeps names
    wanted = {i.name for i in sess.get_inputs()}
    got = sess.run(list(names), {k: v for k, v in feed.items() if k in wanted})
    return dict(zip(names, got))


# --------------------------------------------------------------------------------------------- timing


def _kernel_times(profile_file: str, skip: int) -> dict[str, tuple[str, list[float]]]:
    """Per node: its op type and kernel microseconds per run (the first `skip` runs, warm-up, left out)."""
    with open(profile_file) as f:
        events = json.load(f)
    per_node: dict[str, tuple[str, list[float]]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = (e.get("args") or {}).get("op_name", "")
        per_node.setdefault(node, (op, []))[1].append(float(e["dur"]))
    return {k: (op, v[skip:]) for k, (op, v) in per_node.items()}


def _region_us(per_node: Mapping[str, tuple[str, list[float]]]) -> tuple[float, list[str]]:
    """Sum of per-kernel medians, layout conversions left out; and the kernels that were counted."""
    kept = {k: v for k, (op, v) in per_node.items() if op not in LAYOUT_OPS and v}
    ops = sorted({op for op, v in per_node.values() if op not in LAYOUT_OPS and v})
    return float(sum(np.median(v) for v in kept.values())), ops


def time_regions(pairs: Mapping[str, tuple[onnx.ModelProto, dict[str, np.ndarray], onnx.ModelProto, dict[str, np.ndarray]]],
                 providers: Sequence[Any], threads: int, session_config: Mapping[str, str],
                 runs: int = REGION_RUNS) -> dict[str, tuple[float, float, dict[str, list[str]]]]:
    """For each op: (fp32 µs, INT8 µs, kernels) from onnxruntime's profiler, fp32 and INT8 alternating."""

    results = {}
    with tempfile.TemporaryDirectory(prefix=".opselect-") as tmp:
        for name, (fm, ff, qm, qf) in pairs.items():
            opened = []
            for tag, m in (("fp32", fm), ("int8", qm)):
                opened.append(sessions.session(m, providers=providers, threads=threads, config=session_config,
                                               profile_prefix=os.path.join(tmp, f"{tag}")))
            feeds = (ff, qf)
            for s, f in zip(opened, feeds):  # warm-up runs are profiled too: _kernel_times drops them
                for _ in range(2):
                    s.run(None, f)
            for b in range(0, runs, BLOCK):
                order = (0, 1) if (b // BLOCK) % 2 == 0 else (1, 0)
                for k in order:
                    for _ in range(BLOCK):
                        opened[k].run(None, feeds[k])
            times, kernels = [], {}
            for tag, s in zip(("fp32", "int8"), opened):
                us, ops = _region_us(_kernel_times(s.end_profiling(), skip=2))
                times.append(us)
                kernels[tag] = ops
            results[name] = (times[0], times[1], kernels)
    return results


def op_latency(fp32_path: Path, int8_path: Path, feed: Mapping[str, np.ndarray], op_types: Sequence[str],
               providers: Sequence[Any], threads: int, session_config: Mapping[str, str],
               runs: int = REGION_RUNS) -> list[OpTiming]:
    """Per quantized op of `int8_path`: its fp32 and INT8 kernel time on this machine."""
    fp32 = onnx.load(str(fp32_path))
    int8 = onnx.load(str(int8_path))
    regions = find_regions(fp32, int8, op_types)
    if not regions:
        return []
    fvals = boundary_values(fp32_path, sorted({t for r in regions for t in r.fp32_inputs + r.fp32_outputs}), feed)
    qvals = boundary_values(int8_path, sorted({t for r in regions for t in r.int8_inputs + r.int8_outputs}), feed)
    timings: dict[str, OpTiming] = {}
    pairs = {}
    for r in regions:
        timings[r.node] = OpTiming(r.node, r.op_type)
        try:
            fm = extract(fp32, r.fp32_inputs, r.fp32_outputs, fvals)
            qm = extract(int8, r.int8_inputs, r.int8_outputs, qvals)
        except Exception as e:  # a region we cannot cut out is not a candidate, never a failure
            timings[r.node].error = f"cannot isolate: {first_line(e)}"
            continue
        pairs[r.node] = (fm, {i: fvals[i] for i in r.fp32_inputs}, qm, {i: qvals[i] for i in r.int8_inputs})
    for node, pair in pairs.items():
        try:
            f_us, q_us, kernels = time_regions({node: pair}, providers, threads, session_config, runs)[node]
        except Exception as e:
            timings[node].error = f"cannot time: {first_line(e)}"
            continue
        timings[node].fp32_us, timings[node].int8_us, timings[node].kernels = f_us, q_us, kernels
    return [timings[r.node] for r in regions]


def slower_in_int8(timings: Sequence[OpTiming], not_faster: float = NOT_FASTER) -> list[str]:
    """Ops whose INT8 region takes at least `not_faster` of its fp32 time: candidates to keep in fp32."""
    return [t.node for t in timings if t.fp32_us and t.int8_us and t.int8_us >= t.fp32_us * not_faster]


def select_ops(fp32_path: Path, int8_path: Path, work: Path, quantize: QuantizeFn, whole_timer: WholeTimer,
               feed: Mapping[str, np.ndarray], op_types: Sequence[str], providers: Sequence[Any], threads: int,
               session_config: Mapping[str, str], *, timings: Optional[Sequence[OpTiming]] = None,
               margin: float = KEEP_MARGIN) -> dict[str, Any]:
    """Time ops, re-quantize without the ones INT8 does not speed up, keep that only if the model is faster.

    Returns {"ops": [...], "kept_fp32": [...], "path": Path of the model to use, "whole_ms": {...}, "decision"}.
    `timings` replaces the per-op measurement (tests inject them; a caller may reuse an earlier one).
    """
    if timings is None:
        timings = op_latency(fp32_path, int8_path, feed, op_types, providers, threads, session_config)
    report: dict[str, Any] = {"ops": [t.to_json() for t in timings], "kept_fp32": [], "path": int8_path,
                              "threads": threads}
    slow = slower_in_int8(timings)
    if not timings:
        report["decision"] = "no quantized op could be timed on its own"
        return report
    if not slow:
        report["decision"] = f"all {len(timings)} timed ops run faster in INT8"
        return report
    # all slow ops, and the worst one alone: each op moved to fp32 adds a Q/DQ pair at its borders, so the
    # full set can lose where the worst alone still wins
    by_ratio = sorted((t for t in timings if t.node in slow), key=lambda t: t.fp32_us / t.int8_us)
    tries = {"selected": slow}
    if len(slow) > 1:
        tries["worst-only"] = [by_ratio[0].node]
    models: dict[str, Path] = {"all-int8": int8_path}
    errors = []
    for name, nodes in tries.items():
        path = work / f"opselect-{name}.onnx"
        try:
            quantize(fp32_path, path, nodes)
            models[name] = path
        except Exception as e:
            errors.append(f"re-quantizing with {len(nodes)} op(s) in fp32 failed: {first_line(e)}")
    if len(models) == 1:
        report["decision"] = "; ".join(errors)
        return report
    ms = whole_timer(models)
    report["whole_ms"] = {k: round(v, 4) for k, v in ms.items()}
    report["tried_fp32"] = {k: tries[k] for k in models if k in tries}
    best = min((k for k in models if k != "all-int8"), key=ms.get)
    if ms[best] * (1 + margin) < ms["all-int8"]:
        report.update(kept_fp32=tries[best], path=models[best],
                      decision=f"{len(tries[best])} op(s) kept in fp32: the model runs {ms['all-int8'] / ms[best]:.2f}x "
                               "faster than with every op in INT8")
    else:
        report["decision"] = (f"{len(slow)} op(s) are not faster in INT8 alone, but keeping them in fp32 did not make "
                              f"the model faster (all INT8 {ms['all-int8']:.3f} ms, best selection {ms[best]:.3f} ms): "
                              "all INT8 kept")
    return report
