"""INT8 through Intel Neural Compressor: INC 3.x PT2E static quantization in torch, exported to ONNX QDQ.

The second INT8 backend next to compress.quantization.int8 (onnxruntime's quantizer on the exported ONNX). This one
quantizes the torch module itself:

1. torch.export (strict, as INC's own `neural_compressor.torch.export.export` does first: the non-strict graph
   of ResNet's shared in-place ReLU modules fails torchao's X86InductorQuantizer partition matching with
   "Input partition has more than one output node"), batch axis dynamic when the model allows it;
2. INC `prepare(exported, StaticQuantConfig(...))`, forward passes over the calibration batches, `convert`:
   INC's W8A8PT2EQuantizer, which on torch >= 2.11 is torchao's X86InductorQuantizer with INC's observers;
3. torch.onnx.export(dynamo=True) of the converted GraphModule: onnxscript's torchlib turns
   quantized_decomposed quantize/dequantize_per_tensor|channel into QuantizeLinear/DequantizeLinear (QDQ);
4. ONNX clean-up: INC's convert does not pass `fold_quantize` to torchao (pt2e_static_quant_entry drops the
   kwargs), so weights arrive as float -> QuantizeLinear -> Clip -> DequantizeLinear; those are folded into
   int8 initializers here (a quarter of the file size; onnxruntime would fold them at every load otherwise);
5. QDQ completion for onnxruntime (`complete=True`): the X86InductorQuantizer annotates conv + add (+ relu) as
   one fused pattern for Inductor's oneDNN kernels, which add in float inside the conv, so that conv's output
   carries no QuantizeLinear. onnxruntime has no such kernel: the conv then runs in fp32 (5 of 20 ResNet-18
   3x3 convs and the 3 downsample convs; 12.2 ms vs 5.4 ms for onnxruntime's own INT8 at 224x224, 1 thread).
   Completion calibrates those conv outputs on the same batches (min/max, INC's activation dtype and symmetry)
   and inserts QuantizeLinear/DequantizeLinear there, so onnxruntime fuses QLinearConv and QLinearAdd.

What INC's PT2E path supports, and what follows for the device presets (compress.quantization.presets):
- activations uint8 or int8, asymmetric or symmetric: U8S8 and S8S8 presets map directly;
- weights int8 only: the X86InductorQuantizer refuses uint8 weights ("Unsupported quantization_spec ... for
  weight"), so U8U8 (QNN) and S8U8 presets are refused with a UsageError;
- no reduce_range (7-bit weights for x86 without VNNI): weights use the full int8 range; noted in the result;
- the op set is the X86InductorQuantizer's (conv, linear, matmul, pooling, add, ...), not the preset's op_types.

Against --backend ort (bench/quant_inc.py, 2-vCPU AVX512-VNNI, 1 thread): resnet_demo 5.77 ms vs 5.39 ms, the
gap being compress.quantization.int8's space-to-depth stem rewrite (ort's graph without it: 5.67 ms); all-MiniLM-L6-v2 8.50 vs
8.27 ms, a tie, but static activation ranges give per-sentence cosine 0.991 where ort's dynamic ones give 0.997.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import logging
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from compress.core import (
    TWO_GB,
    EdgeError,
    ModelError,
    UsageError,
    check_onnx_output,
    onnxgraph,
    sessions,
)
from compress.core import (
    first_line as _first_line,
)
from compress.evaluate import fidelity, onnx_outputs, torch_outputs
from compress.quantization.candidates import pick, time_candidates, timing_json
from compress.quantization.int8 import residual_add_to_sum
from compress.quantization.presets import Preset, preset_for
from devices import DeviceProfile
from export import flatten_outputs, get_metadata, input_specs, set_metadata, silenced, write_model

BACKEND = "inc"
METHODS = {"minmax": "minmax", "kl": "kl"}  # INC act_algo: MovingAverageMinMaxObserver / HistogramObserver
DYNAMO_MIN_OPSET = 18
# Ops whose second input is a weight: the ones whose INT8-ness matters for speed.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# What onnxruntime's CPU provider runs in integer arithmetic after its QDQ fusions, and their float twins.
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
                "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM")
FLOAT_KERNELS = ("Conv", "FusedConv", "NchwcConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")
_PASS_THROUGH = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast")
_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_ONNX_QTYPE = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}


# --------------------------------------------------------------------------------------------- quiet INC


def _quiet() -> Any:
    """INC logs INFO/WARNING lines on every call, torchao and torch.export log warnings, torch.onnx prints
    progress: none of it is for the user (failures come back as exceptions and become one-line ModelErrors)."""
    return silenced(True, logging.CRITICAL)


def _inc() -> Any:
    """Import INC's PT2E entry points quietly (it logs accelerator detection at import).

    Imported with logging disabled but stderr untouched: INC's logger binds its StreamHandler to sys.stderr on
    first use, and a redirected stream there would swallow INC's messages for the rest of the process.
    """
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = importlib.import_module("neural_compressor.torch.quantization")
            compat = importlib.import_module("neural_compressor.torch.algorithms.pt2e_quant.pt2e_compat")
    except ImportError as e:
        raise ModelError(f"the INC backend needs neural-compressor-pt (pip install neural-compressor-pt): "
                         f"{_first_line(e)}") from e
    finally:
        logging.disable(logging.NOTSET)

    class Inc:
        StaticQuantConfig = q.StaticQuantConfig
        prepare = staticmethod(q.prepare)
        convert = staticmethod(q.convert)
        move_to_eval = staticmethod(compat.move_exported_model_to_eval)

    try:
        from importlib.metadata import version as _dist_version

        Inc.version = _dist_version("neural-compressor-pt")
    except Exception:
        Inc.version = "unknown"
    return Inc


# --------------------------------------------------------------------------------------------- config


def inc_config(preset: Preset, method: str = "minmax") -> tuple[dict[str, Any], list[str]]:
    """INC StaticQuantConfig keyword arguments for a device preset, and notes on what INC cannot honour."""
    if method not in METHODS:
        raise UsageError(f"INC calibration method {method!r}: one of {', '.join(METHODS)}")
    if preset.weight_type != "int8":
        raise UsageError(f"preset {preset.name} ({preset.signedness}) has {preset.weight_type} weights; INC's PT2E "
                         "quantizer (X86InductorQuantizer) takes int8 weights only: use --backend ort for this device")
    opts = preset.options()
    kwargs = {
        "act_dtype": preset.activation_type, "act_sym": bool(opts.get("ActivationSymmetric", False)),
        "act_granularity": "per_tensor", "act_algo": METHODS[method],
        "w_dtype": "int8", "w_sym": bool(opts.get("WeightSymmetric", True)),
        "w_granularity": "per_channel" if preset.per_channel else "per_tensor", "w_algo": "minmax",
    }
    notes = []
    if not kwargs["w_sym"]:
        notes.append("asymmetric weights requested: INC's X86InductorQuantizer quantizes weights symmetrically")
        kwargs["w_sym"] = True
    if preset.reduce_range:
        notes.append("the preset asks for reduce_range (7-bit weights, for x86 without VNNI); INC has no such option: "
                     "weights use the full int8 range, and VPMADDUBSW may saturate on this device")
    if preset.op_types is not None and preset.ops_from_profile:
        notes.append(f"the profile's op_types {list(preset.op_types)} are not applied: INC quantizes the ops "
                     "X86InductorQuantizer annotates")
    if preset.target != "cpu":
        notes.append(f"preset targets {preset.target}: INC's quantizer is built for x86 CPUs; check fidelity and "
                     "speed on the device")
    return kwargs, notes


# --------------------------------------------------------------------------------------------- torch side


def _as_tensors(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


def _ordered(module: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch in forward()'s argument order (the ONNX input order), unknown keys refused."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return dict(batch)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD
                     for p in inspect.signature(module.forward).parameters.values())
    unknown = [k for k in batch if k not in params]
    if unknown and not has_var_kw:
        raise ModelError(f"forward() has no argument(s) {', '.join(unknown)} (it takes {', '.join(params)})")
    return {**{k: batch[k] for k in params if k in batch}, **{k: batch[k] for k in unknown}}


def _tile(example: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) if v.dim() else v for k, v in example.items()}


def _batch_dims(example: dict[str, torch.Tensor]) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1)
    return {k: {0: batch} if v.dim() else {} for k, v in example.items()}


def _export(module: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: bool) -> tuple[Any, dict[str, Any]]:
    """torch.export as INC's export does (strict first, then non-strict), marked for INC's prepare.

    Our own loop rather than neural_compressor.torch.export.export because that one logs the exception and
    returns None: the user would get "Failed to export the model" without the reason.
    """
    feeds = _tile(example, 2) if dynamic and all(v.dim() and v.shape[0] == 1 for v in example.values() if v.dim()) else example
    shapes = _batch_dims(example) if dynamic else None
    errors = []
    for strict in (True, False):
        try:
            with _quiet(), torch.no_grad():
                ep = torch.export.export(module, (), kwargs=feeds, dynamic_shapes=shapes, strict=strict)
            gm = ep.module()
        except Exception as e:
            errors.append(f"{'strict' if strict else 'non-strict'}: {type(e).__name__}: {_first_line(e)}")
            continue
        gm._exported = True  # what INC's prepare checks (set by its own export)
        gm.dynamic_shapes = shapes
        return gm, {"mode": "strict" if strict else "non-strict", "dynamic_batch": dynamic, "trace_batch": _batch_of(feeds),
                    "errors": errors}
    raise ModelError(f"torch.export failed ({'; '.join(errors)})")


def _batch_of(feeds: Mapping[str, torch.Tensor]) -> int:
    return next((int(v.shape[0]) for v in feeds.values() if v.dim()), 1)


def _static_batches(calib: Sequence[dict[str, torch.Tensor]], batch: int) -> list[dict[str, torch.Tensor]]:
    """Calibration batches cut to the example's batch size, for a graph exported with a fixed batch."""
    out = []
    for b in calib:
        n = _batch_of(b)
        if n % batch:
            raise ModelError(f"the model exports only with a fixed batch of {batch}, and a calibration batch has {n} samples")
        out += [{k: v[i:i + batch] if v.dim() else v for k, v in b.items()} for i in range(0, n, batch)]
    return out


