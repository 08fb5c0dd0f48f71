"""Format advisor: INT8 or FP8 for this model on this device, decided by measurements on the user's data.

After "FP8 versus INT8 for efficient deep learning inference" (van Baalen et al., 2023): which 8-bit format keeps
a network closer to fp32 depends on its distributions, not on a rule. Well-behaved (Gaussian-like) tensors keep
more precision in INT8's uniform grid; tensors with a few huge values (outlier channels in transformers,
unnormalised activations) squeeze everything else into a handful of INT8 steps, where FP8's relative precision
keeps them. So the advisor measures, on the calibration data:
- per layer: the output error when ONLY that layer is quantized, in each of INT8 per-tensor, INT8 per-channel
  (weights; activations per-tensor in both), FP8 E4M3FN and FP8 E5M2 (per-channel weights), plus outlier evidence
  (max/std and kurtosis of the layer's weights and input activations);
- for the whole model: the fidelity with every layer quantized in each format.
Then it keeps the formats the device executes fast (INT8 where the profile has `int8_dot`, FP8 only where it has
`fp8`) and recommends the best measured among them. Nothing here prefers a format except by its figures.

Every format is simulated the same way so the comparison is like for like: Q/DQ pairs on the inputs of
Conv/MatMul/Gemm with static per-tensor activation scales from the calibration ranges (the FP8 graph is
compress.quantization.fp8's; the INT8 one is written here with the profile's activation symmetry), run on onnxruntime's
CPU provider at the basic optimisation level, which keeps every Q/DQ as its own kernel. The figures are fidelity,
not speed, and they are in-sample (measured on the calibration feeds).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from compress.core import InputError, ModelError, UsageError, save_model, warn
from compress.core import first_line as _first_line
from compress.evaluate import fidelity, judged, onnx_outputs
from compress.quantization.calib import CalibReader, CalibSource
from compress.quantization.fp8 import (
    MIN_OPSET,
    QdqRewriter,
    fp8_session_options,
    plan_qdq,
    quantize_fp8,
    tensor_values,
    upgrade_opset,
    weight_axis,
)
from compress.quantization.ops import is_quantizable, quantizable_positions
from compress.quantization.presets import preset_for
from compress.quantization.sensitivity import fallback, layer_sensitivity, metric_error
from devices import DeviceProfile

FORMATS = ("int8_per_tensor", "int8_per_channel", "fp8_e4m3fn", "fp8_e5m2")
DEFAULT_TOLERANCE = 0.01
DEFAULT_MAX_LAYERS = 24  # per-layer sweep: 4 quantizations + runs per layer; big models get the most outlier-prone
MAX_FEEDS = 32  # calibration feeds used for ranges and fidelity: enough for stable figures, bounded time
_TINY = float(np.finfo(np.float32).tiny)

Feeds = Sequence[Mapping[str, np.ndarray]]
OnStep = Callable[[str], None]


# --- device side -----------------------------------------------------------------------------------------------


def device_formats(profile: DeviceProfile) -> dict[str, dict[str, Any]]:
    """Which formats the profile executes fast, and the profile field that decided it.

    INT8 pays with dot-product units (`int8_dot`: VNNI, SDOT/UDOT, an NPU), and on x86 with AVX2 too: VPMADDUBSW
    multiplies 8-bit pairs (with 7-bit weights, the preset's reduce_range) and our INT8 measured 1.45-1.62x over
    fp32 on an AVX2-only EPYC (bench/quant_int4.py's dynamic INT8 rows, 2026-12-03). Elsewhere (ARM without
    dotprod) INT8 GEMMs widen to 16 bits and gain little. Per-channel INT8 also needs the device's INT8 path to
    take per-channel scales (`quantization.per_channel`; the QNN HTP preset is per-tensor). FP8 runs fast only on
    FP8 tensor hardware (`fp8`); elsewhere it is emulated, slower than fp32.
    """
    dot, pc, fp8 = profile.int8_dot, profile.quantization.per_channel, profile.fp8
    avx2 = profile.arch == "x86_64" and "avx2" in profile.isa
    fast8 = dot or avx2
    why8 = f"int8_dot: {str(dot).lower()}" + ("; avx2: VPMADDUBSW with 7-bit weights" if avx2 and not dot else "")
    return {
        "int8_per_tensor": {"fast": fast8, "why": why8},
        "int8_per_channel": {"fast": fast8 and pc, "why": why8 + (
            "" if not fast8 or pc else "; quantization.per_channel: false (the device's INT8 path is per-tensor)")},
        "fp8_e4m3fn": {"fast": fp8, "why": f"fp8: {str(fp8).lower()}"},
        "fp8_e5m2": {"fast": fp8, "why": f"fp8: {str(fp8).lower()}"},
    }


# --- statistics ------------------------------------------------------------------------------------------------


class _Moments:
    """Running min/max/|max| and raw moments of a tensor over many feeds (float64), for max/std and kurtosis."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2, self.s3, self.s4 = 0, 0.0, 0.0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size == 0:
            return
        self.n += x.size
        x2 = x * x
        self.s1 += float(x.sum())
        self.s2 += float(x2.sum())
        self.s3 += float((x2 * x).sum())
        self.s4 += float((x2 * x2).sum())
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    @property
    def amax(self) -> float:
        return 0.0 if self.n == 0 else max(abs(self.lo), abs(self.hi))

    def summary(self) -> dict[str, Optional[float]]:
        """max/std (how many standard deviations the largest |x| is out: ~4-5 for Gaussian data) and kurtosis
        (3 for a Gaussian; much larger when a few values dominate). None when the tensor is constant."""
        if self.n == 0:
            return {"max_over_std": None, "kurtosis": None}
        m1, m2, m3, m4 = self.s1 / self.n, self.s2 / self.n, self.s3 / self.n, self.s4 / self.n
        var = m2 - m1 * m1
        if not var > 1e-30:
            return {"max_over_std": None, "kurtosis": None}
        mu4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
        return {"max_over_std": round(self.amax / math.sqrt(var), 3), "kurtosis": round(max(mu4, 0.0) / var ** 2, 3)}


def _activation_stats(model: onnx.ModelProto, names: Sequence[str], feeds: Feeds) -> dict[str, _Moments]:
    """Moments of the named activations over the feeds, in one fp32 pass."""
    stats = {n: _Moments() for n in names}
    for values in tensor_values(model, names, feeds):
        for n, v in values.items():
            stats[n].add(v)
    bad = [n for n, s in stats.items() if not (math.isfinite(s.lo) and math.isfinite(s.hi))]
    if bad:
        raise ModelError(f"calibration produced non-finite values in {', '.join(bad[:5])}; no scales can be set")
    return stats


def _weight_summary(w: np.ndarray, axis: Optional[int]) -> dict[str, Optional[float]]:
    """max/std and kurtosis of a weight, and channel_spread: the largest output channel's amax over the median
    channel's (what per-channel scales fix; ~1-2 when channels are alike)."""
    m = _Moments()
    m.add(w)
    s = m.summary()
    axis_spread = None
    if axis is not None:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        ch = np.abs(w).max(axis=reduce)
        med = float(np.median(ch))
        axis_spread = round(float(ch.max()) / med, 3) if med > 0 else None
    return {**s, "channel_spread": axis_spread}


# --- INT8 QDQ (simulated, same placement as the FP8 writer) ----------------------------------------------------


class _Int8Rewriter(QdqRewriter):
    """Weights: symmetric int8 (zero point 0, range +-127) per output channel or per tensor, as every INT8 backend
    takes them. Activations: per tensor from the calibration min/max, symmetric int8 where the profile says so
    (TensorRT reads scales only) or asymmetric uint8 otherwise (CPU kernels: after a ReLU a symmetric range
    would waste a bit)."""

    tag = "i8"

    def __init__(self, model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], per_channel: bool,
                 symmetric_activations: bool) -> None:
        super().__init__(model, per_channel)
        self.ranges, self.symmetric = ranges, symmetric_activations

    def weight_tensors(self, w: np.ndarray, axis: Optional[int], q_name: str,
                       zero_name: str) -> tuple[TensorProto, np.ndarray, TensorProto]:
        if axis is None:
            scale = np.array(max(float(np.abs(w).max(initial=0.0)) / 127.0, _TINY), np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        else:
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.maximum(np.abs(w).max(axis=reduce) / 127.0, _TINY).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        return (numpy_helper.from_array(q, q_name), scale,
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), zero_name))

    def activation_qparams(self, name: str, zero_name: str) -> tuple[np.ndarray, TensorProto]:
        lo, hi = min(self.ranges[name][0], 0.0), max(self.ranges[name][1], 0.0)
        if self.symmetric:
            scale = max(max(-lo, hi) / 127.0, _TINY) if hi > lo else 1.0
            zero = np.array(0, np.int8)
        else:
            scale = max((hi - lo) / 255.0, _TINY) if hi > lo else 1.0
            zero = np.array(int(np.clip(round(-lo / scale), 0, 255)), np.uint8)
        return np.array(scale, np.float32), numpy_helper.from_array(zero, zero_name)


