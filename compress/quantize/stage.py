"""The quantize stage: INT8 (device presets, faster-preset choice) or FP8 (our own scales), then fidelity on
held-out inputs, accuracy-aware fallback under a tolerance, and the measured speedup against fp32.

`compress quantize` and `compress run --quant` both go through here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from compress.core import UsageError
from compress.evaluate import Metric
from devices import DeviceProfile

FORMATS = ("int8", "fp8", "int4")  # int4: weight-only MatMuls (compress.quantize.int4), mixed 4/8/float under a budget
# INT8 backends. bench/quant_inc.py, 2026-11-22: onnxruntime's quantizer with our recipe beat INC's PT2E path on
# both benchmark models (resnet_demo 3.40x vs 3.18x over fp32, 1 thread; MiniLM 2.57x vs 2.50x at cosine min
# 0.997 vs 0.991), so "ort" is the default.
BACKENDS = ("ort", "inc")

TorchSource = tuple[Any, dict[str, Any], list[dict[str, Any]]]  # (nn.Module, example inputs, calibration batches)


@dataclass
class QuantOptions:
    to: str = "int8"
    method: str = "minmax"
    tolerance: Optional[float] = None  # None: no fallback search
    simulate: bool = False
    fp8_format: str = "e4m3fn"
    max_calib: Optional[int] = None
    measure: bool = True
    backend: str = "ort"  # INT8: "ort" (onnxruntime's quantizer on the ONNX graph) or "inc" (INC PT2E in torch)
    evaluate: Optional[Metric] = None  # --eval: the user's score; --tolerance then bounds its drop
    select_ops: bool = True  # INT8: time each quantized op against fp32 and keep fp32 where INT8 is not faster
    block_size: int = 32  # INT4: weights per scale
    budget_mb: Optional[float] = None  # INT4: total model size; layers go 8-bit or float by salience within it
    avg_bits: Optional[float] = None  # INT4: the budget as nominal bits per quantized weight (4/8/32 each)
    salience: str = "measured"  # INT4: "measured" (one model per layer) or "proxy" (weights x activations, one pass)


def check_format(profile: DeviceProfile, opts: QuantOptions) -> None:
    """FP8 only where the device has FP8 hardware, unless the user asks for a simulation of its fidelity."""
    if opts.to not in FORMATS:
        raise UsageError(f"--to {opts.to}: one of {', '.join(FORMATS)}")
    if opts.to == "fp8" and not profile.fp8 and not opts.simulate:
        raise UsageError(f"device {profile.name!r} has no FP8 hardware: use --to int8 (INT8 dot-product units: "
                         f"{'yes' if profile.int8_dot else 'no'}), or add --simulate to measure FP8 fidelity only")
    if opts.backend not in BACKENDS:
        raise UsageError(f"--backend {opts.backend}: one of {', '.join(BACKENDS)}")
    if opts.backend == "inc" and opts.to != "int8":
        raise UsageError("--backend inc makes INT8 only; FP8 goes through --backend ort")
    if opts.tolerance is not None and opts.evaluate is None and not 0.0 <= opts.tolerance < 1.0:
        raise UsageError(f"--tolerance {opts.tolerance}: must be in [0, 1) (a loss of fidelity; with --eval, any drop >= 0)")
    if opts.tolerance is not None and opts.tolerance < 0:
        raise UsageError(f"--tolerance {opts.tolerance}: must be >= 0")
    _check_int4(opts)


def _check_int4(opts: QuantOptions) -> None:
    """INT4's size budget and block size; and the INT8/FP8 options that mean nothing to it."""
    from compress.quantize.int4 import check_options

    if opts.to != "int4":
        if opts.budget_mb is not None or opts.avg_bits is not None:
            raise UsageError(f"--budget-mb/--avg-bits allocate bits per layer for --to int4, not --to {opts.to}")
        return
    check_options(opts.block_size, opts.budget_mb, opts.avg_bits, opts.salience)
    if opts.tolerance is not None or opts.evaluate is not None:
        raise UsageError("--to int4 is steered by --budget-mb or --avg-bits, not --tolerance/--eval")