def _eval_mode(gm: torch.nn.Module) -> None:
    for m in gm.modules():  # GraphModule.eval() is refused for exported modules on some torch versions
        m.training = False


# --------------------------------------------------------------------------------------------- ONNX side


def _quantize_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), per-axis when scale is 1-D."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zp.astype(np.int32)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def fold_weight_quantization(model: onnx.ModelProto) -> int:
    """Constant QuantizeLinear (and a Clip on its output, as torchlib writes quant_min/max) -> integer initializers.

    Returns how many QuantizeLinear nodes were folded. Exact: it computes what QuantizeLinear computes.
    """
    g = model.graph
    consts = onnxgraph.constant_values(model.graph)
    users = onnxgraph.consumers(model.graph)
    outputs = {o.name for o in g.output}
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    folded = 0
    for n in list(g.node):
        if n.op_type != "QuantizeLinear" or n.domain not in ("", "ai.onnx") or len(n.input) < 3:
            continue
        if not all(i in consts for i in n.input[:3]):
            continue
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 1)
        x, scale, zp = consts[n.input[0]], consts[n.input[1]], consts[n.input[2]]
        q = _quantize_np(x, scale, zp, axis if axis >= 0 else axis + x.ndim)
        name, out = n.output[0], n.output[0]
        nxt = users.get(out, [])
        if (len(nxt) == 1 and nxt[0].op_type == "Clip" and out not in outputs and len(nxt[0].input) == 3
                and all(i in consts for i in nxt[0].input[1:])):
            clip = nxt[0]
            q = np.clip(q, consts[clip.input[1]], consts[clip.input[2]]).astype(q.dtype)
            name = clip.output[0]
            drop.add(id(clip))
        drop.add(id(n))
        new_inits.append(numpy_helper.from_array(q, name))
        folded += 1
    if folded:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(new_inits)
        onnxgraph.drop_unused(model, constant_nodes=True)
    return folded


