"""FP8 (E4M3FN / E5M2) QDQ quantization whose scales we compute ourselves.

Why not onnxruntime's own FP8 calibration: on a plain CNN here it gave a 0.53 relative output error, so the
scales are derived directly instead — the simplest rule FP8 hardware vendors use (amax / format max):
- weights: one scale per output channel from the weight's own amax, stored as float8 initializers followed by
  DequantizeLinear;
- activations: one scale per tensor from the largest |x| seen when the fp32 model runs on calibration feeds
  (optionally a percentile instead of the max), as QuantizeLinear -> DequantizeLinear pairs.
Only the inputs of Conv, MatMul and Gemm are quantized (biases stay fp32, as FP8 GEMM kernels take them).

float8 types need opset 19; older models are upgraded with onnx's version converter. The result loads and runs
on onnxruntime's CPU provider only under `fp8_session_options()` (see there), where it simulates FP8 rounding
in fp32 arithmetic: the fidelity figures are real, the speed is not.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.core import (
    TWO_GB,
    InputError,
    ModelError,
    RuntimeFailure,
    UsageError,
    check_output_path,
    drop_unused,
    initializer_bytes,
    save_model,
    sessions,
)
from compress.core import (
    first_line as _first_line,
)
from compress.evaluate import onnx_outputs
from compress.quantization.ops import quantizable_positions
from export import metadata
from export import write_model as _write_onnx

MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear accept float8 types from opset 19
_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: the floor of any scale


@dataclass(frozen=True)
class Fp8Format:
    name: str
    max: float  # largest finite magnitude
    onnx_type: int
    torch_dtype: torch.dtype


FORMATS: dict[str, Fp8Format] = {
    "e4m3fn": Fp8Format("e4m3fn", 448.0, TensorProto.FLOAT8E4M3FN, torch.float8_e4m3fn),
    "e5m2": Fp8Format("e5m2", 57344.0, TensorProto.FLOAT8E5M2, torch.float8_e5m2),
}


def fp8_format(fmt: str) -> Fp8Format:
    try:
        return FORMATS[fmt.lower()]
    except KeyError:
        raise UsageError(f"FP8 format {fmt!r}: one of {', '.join(FORMATS)}") from None


def fp8_scale(amax: float, fmt: str = "e4m3fn") -> float:
    """amax / format max, so that |x| == amax lands on the largest finite float8 value.

    amax == 0 (an all-zero tensor or a pruned channel) gets scale 1.0: any positive scale represents zeros
    exactly, and a tiny one would only invite overflow later.
    """
    amax = float(amax)
    if not np.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be finite and >= 0, got {amax}")
    if amax == 0:
        return 1.0
    return max(amax / fp8_format(fmt).max, _TINY)  # never a float32 zero, whatever the amax


def fp8_scales(amax: np.ndarray, fmt: str = "e4m3fn") -> np.ndarray:
    """fp8_scale over an array (per-channel weights), float32 as QDQ wants its scales."""
    amax = np.asarray(amax, dtype=np.float64)
    if not np.isfinite(amax).all() or (amax < 0).any():
        raise ValueError("amax must be finite and >= 0")
    return np.where(amax > 0, np.maximum(amax / fp8_format(fmt).max, _TINY), 1.0).astype(np.float32)


def to_fp8(x: np.ndarray, fmt: str = "e4m3fn") -> torch.Tensor:
    """Saturating round-to-nearest-even cast to float8, as QuantizeLinear(saturate=1) does.

    torch does the rounding (a dependency already; ml_dtypes is not guaranteed by every onnx version we accept).
    Without the clip, values beyond the format's max would become NaN (E4M3FN) or inf (E5M2).
    """
    f = fp8_format(fmt)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.clamp(-f.max, f.max).to(f.torch_dtype)


def _fp8_tensor(values: torch.Tensor, name: str, fmt: Fp8Format) -> TensorProto:
    """A float8 initializer from raw bytes (one byte per element)."""
    t = TensorProto()
    t.name, t.data_type = name, fmt.onnx_type
    t.dims.extend(values.shape)
    t.raw_data = values.contiguous().view(torch.uint8).numpy().tobytes()
    return t


def quantize_weight(w: np.ndarray, axis: int | None, fmt: str = "e4m3fn") -> tuple[torch.Tensor, np.ndarray]:
    """(float8 values, float32 scales): per-channel along `axis` (scales 1-D), or per-tensor (scalar) for None."""
    if axis is None:
        scale = np.array(fp8_scale(float(np.abs(w).max(initial=0.0)), fmt), dtype=np.float32)
        return to_fp8(w / scale, fmt), scale
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = fp8_scales(np.abs(w).max(axis=reduce, initial=0.0), fmt)
    shape = [1] * w.ndim
    shape[axis] = -1
    return to_fp8(w / scale.reshape(shape), fmt), scale


def fp8_session_options() -> Any:
    """onnxruntime SessionOptions for measuring an FP8 QDQ model's fidelity on the CPU provider.

    The files we write give the same outputs at every level (DISABLE/BASIC/EXTENDED/ALL; onnxruntime 1.32,
    tests/test_quant_fp8.py), once the ReLU/Clip sits after the DequantizeLinear (see _Fp8Rewriter.activation):
    EXTENDED/ALL delete a Relu feeding a float8 QuantizeLinear, and 1.31.1's ALL refused the file outright (QDQ
    fusions into QLinearConv, which has no float8 kernel). BASIC runs every Q/DQ as its own kernel (the ONNX
    spec's numbers, FP8 rounding simulated, arithmetic in fp32) whatever a later onnxruntime fuses, so fidelity
    is judged there; `session.disable_quant_qdq` keeps QDQ fusions out should they move into the basic level.
    """
    return sessions.session_options(level="basic", config={"session.disable_quant_qdq": "1"})


# --- graph inspection ------------------------------------------------------------------------------------------


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of a node's second input: where the per-channel scales run.

    Conv W is [Cout, Cin/g, k...] (axis 0); MatMul B is [..., K, N] (last axis); Gemm B is [K, N], or [N, K]
    with transB=1. None (per-tensor) for a rank-0/1 weight.
    """
    if rank < 2:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return rank - 1


def _select(nodes: list[onnx.NodeProto], include: Iterable[str] | None, exclude: Iterable[str]) -> tuple[list[int], list[str]]:
    """Positions (in `nodes`) to quantize and the names left in fp32; unknown names are refused (a typo must not
    pass silently)."""
    names = [n.name for n in nodes]
    known = set(names)
    include = None if include is None else list(include)
    exclude = list(exclude)
    unknown = [n for n in (include or []) + exclude if n not in known]
    if unknown:
        raise InputError(f"not a Conv/MatMul/Gemm node of the model: {', '.join(sorted(set(unknown)))}")
    chosen = [i for i, n in enumerate(nodes) if (include is None or n.name in include) and n.name not in exclude]
    chosen_set = set(chosen)
    return chosen, [n for i, n in enumerate(names) if i not in chosen_set]


# --- opset -----------------------------------------------------------------------------------------------------


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET) -> onnx.ModelProto:
    """The model at opset >= target: the version converter first; for opset 18 a plain bump is exact.

    Every operator that changed from 18 to 19 only gained types or attributes whose defaults keep the old
    behaviour, so relabelling is safe there when the converter cannot cope (e.g. a model with functions).
    Older models need the converter's rewrites; when it fails they are refused.
    """
    current = opset_of(model)
    if current >= target:
        return model
    try:
        upgraded = onnx.version_converter.convert_version(model, target)
    except Exception as e:
        if current != target - 1:
            raise ModelError(
                f"FP8 needs opset {target} (the model has {current}) and onnx's version converter failed: "
                f"{_first_line(e)}; re-export with --opset {target}"
            ) from e
        upgraded = onnx.ModelProto()
        upgraded.CopyFrom(model)
        for o in upgraded.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
    return upgraded