def _split_calib(calib: Optional[str], max_calib: Optional[int]) -> tuple[Any, Any, dict[str, Any]]:
    """Calibration arrays and held-out arrays (a quarter, when there are 8+ samples); None means synthetic.

    The arrays are load_calib's lazy ones (memory-mapped or read up to max_calib samples); the split slices
    them without copying, and errors about them name the file through CalibReader's label."""
    if calib is None:
        return None, None, {"source": "synthetic", "samples": 0, "held_out": True}
    from compress.models import load_calib

    data = load_calib(calib, max_samples=max_calib)
    n = next(iter(data.values())).shape[0]
    if n < 8:
        return data, data, {"source": calib, "samples": n, "held_out": False}
    cut = n - max(1, n // 4)
    return ({k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()},
            {"source": calib, "samples": n, "calibration_samples": cut, "held_out": True})


def _feeds(model: Path, source: Any, seed: int, max_samples: Optional[int] = None,
           label: Optional[str] = None) -> list[dict[str, np.ndarray]]:
    from compress.quantize.calib import CalibReader

    reader = CalibReader(model, source, seed=seed, max_samples=max_samples, label=label)
    try:
        return [reader.feed(i) for i in range(reader.count)]
    finally:
        reader.close()


def _signedness(preset: dict[str, Any]) -> str:
    short = {"uint8": "U8", "int8": "S8"}
    return short[preset["activation_type"]] + short[preset["weight_type"]]


def _metric(fid: dict[str, Any]) -> str:
    """Classifiers are judged by top-1 agreement; anything else (embeddings, hidden states) by the worst cosine."""
    return "top1" if fid.get("top1_agreement") is not None else "cosine_min"


def _select_ops(fp32: Path, int8: Path, work: Path, profile: DeviceProfile,
                quantize: Callable[[Path, Path, list[str], bool], None], feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """compress.quantize.opselect with the device's providers, threads and session options; timed on this machine."""
    from compress.quantize.opselect import SELECT_OPS, select_ops
    from devices import describe_host, usable_cores
    from runtime import interleaved_latency
    from runtime import resolve_providers

    providers, missing = resolve_providers(profile)
    if missing:  # another EP's answer cannot come from this one
        return {"ops": [], "kept_fp32": [], "path": int8,
                "decision": f"skipped: {', '.join(missing)} not available here, and op timings on another provider "
                            "describe another device"}
    threads = max(1, min(profile.threads, usable_cores()))
    providers = [(name, dict(o)) for name, o in providers]  # onnxruntime takes (name, options) tuples only
    clock = "cpu" if threads == 1 else "wall"

    def whole(models: dict[str, Path]) -> dict[str, float]:
        res = interleaved_latency({k: str(v) for k, v in models.items()}, feeds=feed, providers=providers,
                                  threads=threads, session_config=dict(profile.session_config), rounds=30, warmup=3,
                                  min_seconds=1.0)
        return res.cpu_ms if clock == "cpu" else res.wall_ms

    sel = select_ops(fp32, int8, work, lambda s, o, n: quantize(s, o, n, False), whole, feed, SELECT_OPS, providers,
                     threads, dict(profile.session_config))
    host = describe_host()
    sel["measured_on"] = f"{host['arch']} {host['cpu']}"
    sel["clock"] = clock
    if host["arch"] != profile.arch:
        sel["warning"] = (f"ops timed on this {host['arch']} machine, not on the {profile.arch} device: run the "
                          "quantization on the device for its own answer")
    return sel


def _op_selection_reasons(sel: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    if not sel or not sel.get("kept_fp32"):
        return []
    ops = {o["node"]: o for o in sel["ops"]}
    out = []
    for node in sel["kept_fp32"]:
        o = ops[node]
        out.append({"node": node, "op_type": o["op_type"], "salience": None,
                    "why": f"not faster in INT8 on the device: {o['int8_us']:.0f} us vs {o['fp32_us']:.0f} us in fp32 "
                           f"(op timed alone); the whole model is faster with it in fp32"})
    return out


@dataclass
class _Judge:
    """What the tolerance is measured against: the quantizer's input, or an earlier model of the chain (the
    unpruned fp32 when `compress run` prunes first), by its outputs on the held-out feeds or the user's score."""

    model: Path
    outputs: list[list[np.ndarray]]
    score: Optional[Callable[[Path], float]] = None


def _fallback(fp32: Path, first: Path, work: Path, quantize: Callable[[Path, Path, list[str], bool], None],
              runner: Callable[..., Any], held: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]],
              tolerance: float, judge: _Judge, report: dict[str, Any], on_stage: Callable[[str], None]) -> Path:
    """Accuracy-aware fallback under `tolerance`: layers ranked by label-free sensitivity (against the
    quantizer's input, `reference`), then the fewest most sensitive kept in float until fidelity to the judge's
    model (or the drop of the user's score) is within it. Returns the model to keep; records it in `report`."""
    from compress.evaluate import fidelity
    from compress.quantize.sensitivity import fallback, layer_sensitivity, quantizable_nodes

    score = judge.score
    if score is not None:
        metric = "score_drop"
        err = report["eval"]["fp32"] - report["eval"][report["format"]]
    else:
        fid = report["fidelity"] if judge.model == fp32 else fidelity(judge.outputs, runner(first, held))
        metric = _metric(fid)
        err = 1.0 - (fid["top1_agreement"] if metric == "top1" else fid["cosine_min"] or 0.0)
    report["fallback"] = {"metric": metric, "tolerance": tolerance, "error_before": err,
                          "against": "input" if judge.model == fp32 else "reference"}
    if err <= tolerance:
        return first
    on_stage("ranking layers by sensitivity")
    cands = [n["node"] for n in quantizable_nodes(fp32)]
    # ranked on fidelity even with --eval: label-free salience separates layers that a user's score on a small
    # labelled set ties at zero drop
    sens = layer_sensitivity(fp32, cands, lambda s, o, n: quantize(s, o, n, True), held, reference, runner=runner)
    on_stage("keeping the most sensitive layers in float")
    second = work / "fallback.onnx"
    fb = fallback(fp32, second, lambda s, o, n: quantize(s, o, n, False), sens, held, judge.outputs, tolerance,
                  "cosine_min" if metric == "score_drop" else metric, runner=runner, evaluate=score,
                  reference_model=judge.model)
    report["fallback"].update({k: v for k, v in fb.items() if k not in ("fidelity", "path")})
    if not (fb.get("within_tolerance", True) and second.exists()):
        return first
    if score is not None:
        report["eval"][report["format"]] = fb["fidelity"]["score"]
    report["fidelity"] = fidelity(reference, runner(second, held))
    report["excluded_layers"] = fb.get("excluded", []) + report["excluded_layers"]
    return second


def _time_against_fp32(fp32: Path, model: Path, name: str, profile: DeviceProfile, feed: dict[str, np.ndarray],
                       report: dict[str, Any], on_stage: Callable[[str], None]) -> None:
    """report["latency"] and ["speedup_vs_fp32"]: `model` against fp32, interleaved, with the profile's providers."""
    from runtime import interleaved_latency
    from runtime import resolve_providers

    on_stage(f"timing fp32 vs {name} on {profile.name}")
    providers, _ = resolve_providers(profile)
    ab = interleaved_latency({"fp32": fp32, name: model}, feeds=feed, providers=[(p, dict(o)) for p, o in providers],
                             threads=profile.threads, session_config=dict(profile.session_config), rounds=30,
                             min_seconds=3.0, baseline="fp32")
    report["latency"] = ab.to_json()
    report["speedup_vs_fp32"] = ab.speedup(name, "wall")


def _int4_stage(fp32: Path, dst: Path, profile: DeviceProfile, calib: Optional[str], calib_part: Any,
                held: list[dict[str, np.ndarray]], calib_info: dict[str, Any], opts: QuantOptions,
                on_stage: Callable[[str], None]) -> dict[str, Any]:
    """Weight-only INT4 (compress.quantize.int4): salience on the calibration part, fidelity on the held-out one."""
    from compress.quantize.int4 import MB, quantize_int4

    feeds = _feeds(fp32, calib_part, seed=0, max_samples=opts.max_calib or 16, label=calib)
    on_stage(f"quantizing MatMul weights to INT4 (block {opts.block_size})")
    result = quantize_int4(fp32, dst, feeds, held, block_size=opts.block_size, budget_mb=opts.budget_mb,
                           avg_bits=opts.avg_bits, salience_from=opts.salience, on_stage=on_stage)
    report: dict[str, Any] = {"format": "int4", "device": profile.name, "calibration": calib_info, "simulated": False,
                              "backend": "ort", "quantizer": {k: v for k, v in result.items() if k != "path"},
                              "fidelity": result["fidelity"], "size_mb": result["size_bytes"] / MB,
                              "fp32_size_mb": result["fp32_size_bytes"] / MB, "avg_bits": result["avg_bits"],
                              "stored_bits": result["stored_bits"],
                              "excluded_layers": [{"node": r["node"], "op_type": r["op_type"], "bits": r["bits"],
                                                   "salience": r["salience"], "why": r["why"]}
                                                  for r in result["layers"] if r["bits"] != 4]}
    if opts.measure:
        _time_against_fp32(fp32, dst, "int4", profile, held[0], report, on_stage)
    report["onnx"] = str(dst)
    report["preset"] = None
    return report


def quant_stage(fp32: Path, dst: Path, profile: DeviceProfile, calib: Optional[str], opts: QuantOptions,
                on_stage: Callable[[str], None] = lambda s: None, reference_model: Optional[Path] = None,
                torch_source: Optional[TorchSource] = None) -> dict[str, Any]:
    """Quantize fp32 -> dst and return a JSON-ready report; dst is written only if everything succeeded.

    `reference_model`: what --tolerance is measured against when it is not `fp32` itself (the unpruned model
    when `compress run` quantizes a pruned one): the tolerance then bounds the loss of the whole chain.
    `torch_source`: the PyTorch model `fp32` was exported from, which --backend inc quantizes.
    """
    from compress.evaluate import fidelity, onnx_outputs

    check_format(profile, opts)
    if opts.backend == "inc" and torch_source is None:
        raise UsageError("--backend inc quantizes the PyTorch model, and this command has only ONNX: use "
                         "`compress run MODEL --backend inc ...`")
    calib_part, held_part, calib_info = _split_calib(calib, opts.max_calib)
    held = _feeds(fp32, held_part, seed=99, max_samples=64, label=calib)
    if opts.to == "int4":
        return _int4_stage(fp32, dst, profile, calib, calib_part, held, calib_info, opts, on_stage)
    report: dict[str, Any] = {"format": opts.to, "device": profile.name, "calibration": calib_info,
                              "simulated": opts.to == "fp8" and not profile.fp8}
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst.parent) as tmp:
        work = Path(tmp)
        first = work / "quantized.onnx"
        quantize: Optional[Callable[[Path, Path, list[str], bool], None]] = None  # re-quantize with a node set
        if opts.to == "int8" and opts.backend == "inc":
            from compress.quantize.inc import quantize_inc

            on_stage("quantizing to INT8 with Intel Neural Compressor (PT2E, in torch)")
            module, example, batches = torch_source
            result = quantize_inc(module, example, batches, first, profile, on_stage=on_stage)
            runner, runner_options, preset = onnx_outputs, None, result.get("preset")
        elif opts.to == "int8":
            from compress.quantize.int8 import quantize_int8, try_presets

            on_stage(f"quantizing to INT8 for {profile.name}")
            from compress.quantize.presets import preset_for

            result = try_presets(fp32, first, profile, calib_part, method=opts.method, calib_label=calib)
            runner, runner_options = onnx_outputs, None
            preset = result.get("preset")
            chosen = preset_for(profile, _signedness(preset), family=result.get("family"))  # the faster candidate

            def quantize(src: Path, out: Path, nodes: list[str], only: bool) -> None:
                # the first result's recipe (graph rewrite, smoothing) is reused: re-tuning per layer costs minutes
                kw = {"include": nodes} if only else {"exclude": sorted(set(nodes) | set(slow_ops))}
                quantize_int8(src, out, profile, calib_part, method=opts.method, preset=chosen, recipe=result.get("recipe"),
                              calib_label=calib, **kw)
        else:
            from compress.quantize.fp8 import fp8_outputs, fp8_session_options, quantize_fp8

            on_stage(f"quantizing to FP8 ({opts.fp8_format}{', simulated' if report['simulated'] else ''})")
            feeds = _feeds(fp32, calib_part, seed=0, max_samples=opts.max_calib or 64, label=calib)
            result = quantize_fp8(fp32, first, feeds, fmt=opts.fp8_format, simulated=report["simulated"])
            runner, runner_options, preset = fp8_outputs, fp8_session_options(), None

            def quantize(src: Path, out: Path, nodes: list[str], only: bool) -> None:
                kw = {"include": nodes} if only else {"exclude": nodes}
                quantize_fp8(src, out, feeds, fmt=opts.fp8_format, simulated=report["simulated"], **kw)
        report["quantizer"] = {k: v for k, v in result.items() if k not in ("path",)}
        report["backend"] = opts.backend if opts.to == "int8" else "ort"
        slow_ops: list[str] = []  # ops that op selection keeps in fp32; every later quantization leaves them too
        if opts.to == "int8" and opts.select_ops and quantize is not None:
            on_stage(f"timing each quantized op against fp32 on {profile.name}")
            sel = _select_ops(fp32, first, work, profile, quantize, held[0])
            report["op_selection"] = {k: v for k, v in sel.items() if k != "path"}
            first, slow_ops = Path(sel["path"]), list(sel["kept_fp32"])
        reference = onnx_outputs(fp32, held)
        on_stage("measuring fidelity on held-out inputs")
        report["fidelity"] = fidelity(reference, runner(first, held))
        report["excluded_layers"] = _op_selection_reasons(report.get("op_selection"))
        final = first
        judge = _Judge(Path(reference_model) if reference_model else fp32, reference)
        if reference_model is not None:
            judge.outputs = onnx_outputs(judge.model, held)
        if opts.evaluate is not None:  # the user's --eval metric, bound to the session options the format needs
            on_stage(f"scoring fp32 and {opts.to} with --eval")
            judge.score = opts.evaluate.bind(runner_options)
            report["eval"] = {"function": opts.evaluate.spec, "fp32": judge.score(judge.model), opts.to: judge.score(first)}
        if opts.tolerance is not None and quantize is None:
            report["fallback"] = {"tolerance": opts.tolerance, "note": "no per-layer fallback with --backend inc "
                                  "(its graph is quantized in torch); use --backend ort for it"}
        elif opts.tolerance is not None:
            final = _fallback(fp32, first, work, quantize, runner, held, reference, opts.tolerance, judge, report, on_stage)
        if opts.measure and not report["simulated"]:
            _time_against_fp32(fp32, final, opts.to, profile, held[0], report, on_stage)
        import onnx

        from compress.core import TWO_GB
        from export import write_model

        proto = onnx.load(str(final))  # with its external data, rewritten under dst's own name
        write_model(proto, dst, external=proto.ByteSize() >= TWO_GB if proto.ByteSize() > 0 else False)
    report["onnx"] = str(dst)
    report["preset"] = preset
    return report