def _int8_qdq(model: onnx.ModelProto, dst: Path, include: Sequence[str], ranges: Mapping[str, tuple[float, float]],
              per_channel: bool, symmetric_activations: bool) -> None:
    """Write `model` with the `include` nodes' inputs behind INT8 Q/DQ pairs, placed as the FP8 writer does."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    wanted = set(include)
    plan, _ = plan_qdq(m, [i for i, n in enumerate(m.graph.node) if n.name in wanted])
    _Int8Rewriter(m, ranges, per_channel, symmetric_activations).apply(plan)
    save_model(m, dst)


def simulated_outputs(path: Path, feeds: Feeds) -> list[list[np.ndarray]]:
    """Outputs of a Q/DQ model with every Q/DQ kept as its own kernel (the FP8 session options suit INT8 too)."""
    return onnx_outputs(path, feeds, session_options=fp8_session_options())


# --- the advisor -----------------------------------------------------------------------------------------------


def _metric(reference_fid: Mapping[str, Any]) -> str:
    """As compress quantize does (compress.evaluate.judged): matched boxes for detectors, top-1 agreement for
    classifiers ([N, C] outputs), else the worst cosine."""
    return judged(reference_fid)[0]


def _short(fid: Mapping[str, Any], metric: str) -> dict[str, Any]:
    return {"error": metric_error(fid, metric), "one_minus_cos_mean": 1.0 - fid["cosine_mean"],
            "cosine_min": fid["cosine_min"], "rel_l2": fid["rel_l2"], "top1_agreement": fid["top1_agreement"]}


def advise(
    model_path: str | Path,
    profile: DeviceProfile,
    calib: CalibSource = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_layers: Optional[int] = None,
    calib_label: Optional[str] = None,
    on_step: Optional[OnStep] = None,
) -> dict[str, Any]:
    """Measure every format on `model_path` with `calib` (an .npz path, arrays, or None for synthetic inputs)
    and recommend one for `profile`. Returns the JSON-safe report (see the module docstring for what is in it)."""
    t0 = time.perf_counter()
    if not (math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise UsageError(f"--tolerance {tolerance}: must be in [0, 1)")
    if max_layers is not None and max_layers < 0:
        raise UsageError(f"--max-layers {max_layers}: must be >= 0")
    step = on_step or (lambda _msg: None)
    src = Path(model_path).expanduser()
    model = _load_quantizable(src)
    reader = CalibReader(model, calib, max_samples=MAX_FEEDS, label=calib_label)
    feeds = reader.feeds(MAX_FEEDS)
    calibration = reader.info()
    if reader.source == "synthetic":
        warn("no calibration data: ranges and errors come from synthetic inputs shaped by the model's metadata; "
             "pass --calib with real samples (an .npz, an image folder, a text file or an hf: dataset) for advice about your data")
    preset = preset_for(profile)
    symmetric = bool(preset.options().get("ActivationSymmetric", False))

    with tempfile.TemporaryDirectory(prefix=".formats-") as tmp:
        work = Path(tmp)
        step("preparing (opset 19 for FP8)")
        up = upgrade_opset(model, MIN_OPSET)
        base = work / "base.onnx"
        save_model(up, base)
        try:
            reference = onnx_outputs(base, feeds)
        except Exception as e:
            raise ModelError(f"the model does not run on the calibration data: {_first_line(e)}") from e
        metric = _metric(fidelity(reference, reference))

        # statistics: weights from the initializers, activations from one fp32 pass
        step("collecting activation statistics")
        positions = quantizable_positions(up.graph)
        plan, skipped = plan_qdq(up, positions)
        acts = list(dict.fromkeys(up.graph.node[p].input[s] for p, sl in plan.items() for s, k in sl if k == "activation"))
        stats = _activation_stats(up, acts, feeds)
        ranges = {n: (s.lo, s.hi) for n, s in stats.items()}
        amax = {n: s.amax for n, s in stats.items()}
        layers = _layer_rows(up, positions, plan, stats)
        quantizable = [r["node"] for r in layers if r["quantizable"]]

        def quantizer(fmt: str) -> Callable[[Path, Path, list[str]], None]:
            """(src, dst, include) -> writes dst with just those nodes quantized in `fmt`."""
            if fmt.startswith("fp8_"):
                return lambda _s, d, inc: quantize_fp8(base, d, feeds, fmt=fmt[4:], include=inc, activation_amax=amax)
            return lambda _s, d, inc: _int8_qdq(up, d, inc, ranges, fmt == "int8_per_channel", symmetric)

        def exclude_quantizer(fmt: str) -> Callable[[Path, Path, list[str]], None]:
            q = quantizer(fmt)
            return lambda s, d, exc: q(s, d, [n for n in quantizable if n not in set(exc)])

        # whole model, every format
        whole: dict[str, dict[str, Any]] = {}
        for fmt in FORMATS:
            step(f"whole model in {fmt}")
            path = work / f"all_{fmt}.onnx"
            quantizer(fmt)(base, path, quantizable)
            whole[fmt] = _short(fidelity(reference, simulated_outputs(path, feeds)), metric)
            path.unlink()

        # per layer: the most outlier-prone first when the sweep is capped
        cap = DEFAULT_MAX_LAYERS if max_layers is None else max_layers
        order = sorted(quantizable, key=lambda n: -_outlier_score(next(r for r in layers if r["node"] == n)))
        swept = [n for n in quantizable if n in set(order[:cap])]
        sens: dict[str, list[dict[str, Any]]] = {}
        for fmt in FORMATS:
            if not swept:
                break
            sens[fmt] = layer_sensitivity(
                base, swept, quantizer(fmt), feeds, reference, runner=simulated_outputs,
                on_layer=lambda i, n, name, f=fmt: step(f"{f}: layer {i + 1}/{n} {name}"))
        _attach_errors(layers, swept, sens)

        device = {"name": profile.name, "arch": profile.arch, "int8_dot": profile.int8_dot, "fp8": profile.fp8,
                  "providers": list(profile.provider_names), "int8_activations": "symmetric int8" if symmetric
                  else "asymmetric uint8", "formats": device_formats(profile)}
        rec = _recommend(whole, device["formats"], tolerance, metric)
        if rec["format"] != "fp32" and not rec["within_tolerance"] and _has_rows(sens, rec["format"]):
            step(f"finding the layers to keep in float for {rec['format']}")
            fb = fallback(base, work / "fallback.onnx", exclude_quantizer(rec["format"]), sens[rec["format"]], feeds,
                          reference, tolerance, metric, runner=simulated_outputs)
            _apply_fallback(rec, fb, metric, tolerance)

    worst = {fmt: max(swept, key=lambda n: _layer_err(layers, n, fmt)) for fmt in sens} if swept else {}
    note = None
    if len(swept) < len(quantizable):
        note = (f"per-layer sweep capped at {len(swept)} of {len(quantizable)} layers (--max-layers), choosing those "
                "with the largest weight/activation max/std; the whole-model figures cover every layer")
    return {
        "model": str(src), "device": device, "metric": metric, "tolerance": tolerance,
        "calibration": calibration, "formats": list(FORMATS), "whole_model": whole, "layers": layers,
        "swept_layers": len(swept), "quantizable_layers": len(quantizable), "sweep_note": note,
        "worst_layer": worst, "skipped": skipped, "recommendation": rec,
        "method": ("simulated Q/DQ on Conv/MatMul/Gemm inputs, static per-tensor activation scales from the "
                   "calibration ranges; FP8 weights per channel; measured on the calibration feeds"),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _load_quantizable(src: Path) -> onnx.ModelProto:
    """The model, refused in one line unless it has uniquely named Conv/MatMul/Gemm nodes to sweep."""
    if not src.is_file():
        raise InputError(f"model {src} not found")
    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as e:
        raise InputError(f"{src} is not a readable ONNX model: {_first_line(e)}") from e
    nodes = [n for n in model.graph.node if is_quantizable(n)]
    if not nodes:
        raise InputError(f"{src} has no Conv/MatMul/Gemm node: nothing to quantize")
    if len({n.name for n in nodes}) != len(nodes) or any(not n.name for n in nodes):
        raise ModelError(f"{src}: Conv/MatMul/Gemm nodes need unique names for the per-layer sweep; re-export it")
    return model


def _layer_rows(up: onnx.ModelProto, positions: list[int], plan: Mapping[int, list[tuple[int, str]]],
                stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per quantizable node: its activation statistics (from the fp32 pass) and weight statistics."""
    inits = {t.name: t for t in up.graph.initializer}
    layers: list[dict[str, Any]] = []
    for p in positions:
        node = up.graph.node[p]
        row: dict[str, Any] = {"node": node.name, "op_type": node.op_type, "quantizable": p in plan}
        ins = [node.input[s] for s, k in plan.get(p, []) if k == "activation"]
        ws = [node.input[s] for s, k in plan.get(p, []) if k == "weight"]
        row["activation"] = stats[ins[0]].summary() if ins else None
        if ws:
            w = numpy_helper.to_array(inits[ws[0]]).astype(np.float32)
            row["weight"] = _weight_summary(w, weight_axis(node, w.ndim) if node.input[1] == ws[0] else None)
        else:
            row["weight"] = None
        layers.append(row)
    return layers