def _weight_source(name: str, producers: Mapping[str, onnx.NodeProto], inits: Mapping[str, onnx.TensorProto]) -> Optional[str]:
    """Where a weight input comes from: "int8" (an integer initializer through DequantizeLinear), "float" (a float
    initializer), None when it is computed (an activation: attention-score MatMuls)."""
    seen_dq = False
    for _ in range(8):
        if name in inits:
            integer = inits[name].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                                                onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
            return "int8" if seen_dq and integer else "float"
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            seen_dq = True
        elif node.op_type == "Constant":
            return "float"
        elif node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def qdq_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Q/DQ node counts, and for each Conv/Gemm/MatMul with a constant weight whether it comes as int8 through
    DequantizeLinear (what onnxruntime needs to run it as an INT8 kernel)."""
    ops = Counter(n.op_type for n in model.graph.node)
    producers = onnxgraph.producers(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    int8, floating = [], []
    for n in model.graph.node:
        if n.op_type in WEIGHTED_OPS and len(n.input) >= 2:
            src = _weight_source(n.input[1], producers, inits)
            if src == "int8":
                int8.append(n.name)
            elif src == "float":
                floating.append(n.name)
    return {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"],
            "weighted_ops": len(int8) + len(floating), "weights_via_dq": len(int8), "float_weight_ops": floating}


def int8_kernels(path: str | Path) -> dict[str, Any]:
    """What onnxruntime's CPU provider actually runs: the graph after its QDQ fusions (ORT_ENABLE_EXTENDED: the
    level with the QDQ -> QLinearConv/QGemm/MatMulIntegerToFloat fusions, before hardware-specific layouts),
    counted as integer kernels vs float Conv/Gemm/MatMul kernels on a constant weight."""

    with tempfile.TemporaryDirectory(prefix=".ort-opt-") as tmp:
        opt_path = Path(tmp) / "opt.onnx"
        try:
            sessions.session(path, level="extended", optimized_path=opt_path)
            opt = onnx.load(str(opt_path))
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load {path}: {_first_line(e)}") from e
    ops = Counter(n.op_type for n in opt.graph.node)
    producers = onnxgraph.producers(opt.graph)
    inits = {t.name: t for t in opt.graph.initializer}
    float_ops = [n.name or n.output[0] for n in opt.graph.node if n.op_type in FLOAT_KERNELS and len(n.input) >= 2
                 and _weight_source(n.input[1], producers, inits) is not None]
    return {"int8": {k: ops[k] for k in INT8_KERNELS if ops[k]}, "int8_total": sum(ops[k] for k in INT8_KERNELS),
            "float_weight_ops": len(float_ops), "float_nodes": float_ops[:20]}


def _qparams(lo: float, hi: float, dtype: str, sym: bool) -> tuple[float, int]:
    """Scale and zero point as torchao's MinMax observers derive them from a range."""
    qmin, qmax = _QRANGE[dtype]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    eps = float(np.finfo(np.float32).eps)
    if sym:
        amax = max(-lo, hi)
        scale = max(amax / ((qmax - qmin) / 2), eps)
        zp = 0 if dtype == "int8" else 128
    else:
        scale = max((hi - lo) / (qmax - qmin), eps)
        zp = int(np.clip(qmin - round(lo / scale), qmin, qmax))
    return float(scale), zp