# --- calibration -----------------------------------------------------------------------------------------------


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value, from shape inference where it succeeds (no failure if it does not)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def tensor_values(model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]],
                  what: str = "calibration") -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the values of the named tensors when the model runs on it (graph inputs from the feed).

    The model runs once per feed in a temp copy whose graph outputs include every tensor asked for, so one
    pass serves all of them; callers reduce each value as it comes (nothing is kept across feeds).
    """

    graph_inputs = [i.name for i in model.graph.input]
    types = _elem_types(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in outs and name not in graph_inputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, types.get(name) or TensorProto.FLOAT, None))
    fetch = [n for n in names if n not in graph_inputs]
    with tempfile.TemporaryDirectory(prefix=".probe-") as work:
        path = Path(work) / "probe.onnx"
        save_model(probe, path)
        try:
            sess = sessions.session(path)
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load the model for {what}: {_first_line(e)}") from e
        feed_names = [i.name for i in sess.get_inputs()]
        for i, batch in enumerate(feeds):
            missing = [n for n in feed_names if n not in batch]
            if missing:
                raise InputError(f"{what} sample {i} lacks input(s) {', '.join(missing)}")
            run_feeds = {n: np.ascontiguousarray(batch[n]) for n in feed_names}
            try:
                values = dict(zip(fetch, sess.run(fetch, run_feeds))) if fetch else {}
            except Exception as e:
                raise RuntimeFailure(f"onnxruntime failed on {what} sample {i}: {_first_line(e)}") from e
            values.update({n: batch[n] for n in names if n in graph_inputs})
            yield values


def collect_amax(model: onnx.ModelProto, names: Sequence[str], calib_feeds: Sequence[Mapping[str, np.ndarray]],
                 percentile: float | None = None) -> dict[str, float]:
    """Largest |x| (or the `percentile` of |x|, maxed over samples) of each named float tensor over the feeds."""
    if not calib_feeds:
        raise InputError("FP8 quantization needs at least one calibration sample")
    if percentile is not None and not 0 < percentile <= 100:
        raise UsageError(f"percentile {percentile}: must be in (0, 100]")
    amax = {n: 0.0 for n in names}

    def reduce(x: np.ndarray) -> float:
        a = np.abs(np.asarray(x, dtype=np.float32))
        if a.size == 0:
            return 0.0
        return float(np.percentile(a, percentile)) if percentile is not None else float(a.max())

    for values in tensor_values(model, names, calib_feeds):
        for n, v in values.items():
            amax[n] = max(amax[n], reduce(v))
    bad = [n for n, a in amax.items() if not np.isfinite(a)]
    if bad:
        raise ModelError(f"calibration produced non-finite values in {', '.join(bad[:5])}; FP8 scales cannot be set")
    return amax


# --- rewriting -------------------------------------------------------------------------------------------------


class QdqRewriter:
    """Puts Q/DQ pairs in front of the planned inputs (see `_plan`), each shared by all quantized consumers of the
    same tensor, just before its first consumer so the node order stays valid. The number format is the
    subclass's: `weight_tensors` encodes a weight, `activation_qparams` gives an activation's scale and zero."""

    tag = "q"

    def __init__(self, model: onnx.ModelProto, per_channel: bool) -> None:
        self.model, self.per_channel = model, per_channel
        self.inits = {t.name: t for t in model.graph.initializer}
        self.taken = {t.name for t in model.graph.initializer} | {v for n in model.graph.node for v in list(n.input) + list(n.output)}
        self.taken |= {i.name for i in model.graph.input}
        self.done: dict[tuple[str, int | None], str] = {}  # (tensor, axis) -> dequantized name
        self.new_inits: list[TensorProto] = []

    def weight_tensors(self, w: np.ndarray, axis: int | None, q_name: str, zero_name: str) -> tuple[TensorProto, np.ndarray, TensorProto]:
        """(quantized weight, float32 scales, zero points) of the float weight `w`."""
        raise NotImplementedError

    def activation_qparams(self, name: str, zero_name: str) -> tuple[np.ndarray, TensorProto]:
        """(float32 scale, zero point) of the activation `name`."""
        raise NotImplementedError

    def _name(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def weight(self, name: str, node: onnx.NodeProto, slot: int, emit: list[onnx.NodeProto]) -> str:
        w = numpy_helper.to_array(self.inits[name]).astype(np.float32)
        axis = weight_axis(node, w.ndim) if (self.per_channel and slot == 1) else None
        key = (name, axis)
        if key not in self.done:
            qn, sn, zn, dn = (self._name(f"{name}_{self.tag}{s}") for s in ("", "_scale", "_zero_point", "_dq"))
            q, scale, zero = self.weight_tensors(w, axis, qn, zn)
            self.new_inits += [q, numpy_helper.from_array(scale, sn), zero]
            kw = {"axis": axis} if axis is not None else {}
            emit.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dn], name=self._name(f"{name}_{self.tag}_DequantizeLinear"), **kw))
            self.done[key] = dn
        return self.done[key]

    def activation(self, name: str, emit: list[onnx.NodeProto]) -> str:
        key = (name, None)
        if key not in self.done:
            sn, zn, qn, dn = (self._name(f"{name}_{self.tag}{s}") for s in ("_scale", "_zero_point", "_q", "_dq"))
            scale, zero = self.activation_qparams(name, zn)
            self.new_inits += [numpy_helper.from_array(np.asarray(scale, dtype=np.float32), sn), zero]
            emit.append(helper.make_node("QuantizeLinear", [name, sn, zn], [qn], name=self._name(f"{name}_{self.tag}_QuantizeLinear")))
            emit.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dn], name=self._name(f"{name}_{self.tag}_DequantizeLinear")))
            self.done[key] = dn
        return self.done[key]

    def apply(self, plan: Mapping[int, list[tuple[int, str]]]) -> None:
        """Rewrite the model in place: the planned inputs read their dequantized copies; unused fp32 weights go."""
        g = self.model.graph
        new_nodes: list[onnx.NodeProto] = []
        for pos, original in enumerate(g.node):
            node = onnx.NodeProto()
            node.CopyFrom(original)
            for slot, kind in plan.get(pos, []):
                name = node.input[slot]
                node.input[slot] = self.weight(name, node, slot, new_nodes) if kind == "weight" else self.activation(name, new_nodes)
            new_nodes.append(node)
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(self.new_inits)
        drop_unused(self.model)


class _Fp8Rewriter(QdqRewriter):
    """float8 weights (per output channel or per tensor) and activations, scales from amax (see the module doc)."""

    tag = "fp8"

    def __init__(self, model: onnx.ModelProto, fmt: Fp8Format, amax: Mapping[str, float], per_channel: bool) -> None:
        super().__init__(model, per_channel)
        self.fmt, self.amax = fmt, amax
        self.clamps = {n.output[0]: n for n in model.graph.node if n.op_type in ("Relu", "Clip") and n.output}

    def weight_tensors(self, w: np.ndarray, axis: int | None, q_name: str, zero_name: str) -> tuple[TensorProto, np.ndarray, TensorProto]:
        q, scale = quantize_weight(w, axis, self.fmt.name)
        zero = to_fp8(np.zeros(scale.shape, np.float32), self.fmt.name)
        return _fp8_tensor(q, q_name, self.fmt), scale, _fp8_tensor(zero, zero_name, self.fmt)

    def activation_qparams(self, name: str, zero_name: str) -> tuple[np.ndarray, TensorProto]:
        zero = to_fp8(np.zeros((), np.float32), self.fmt.name)
        return np.array(fp8_scale(self.amax[name], self.fmt.name), dtype=np.float32), _fp8_tensor(zero, zero_name, self.fmt)

    def activation(self, name: str, emit: list[onnx.NodeProto]) -> str:
        """A ReLU/Clip output is quantized as ReLU/Clip(DQ(Q(its input))), not DQ(Q(ReLU/Clip(x))).

        The same numbers (float8 rounding is odd-symmetric and keeps 0, so the clamp commutes with it), but
        onnxruntime's EXTENDED/ALL levels (its default) drop a Relu or Clip that feeds a QuantizeLinear, a rewrite
        valid only for integer types whose zero point is the type's minimum: on resnet_tiny that made the output
        wrong by 2.45x its norm (onnxruntime 1.32). With the clamp after the DequantizeLinear no fusion sees the
        pattern and all four levels give the same outputs (tests/test_quant_fp8.py)."""
        clamp = self.clamps.get(name)
        key = (name, -1)
        if clamp is None or not clamp.input or not clamp.input[0]:
            return super().activation(name, emit)
        if key not in self.done:
            sn, zn, qn, dn, cn = (self._name(f"{name}_{self.tag}{s}") for s in ("_scale", "_zero_point", "_q", "_dq", "_clamped"))
            scale, zero = self.activation_qparams(name, zn)
            self.new_inits += [numpy_helper.from_array(np.asarray(scale, dtype=np.float32), sn), zero]
            emit.append(helper.make_node("QuantizeLinear", [clamp.input[0], sn, zn], [qn], name=self._name(f"{name}_{self.tag}_QuantizeLinear")))
            emit.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dn], name=self._name(f"{name}_{self.tag}_DequantizeLinear")))
            after = helper.make_node(clamp.op_type, [dn, *clamp.input[1:]], [cn], name=self._name(f"{clamp.name or name}_after_dq"))
            after.attribute.extend(clamp.attribute)
            emit.append(after)
            self.done[key] = cn
        return self.done[key]


def plan_qdq(model: onnx.ModelProto, chosen: list[int]) -> tuple[dict[int, list[tuple[int, str]]], list[dict[str, str]]]:
    """Per chosen node (by position in the graph): (slot, 'weight'|'activation') of the inputs to quantize.

    Only float32 inputs are quantized (Q/DQ scales here are float32); a node with another input type is skipped
    and reported.
    """
    types = _elem_types(model)
    inits = {t.name for t in model.graph.initializer}
    plan: dict[int, list[tuple[int, str]]] = {}
    skipped: list[dict[str, str]] = []
    for pos in chosen:
        node = model.graph.node[pos]
        slots, bad = [], None
        for slot in (0, 1):
            name = node.input[slot] if len(node.input) > slot else ""
            if not name:
                continue
            if types.get(name) not in (TensorProto.FLOAT, None, 0):
                bad = f"input {name!r} is {TensorProto.DataType.Name(types[name])}, not float32"
                break
            slots.append((slot, "weight" if name in inits else "activation"))
        if bad:
            skipped.append({"node": node.name, "why": bad})
        else:
            plan[pos] = slots
    return plan, skipped


def quantize_fp8(
    src: str | Path,
    dst: str | Path,
    calib_feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    fmt: str = "e4m3fn",
    weight_per_channel: bool = True,
    include: list[str] | None = None,
    exclude: Iterable[str] = (),
    percentile: float | None = None,
    activation_amax: Mapping[str, float] | None = None,
    simulated: bool = True,
) -> dict[str, Any]:
    """Write an FP8 QDQ copy of the ONNX model `src` to `dst` (atomically) and return what was done.

    include/exclude name Conv/MatMul/Gemm nodes to quantize / keep in fp32 (include None = all); the
    sensitivity search uses them. `activation_amax` (the result's own "activation_amax" from an earlier call on
    the same model and feeds) skips calibration for the tensors it covers: a per-layer sensitivity search
    quantizes the model once per layer, and should not re-run the calibration each time. `simulated` goes into
    the metadata: True when the target runs the QDQ graph in fp32 arithmetic (onnxruntime's CPU provider),
    False when a backend maps it to FP8 kernels.
    """
    f = fp8_format(fmt)
    src, dst = Path(src), check_output_path(dst, [src])
    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as e:
        raise InputError(f"cannot read {src}: {_first_line(e)}") from e
    from_opset = opset_of(model)
    model = upgrade_opset(model, MIN_OPSET)
    positions = quantizable_positions(model.graph)
    chosen_idx, left = _select([model.graph.node[i] for i in positions], include, exclude)
    chosen = [positions[i] for i in chosen_idx]
    plan, skipped = plan_qdq(model, chosen)
    act_names = list(dict.fromkeys(model.graph.node[p].input[s] for p, slots in plan.items() for s, kind in slots if kind == "activation"))
    known = dict(activation_amax or {})
    missing = [n for n in act_names if n not in known]
    amax = {**known, **(collect_amax(model, missing, calib_feeds, percentile) if missing else {})}
    amax = {n: amax[n] for n in act_names}

    quantized = [model.graph.node[p].name for p in chosen if p in plan]
    _Fp8Rewriter(model, f, amax, weight_per_channel).apply(plan)

    skipped_names = {s["node"] for s in skipped}
    excluded = left + sorted(skipped_names)
    meta = metadata.get_metadata(model) or {}
    meta.pop("schema", None)
    meta["opset"] = opset_of(model)
    meta["quantization"] = {"format": "fp8", "fp8_format": f.name, "simulated": simulated, "excluded": excluded,
                            "weight_per_channel": weight_per_channel, "percentile": percentile,
                            "calibration_samples": len(calib_feeds)}
    metadata.set_metadata(model, meta)
    large = initializer_bytes(model) >= TWO_GB
    if not large:  # the in-memory checker cannot take a proto over 2 GB
        try:
            onnx.checker.check_model(model, full_check=False)
        except Exception as e:
            raise ModelError(f"the FP8 model fails onnx's checker: {_first_line(e)}") from e
    _write_onnx(model, dst, large)
    return {
        "path": str(dst), "fp8_format": f.name, "opset": {"from": from_opset, "to": opset_of(model)},
        "quantized": quantized, "excluded": excluded, "skipped": skipped,
        "activation_amax": amax, "weight_per_channel": weight_per_channel, "percentile": percentile,
        "calibration_samples": len(calib_feeds), "size_bytes": dst.stat().st_size,
    }


def fp8_outputs(path: str | Path, batches: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """compress.evaluate.compare.onnx_outputs for an FP8 QDQ model: the same CPU run under fp8_session_options()."""
    return onnx_outputs(path, batches, session_options=fp8_session_options())