def _attach_errors(layers: list[dict[str, Any]], swept: list[str], sens: Mapping[str, list[dict[str, Any]]]) -> None:
    """Each layer row gets whether it was swept and its error per format (or the error that stopped it)."""
    for r in layers:
        r["swept"] = r["node"] in swept
        r["errors"] = {}
        for fmt, rows in sens.items():
            hit = next((x for x in rows if x["node"] == r["node"]), None)
            if hit is not None:
                r["errors"][fmt] = ({"error": hit["error"]} if hit.get("salience") is None else
                                    {"one_minus_cos_mean": hit["salience"], "rel_l2": hit["rel_l2"],
                                     "cosine_min": hit["cosine_min"]})


def _has_rows(sens: Mapping[str, list[dict[str, Any]]], fmt: str) -> bool:
    return any(r.get("salience") is not None for r in sens.get(fmt, []))


def _outlier_score(row: Mapping[str, Any]) -> float:
    vals = [(row.get(k) or {}).get("max_over_std") for k in ("activation", "weight")]
    return max([v for v in vals if v is not None], default=0.0)


def _layer_err(layers: list[dict[str, Any]], node: str, fmt: str) -> float:
    e = next(r for r in layers if r["node"] == node)["errors"].get(fmt, {})
    v = e.get("one_minus_cos_mean")
    return -1.0 if v is None else v