def _quantized_after(name: str, users: Mapping[str, list[onnx.NodeProto]]) -> bool:
    """The tensor reaches only QuantizeLinear nodes, directly or through a Relu/Clip used by nothing else
    (onnxruntime folds Relu -> QuantizeLinear into the quantization when the zero point is the range's low end)."""
    after = users.get(name, [])
    if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
        after = users.get(after[0].output[0], [])
    return bool(after) and all(u.op_type == "QuantizeLinear" for u in after)


def complete_conv_qdq(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], act_dtype: str,
                      act_sym: bool, work: Path) -> list[str]:
    """Insert QuantizeLinear -> DequantizeLinear on the outputs of int8-weight Convs that have none.

    The ranges come from running this (already quantized) graph on the calibration feeds with those conv outputs
    exposed. Returns the names of the completed convs. onnxruntime then fuses DQ -> Conv -> Q into QLinearConv,
    and the residual DQ + DQ -> Add -> (Relu ->) Q into QLinearAdd.
    """
    producers = onnxgraph.producers(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    users = onnxgraph.consumers(model.graph)
    outputs = {o.name for o in model.graph.output}
    todo = []
    for n in model.graph.node:
        if n.op_type != "Conv" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        x = producers.get(n.input[0])
        if x is None or x.op_type != "DequantizeLinear" or _weight_source(n.input[1], producers, inits) != "int8":
            continue
        if n.output[0] in outputs or _quantized_after(n.output[0], users):
            continue
        todo.append(n)
    if not todo:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in todo:
        if n.output[0] not in have:
            probe.graph.output.append(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    path = work / "probe.onnx"
    onnx.save(probe, str(path), save_as_external_data=True, location="probe.onnx.data", size_threshold=1024)
    names = [o.name for o in probe.graph.output]
    lo = {n.output[0]: np.inf for n in todo}
    hi = {n.output[0]: -np.inf for n in todo}
    for outs in onnx_outputs(path, feeds):
        for name, val in zip(names, outs):
            if name in lo:
                lo[name] = min(lo[name], float(np.min(val)))
                hi[name] = max(hi[name], float(np.max(val)))
    g = model.graph
    order = {id(n): i for i, n in enumerate(g.node)}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    qtype = _ONNX_QTYPE[act_dtype]
    for n in todo:
        y = n.output[0]
        scale, zp = _qparams(lo[y], hi[y], act_dtype, act_sym)
        base = (n.name or y) + "_out"
        g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), f"{base}_scale"))
        g.initializer.append(helper.make_tensor(f"{base}_zp", qtype, [], [zp]))
        q = helper.make_node("QuantizeLinear", [y, f"{base}_scale", f"{base}_zp"], [f"{base}_q"], name=f"{base}_q")
        dq = helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"], [f"{base}_dq"], name=f"{base}_dq")
        for u in users[y]:
            for k, i in enumerate(u.input):
                if i == y:
                    u.input[k] = f"{base}_dq"
        inserts[order[id(n)]] = [q, dq]
    nodes = []
    for i, n in enumerate(list(g.node)):
        nodes.append(n)
        nodes += inserts.get(i, [])
    del g.node[:]
    g.node.extend(nodes)
    return [n.name or n.output[0] for n in todo]


def _tune_graph(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], work: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The INT8 graph as exported, or with residual Add -> LayerNormalization pairs as Sum, whichever times faster.

    The same rewrite, and the same timing rule, as compress.quantization.int8's transformer path: onnxruntime fuses Add +
    LayerNormalization into SkipLayerNormalization, whose CPU kernel is several times slower than the pair
    (all-MiniLM-L6-v2 through INC: 11.2 ms -> 8.7 ms with the rewrite, 1 thread).
    """
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    if not residual_add_to_sum(rewritten):
        return model, {"variant": "as-exported", "tuned": False}
    paths = {"as-exported": work / "g_plain.onnx", "residual-sum": work / "g_sum.onnx"}
    onnx.save(model, str(paths["as-exported"]))
    onnx.save(rewritten, str(paths["residual-sum"]))
    try:
        res = time_candidates(paths, feed)
    except EdgeError as e:
        return model, {"variant": "as-exported", "tuned": False, "rejected": {"residual-sum": str(e)}}
    choice = pick(res, "as-exported")
    return (rewritten if choice == "residual-sum" else model), {"variant": choice, "tuned": True,
                                                                "int8_timing": timing_json(res)}


def _lower_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The dynamo exporter writes opset 18+; lower to the device's opset with ONNX's version converter.

    The converter's 18 -> 17 Reduce* adapters move `axes` back to an attribute but keep `noop_with_empty_axes`,
    which only ReduceSum has before 18 (the checker then says "Unrecognized attribute"); with axes given it
    changes nothing, so it is dropped. The result must pass the ONNX checker.
    """
    try:
        low = onnx.version_converter.convert_version(model, opset)
        for n in low.graph.node:
            if n.op_type.startswith("Reduce") and n.op_type != "ReduceSum" and n.domain in ("", "ai.onnx"):
                keep = [a for a in n.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
                del n.attribute[:]
                n.attribute.extend(keep)
        onnx.checker.check_model(low, full_check=True)
    except Exception as e:
        raise ModelError(f"opset {opset}: the dynamo exporter writes opset {DYNAMO_MIN_OPSET}+, and ONNX's version "
                         f"converter cannot lower this graph: {_first_line(e)}") from e
    return low


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# --------------------------------------------------------------------------------------------- public API


def _calibrate_and_convert(inc: Any, gm: Any, config: dict[str, Any], exp: dict[str, Any],
                           steps: list[dict[str, torch.Tensor]], on_stage: Callable[[str], None]) -> Any:
    """INC's prepare (observers in), calibration forwards, convert (Q/DQ out): each failure one line naming the step."""
    on_stage(f"calibrating with INC ({len(steps)} batches)")
    try:
        with _quiet():
            prepared = inc.prepare(gm, inc.StaticQuantConfig(**config))
    except Exception as e:
        why = f" (on the non-strict export; strict: {exp['errors'][0]})" if exp["mode"] == "non-strict" and exp["errors"] else ""
        raise ModelError(f"INC prepare failed: {type(e).__name__}: {_first_line(e)}{why}") from e
    try:
        with _quiet(), torch.no_grad():
            for b in steps:
                prepared(**b)
    except Exception as e:
        raise ModelError(f"INC calibration failed (forward of the prepared model): {type(e).__name__}: {_first_line(e)}") from e
    on_stage("converting with INC")
    try:
        with _quiet():
            converted = inc.convert(prepared)
            inc.move_to_eval(converted)
        _eval_mode(converted)
    except Exception as e:
        raise ModelError(f"INC convert failed: {type(e).__name__}: {_first_line(e)}") from e
    return converted


def _export_quantized(converted: Any, trace: dict[str, torch.Tensor], example: dict[str, torch.Tensor],
                      out_names: list[str], exp: dict[str, Any], opset: int, external: bool, raw: Path) -> onnx.ModelProto:
    """The converted graph through the dynamo exporter, loaded back with its weights."""
    try:
        with _quiet():
            prog = torch.onnx.export(
                converted, (), kwargs=trace, dynamo=True, opset_version=max(opset, DYNAMO_MIN_OPSET),
                input_names=list(example), output_names=out_names,
                dynamic_shapes=_batch_dims(example) if exp["dynamic_batch"] else None,
                optimize=True, verbose=False, external_data=external,
            )
            if prog is None:
                raise RuntimeError("the dynamo exporter returned nothing")
            prog.save(str(raw), external_data=external)
        model = onnx.load(str(raw), load_external_data=True)
    except Exception as e:
        raise ModelError(f"ONNX export of the INC-quantized graph failed: {type(e).__name__}: {_first_line(e)}") from e
    if len(model.graph.output) != len(out_names):
        raise ModelError(f"ONNX export of the INC-quantized graph has {len(model.graph.output)} outputs, "
                         f"torch returned {len(out_names)}")
    return model


def _set_metadata(model: onnx.ModelProto, example: dict[str, torch.Tensor], graph_in: list[str], exp: dict[str, Any],
                  out_names: list[str], source: str, quant: dict[str, Any]) -> None:
    """The metadata every ONNX file we write carries (export/metadata.py), with INC's quantization record."""
    specs = [s.to_json() for s in input_specs(example) if s.name in graph_in]
    if exp["dynamic_batch"]:
        for s in specs:
            s["dynamic_axes"] = {"0": "batch"}
    meta = {
        "source": source, "exporter": "dynamo", "opset": _opset(model), "inputs": specs, "outputs": out_names,
        "torch_version": torch.__version__, "onnx_version": onnx.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "quantization": quant,
    }
    set_metadata(model, meta)


def quantize_inc(
    module: torch.nn.Module,
    example: dict[str, torch.Tensor],
    calib: list[dict[str, torch.Tensor]],
    dst: str | Path,
    profile: DeviceProfile,
    *,
    opset: int | None = None,
    source: str = "",
    on_stage: Callable[[str], None] = lambda s: None,
    preset: Optional[Preset] = None,
    method: str = "minmax",
    dynamic_batch: bool = True,
    complete: bool = True,
    tune: bool = True,
) -> dict[str, Any]:
    """Quantize `module` to INT8 with INC's PT2E static path and write it to `dst` as an ONNX QDQ model.

    example: one input dict (keys = forward() argument names); calib: batches (dicts of tensors or arrays) to
    calibrate on, also used for the reported fidelity. opset defaults to the profile's (the dynamo exporter
    writes 18+; lower opsets are converted down, or refused when ONNX's converter cannot). preset overrides the
    profile's (U8S8 / S8S8: INC takes int8 weights only). method: INC's activation observer, "minmax" or "kl".
    dynamic_batch: export the batch axis free when torch.export allows it (else fixed, noted). complete: add
    the conv-output QDQ that X86InductorQuantizer leaves out, so onnxruntime runs every conv in INT8. tune:
    time compress.quantization.int8's residual Add -> Sum rewrite (onnxruntime's slow SkipLayerNormalization fusion) on
    the INT8 graph and keep it when faster.
    Failures raise ModelError (one line naming the step) and leave nothing at dst.
    """
    t0 = time.perf_counter()
    dst = check_onnx_output(str(dst))
    if not calib:
        raise UsageError("no calibration batches: INC's static quantization needs at least one")
    preset = (preset or preset_for(profile)).for_family("generic")
    config, notes = inc_config(preset, method)
    opset = int(opset or profile.opset or DYNAMO_MIN_OPSET)
    inc = _inc()
    module = module.eval()
    example = _ordered(module, _as_tensors(example))
    calib_t = [_ordered(module, _as_tensors(b)) for b in calib]

    on_stage("running torch")
    with torch.no_grad():
        try:
            out_names = [n for n, _ in flatten_outputs(module(**example))]
        except Exception as e:
            raise ModelError(f"forward() failed on the example inputs: {type(e).__name__}: {_first_line(e)}") from e

    on_stage("exporting with torch.export")
    gm, exp = None, {}
    if dynamic_batch:
        try:
            gm, exp = _export(module, example, dynamic=True)
        except ModelError as e:
            notes.append(f"batch axis fixed: the dynamic-batch export failed ({e})")
    if gm is None:
        gm, exp = _export(module, example, dynamic=False)
    steps = calib_t if exp["dynamic_batch"] else _static_batches(calib_t, _batch_of(example))
    steps_np = [{k: v.detach().cpu().numpy() for k, v in b.items()} for b in steps]
    ref = torch_outputs(module, steps)

    converted = _calibrate_and_convert(inc, gm, config, exp, steps, on_stage)

    weight_bytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    external = weight_bytes // 4 >= TWO_GB  # int8 weights
    trace = _tile(example, 2) if exp["dynamic_batch"] and exp["trace_batch"] != _batch_of(example) else example
    with tempfile.TemporaryDirectory(prefix=".quant-inc-", dir=dst.parent if dst.parent.exists() else None) as tmp:
        work = Path(tmp)
        on_stage("exporting to ONNX (dynamo)")
        model = _export_quantized(converted, trace, example, out_names, exp, opset, external, work / "raw.onnx")
        graph_in = [i.name for i in model.graph.input]

        on_stage("folding weight quantization")
        folded = fold_weight_quantization(model)
        completed: list[str] = []
        if complete:
            on_stage("completing conv-output QDQ for onnxruntime")
            try:
                completed = complete_conv_qdq(model, steps_np, config["act_dtype"], config["act_sym"], work)
            except EdgeError as e:
                raise ModelError(f"QDQ completion failed: {e}") from e
        if opset < DYNAMO_MIN_OPSET:
            model = _lower_opset(model, opset)
        graph: dict[str, Any] = {"variant": "as-exported", "tuned": bool(tune and not external)}
        if tune and not external:
            on_stage("timing graph rewrites")
            feed = {k: v[:1] if exp["dynamic_batch"] and v.ndim else v for k, v in steps_np[0].items()}
            model, graph = _tune_graph(model, feed, work)
        qdq = qdq_summary(model)
        if not qdq["QuantizeLinear"] or not qdq["weights_via_dq"]:
            raise ModelError(f"INC left the model in float: {qdq['QuantizeLinear']} QuantizeLinear nodes, "
                             f"{qdq['weights_via_dq']} of {qdq['weighted_ops']} weights in int8")

        quant = {
            "format": "int8", "backend": BACKEND, "preset": preset.to_json(), "method": method, "mode": "static",
            "inc": {"version": inc.version, "config": config, "quantizer": "X86InductorQuantizer (PT2E)"},
            "calibration": {"source": "batches", "batches": len(calib_t), "samples": sum(_batch_of(b) for b in calib_t)},
            "completed_convs": len(completed), "recipe": {"graph": graph["variant"]},
        }
        _set_metadata(model, example, graph_in, exp, out_names, source, quant)

        on_stage("checking the INT8 model in onnxruntime")
        stage = work / "final" / dst.name
        stage.parent.mkdir()
        write_model(model, stage, external)
        try:
            fid = fidelity(ref, onnx_outputs(stage, steps_np))
        except EdgeError as e:
            raise ModelError(f"the INC INT8 model does not run in onnxruntime's CPU provider: {e}") from e
        kernels = int8_kernels(stage)
        if kernels["float_weight_ops"]:
            notes.append(f"onnxruntime runs {kernels['float_weight_ops']} weighted op(s) in float: "
                         f"{', '.join(kernels['float_nodes'][:5])}")
        on_stage("writing")
        write_model(model, dst, external)
    size = dst.stat().st_size + (dst.parent / (dst.name + ".data")).stat().st_size if external else dst.stat().st_size
    return {
        "path": str(dst), "backend": BACKEND, "preset": preset.to_json(), "method": method,
        "inc": quant["inc"], "fidelity_calibration": fid, "size_bytes": size,
        "seconds": round(time.perf_counter() - t0, 2),
        "export": {**exp, "opset": _opset(model), "exporter": "torch.onnx dynamo", "external_data": external},
        "qdq": {**qdq, "folded_weight_quantizers": folded, "completed_convs": completed}, "graph": graph,
        "int8_kernels": kernels, "notes": notes,
    }


def read_backend(path: str | Path) -> Optional[str]:
    """"inc" or "ort" for an INT8 model written by this project (compress.quantization.int8 writes no backend: "ort")."""
    meta = get_metadata(onnx.load(str(path), load_external_data=False)) or {}
    q = meta.get("quantization") or {}
    if q.get("format") != "int8":
        return None
    return q.get("backend", "ort")