def _recommend(whole: Mapping[str, dict[str, Any]], caps: Mapping[str, dict[str, Any]], tolerance: float,
               metric: str) -> dict[str, Any]:
    """The best measured format among those the device runs fast; ties go to INT8 (FP8 must beat it).

    FORMATS is ordered INT8 first, and only a strictly smaller error displaces the current best, so FP8 wins on
    an FP8 device only when its measurement beats INT8's. With no fast format, fp32.
    """
    fast = [f for f in FORMATS if caps[f]["fast"]]
    what = "1 - top-1 agreement" if metric == "top1" else "1 - cosine_min"
    if not fast:
        why = "; ".join(sorted({caps[f]["why"] for f in FORMATS}))
        return {"format": "fp32", "within_tolerance": True, "keep_float": [], "error": 0.0, "fast_formats": [],
                "reason": f"the device executes no 8-bit format fast ({why}): stay in fp32"}
    best = None
    for f in fast:
        if best is None or whole[f]["error"] < whole[best]["error"]:
            best = f
    err = whole[best]["error"]
    others = ", ".join(f"{f} {whole[f]['error']:.3g}" for f in fast if f != best)
    ok = err <= tolerance
    reason = (f"{best} has the smallest whole-model error ({what} {err:.3g}"
              + (f"; {others}" if others else "") + ") among the formats this device runs fast"
              + (f", within the tolerance {tolerance:g}" if ok else f", but above the tolerance {tolerance:g}"))
    slow_better = [f for f in FORMATS if not caps[f]["fast"] and whole[f]["error"] < err]
    if slow_better:
        reason += f" ({', '.join(slow_better)} measured better but {caps[slow_better[0]]['why']})"
    return {"format": best, "within_tolerance": ok, "keep_float": [], "error": err, "fast_formats": fast,
            "reason": reason}


def _apply_fallback(rec: dict[str, Any], fb: Mapping[str, Any], metric: str, tolerance: float) -> None:
    """Fold compress.quantization.sensitivity.fallback's answer into the recommendation: the layers to keep in float, or fp32."""
    kept = [e["node"] for e in fb["excluded"]]
    if fb["within_tolerance"]:
        rec.update(keep_float=kept, within_tolerance=True, error_with_float_layers=fb["error"])
        rec["reason"] += (f"; keeping {len(kept)} most sensitive layer(s) in float brings it to {fb['error']:.3g}: "
                          + ", ".join(kept))
    else:
        rec.update(format="fp32", keep_float=[], within_tolerance=True,
                   error_best_8bit=rec["error"], error=0.0)
        rec["reason"] += (f"; even with {len(kept)} swept layer(s) in float the error stays at {fb['error']:.3g}: "
                          "stay in fp32")
