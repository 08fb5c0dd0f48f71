"""The quantize stage: one backend of the registry (INT8 with onnxruntime or INC, FP8, INT4) makes the model,
then the same steps for every format: per-op latency selection where the backend's kernels call for it,
fidelity on held-out inputs, the user's --eval score, accuracy-aware fallback under a tolerance, and the
measured speedup against fp32.

`compress quantize` and `compress run --quant` both go through here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx

from compress.core import (
    TWO_GB,
    InputError,
    ModelError,
    StageClock,
    UsageError,
    few,
    first_line,
    nonfinite_initializers,
)
from compress.evaluate import fidelity, judged, onnx_outputs
from compress.models import load_calib
from compress.quantization.calib import calibration_feeds
from compress.quantization.kept_float import KeptFloat
from compress.quantization.ops import must_be_finite
from compress.quantization.opselect import SELECT_OPS, select_ops
from compress.quantization.options import SEARCHED_METHODS, QuantOptions
from compress.quantization.registry import Backend, Quantized, QuantJob, Requantize, backend_for
from compress.quantization.sensitivity import (
    affordable,
    fallback,
    float_costs,
    quantizable_nodes,
    rank_by_cost,
    screened_sensitivity,
)
from compress.report import QuantResult
from devices import DeviceProfile, describe_host, usable_cores
from export import PAST_PREFIX, write_model
from runtime import device_latency, resolve_providers, thread_candidates, tuned_latency

TorchSource = tuple[Any, dict[str, Any], list[dict[str, Any]]]  # (nn.Module, example inputs, calibration batches)
# The fallback times keeping each of its FALLBACK_TIMED most sensitive layers in float (one model each, timed
# together, interleaved); a cost under FLOAT_COST_FLOOR of the quantized model's time is timing noise
FALLBACK_TIMED = 12
FLOAT_COST_FLOOR = 0.01
# The ranking measures each layer on the first RANK_SAMPLES held-out inputs (the search, every figure reported,
# on all of them): timm's MobileNetV2-050 (53 layers, 32 synthetic inputs) ranked on 16 or 8 as on all 32
# (Spearman 0.999, the same top 8) in 5.9 or 4.8 s instead of 7.8 (AMD EPYC, 2 cores); a layer's measure is a
# whole-model run per input, so this is most of the ranking's cost on a heavy model (MiniLM: 11 ms each).
RANK_SAMPLES = 16


class _Steps:
    """The quantize stage's own clock (compress.core.StageClock's spans): seconds per step (quantize,
    op_selection, fidelity, eval, recalibrate, fallback_timing, every_float, ranking, float_costs, search,
    timing) for report.json, each running from one call to the next; `say` passes a progress line on without
    starting a step (the backends' lines fall under "quantize"). The stage's total hid where it went: at 130
    layers, 79-87 s of which the ranking and the float costs took ~25 s each."""

    def __init__(self, on_stage: Callable[[str], None]) -> None:
        self.say = on_stage
        self.clock = StageClock()

    def __call__(self, key: str, label: Optional[str] = None) -> None:
        self.clock.start(key)
        if label is not None:
            self.say(label)

    def stop(self) -> dict[str, float]:
        return self.clock.stop()


def check_format(profile: DeviceProfile, opts: QuantOptions) -> Backend:
    """The registry's backend for these options, once they pass its checks against the device (FP8 only where
    the device has FP8 hardware unless --simulate, INT4's budget, ...) and the tolerance's range."""
    backend = backend_for(opts.to, opts.backend)
    if opts.tolerance is not None and opts.evaluate is None and not 0.0 <= opts.tolerance < 1.0:
        raise UsageError(f"--tolerance {opts.tolerance}: must be in [0, 1) (a loss of fidelity; with --eval, any drop >= 0)")
    if opts.tolerance is not None and opts.tolerance < 0:
        raise UsageError(f"--tolerance {opts.tolerance}: must be >= 0")
    backend.check(profile, opts)
    return backend


def _split_calib(calib: Optional[str], max_calib: Optional[int], shown: Optional[str] = None
                 ) -> tuple[Any, Any, dict[str, Any]]:
    """Calibration arrays and held-out arrays (a quarter, when there are 8+ samples); None means synthetic.

    The arrays are load_calib's lazy ones (memory-mapped or read up to max_calib samples); the split slices
    them without copying, and errors about them name the file through CalibReader's label."""
    if calib is None:
        return None, None, {"source": "synthetic", "samples": 0, "held_out": True}

    data = load_calib(calib, max_samples=max_calib)
    n = next(iter(data.values())).shape[0]
    if n < 8:
        return data, data, {"source": shown or calib, "samples": n, "held_out": False}
    cut = n - max(1, n // 4)
    return ({k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()},
            {"source": shown or calib, "samples": n, "calibration_samples": cut, "held_out": True})


@dataclass
class _Timer:
    """Whole models timed on this machine as the device runs them (its providers and session options),
    interleaved, each at its fastest of 1, 2, 4, ... up to the device's threads (runtime.TunedAB: how `compress
    run` times and recommends them; a choice made at another count can be the wrong one: on `make demo`'s pruned
    CNN, 2-vCPU AMD EPYC with AVX2 kernels, the float stem was 10% faster than all-INT8 at 1 thread and within
    noise of it at 2); None from `_timer` when a provider the device names is not here."""

    profile: DeviceProfile
    providers: list[Any]  # as onnxruntime takes them, for op selection's single-op models
    threads: int  # the most; single ops are timed with these
    feed: dict[str, np.ndarray]

    @property
    def counts(self) -> list[int]:
        return thread_candidates(self.threads)

    @property
    def clock(self) -> str:
        return "cpu" if self.threads == 1 else "wall"

    @property
    def said(self) -> str:
        return f"{self.clock} clock, " + (f"{self.threads} thread" if self.threads == 1 else
                                          f"each at its fastest of {', '.join(map(str, self.counts))} threads")

    @property
    def session_config(self) -> dict[str, str]:
        return dict(self.profile.session_config)

    def at_device_threads(self, models: dict[str, Path]) -> dict[str, float]:
        """The models timed at the device's thread count alone (`threads`; the cpu clock at 1, else the wall
        clock): for the float costs, estimates compared with one another and summed, not a choice between two
        models. Timing each at 1 and 2 threads took 11.4 s for MiniLM's 14 models, at 2 alone 5.4 s (AMD EPYC,
        2 cores)."""
        res = device_latency(models, self.profile, self.feed, threads=self.threads, rounds=30, warmup=3,
                             min_seconds=1.0)
        return res.cpu_ms if self.threads == 1 else res.wall_ms

    def __call__(self, models: dict[str, Path]) -> dict[str, float]:
        if self.threads == 1:
            return self.at_device_threads(models)
        ab = tuned_latency(models, self.profile, self.feed, candidates=self.counts, baseline=next(iter(models)),
                           rounds=30, warmup=3, min_seconds=1.0)
        return {n: ab.wall_ms(n) for n in models}


def _timer(profile: DeviceProfile, feed: dict[str, np.ndarray]) -> tuple[Optional[_Timer], list[str]]:
    providers, missing = resolve_providers(profile)
    if missing:  # another EP's answer cannot come from this one
        return None, missing
    threads = max(1, min(profile.threads, usable_cores()))
    # onnxruntime takes (name, options) tuples only
    return _Timer(profile, [(name, dict(o)) for name, o in providers], threads, feed), []


def _select_ops(fp32: Path, int8: Path, work: Path, profile: DeviceProfile,
                quantize: Callable[[Path, Path, list[str], bool], None], feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """compress.quantization.opselect with the device's providers, threads and session options; timed on this machine."""
    whole, missing = _timer(profile, feed)
    if whole is None:
        return {"ops": [], "kept_fp32": [], "path": int8,
                "decision": f"skipped: {', '.join(missing)} not available here, and op timings on another provider "
                            "describe another device"}
    sel = select_ops(fp32, int8, work, lambda s, o, n: quantize(s, o, n, False), whole, feed, SELECT_OPS,
                     whole.providers, whole.threads, whole.session_config)
    host = describe_host()
    sel["measured_on"] = f"{host['arch']} {host['cpu']}"
    sel["clock"] = whole.said
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


def _error(model: Path, fp32: Path, judge: _Judge, runner: Callable[..., Any], held: list[dict[str, np.ndarray]],
           report: dict[str, Any], measured: bool = False) -> tuple[str, float]:
    """(metric, error) of `model` under the tolerance: the drop of the user's score, else compress.evaluate.judged
    against the judge's model (matched boxes, top-1 or the worst cosine). `measured`: report already holds its
    figures."""
    if judge.score is not None:
        got = report["eval"][report["format"]] if measured else judge.score(model)
        return "score_drop", report["eval"]["fp32"] - got
    fid = report["fidelity"] if measured and judge.model == fp32 else _fidelity(judge.outputs, runner(model, held),
                                                                                  held, report)
    return judged(fid)


def _fidelity(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]],
              held: list[dict[str, np.ndarray]], report: dict[str, Any]) -> dict[str, Any]:
    """compress.evaluate.fidelity, and for a decoder fed its KV cache (its prefill: past_key_values.* feeds) the
    rule compress run --generate judges it by: perplexity on the user's text (--calib), next-token agreement on
    synthetic tokens, so that the float fallback aims at what the run will judge."""
    decoder = bool(held) and any(k.startswith(PAST_PREFIX) for k in held[0]) and "input_ids" in held[0]
    real = (report.get("calibration") or {}).get("source") != "synthetic"
    return fidelity(reference, candidate, tokens=held if decoder else None, real_tokens=decoder and real)


def _recalibrate(fp32: Path, first: Path, work: Path, method: str, recalibrated: Callable[[str], Requantize],
                 slow_ops: list[str], runner: Callable[..., Any], held: list[dict[str, np.ndarray]],
                 reference: list[list[np.ndarray]], err: float, tolerance: float, judge: _Judge,
                 report: dict[str, Any], steps: _Steps) -> tuple[Path, str, float]:
    """Before any layer is kept in float: when `first` misses the tolerance, the same recipe calibrated with each
    other SEARCHED_METHODS method (one quantization and one evaluation each, no speed lost). Returns the first
    one within the tolerance, its method and error, else `first`'s (`err`): the layer fallback starts from the method
    it was given, since a method that merely errs less can still fail it (percentile clips the activations of
    the ops left quantized when every layer is in float: resnet_tiny at tolerance 0 never got back to 0).
    Records what was tried in report["calibration"]["tried"].

    On the demo pruned 25% (AVX2 kernels), minmax lost 2-3 of 512 held-out images more than percentile in 2 of 3
    runs (the same in the third), and in one cold `make demo` the float fallback then kept 5 layers in float to
    get back within 1 point: INT8 1.96x fp32 instead of 2.39x."""
    tried = [{"method": method, "error": round(err, 6)}]
    for other in SEARCHED_METHODS:
        if other == method:
            continue
        steps("recalibrate", f"calibrating with {other} instead of {method}")
        out = work / f"calibrated-{other}.onnx"
        try:
            recalibrated(other)(fp32, out, list(slow_ops), False)
        except ModelError as x:  # a method that cannot calibrate this model is one fewer to try, not a failed run
            tried.append({"method": other, "error": None, "failed": first_line(x)})
            continue
        _, e = _error(out, fp32, judge, runner, held, report)
        tried.append({"method": other, "error": round(e, 6)})
        if e <= tolerance:
            report["calibration"] = {**report["calibration"], "tried": tried, "method": other}
            report["fidelity"] = _fidelity(reference, runner(out, held), held, report)
            if judge.score is not None:
                report["eval"][report["format"]] = judge.score(out)
            return out, other, e
    report["calibration"] = {**report["calibration"], "tried": tried, "method": method}
    return first, method, err


def _fallback(fp32: Path, first: Path, work: Path, quantize: Callable[[Path, Path, list[str], bool], None],
              runner: Callable[..., Any], held: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]],
              metric: str, err: float, tolerance: float, judge: _Judge, report: dict[str, Any],
              steps: _Steps, timer: Optional[_Timer] = None, must_pay: bool = False,
              kept_float: Sequence[str] = ()) -> Path:
    """Accuracy-aware fallback under `tolerance`: layers ranked by label-free sensitivity (against the
    quantizer's input, `reference`, on its first RANK_SAMPLES inputs) and, with a `timer`, by that per
    millisecond keeping each in float costs the whole model (the FALLBACK_TIMED most sensitive are timed; for
    dynamic INT8 on copies of `first`, compress.quantization.kept_float), then the fewest first-ranked kept in float until
    fidelity to the judge's model (or the drop of the user's score) is within it; `metric` and `err` are
    `first`'s (_error). `must_pay`: stop where the timed costs say more layers in float would leave the model no
    faster than `fp32` (compress.quantization.sensitivity.affordable). `kept_float`: op selection's float ops, never
    ranked. Returns the model to keep; records it in `report`."""
    score = judge.score
    report["fallback"] = {"metric": metric, "tolerance": tolerance, "error_before": err,
                          "against": "input" if judge.model == fp32 else "reference"}
    if err <= tolerance:
        return first
    if must_pay and timer is not None:  # layers in float only add time: an INT8 model that does not pay never will
        steps("fallback_timing", f"timing {first.name} against {fp32.name}")
        ms = timer({"fp32": fp32, "quantized": first})
        if ms["quantized"] >= ms["fp32"]:
            report["fallback"].update(
                within_tolerance=False, error=err, max_excluded=0,
                skipped=f"the quantized model is no faster than {fp32.name} ({ms['quantized']:.3f} against "
                        f"{ms['fp32']:.3f} ms, {timer.said}): keeping layers in float cannot make it pay")
            return first
    # what op selection keeps in float stays float in every model the fallback writes: nothing to rank
    floats = set(kept_float)
    cands = [n["node"] for n in quantizable_nodes(fp32) if n["node"] not in floats]
    # ranked on fidelity even with --eval: label-free salience separates layers that a user's score on a small
    # labelled set ties at zero drop
    if cands:  # the fallback's best case first: one quantization says whether any choice of layers can do
        steps("every_float", f"checking that {len(cands)} layers in float reach the tolerance")
        every = work / "every-layer-float.onnx"
        quantize(fp32, every, cands, False)
        _, floor = _error(every, fp32, judge, runner, held, report)
        if floor > tolerance:
            report["fallback"].update(
                within_tolerance=False, error=err, every_layer_float_error=floor,
                skipped=f"even with all {len(cands)} layers in float the error is {floor:.4g} > tolerance "
                        f"{tolerance:g}: what else is quantized (Add, Mul, Concat, ...) costs it, so no choice of "
                        "layers can bring it back")
            return first
    steps("ranking", "ranking layers by sensitivity")
    sens, screened = screened_sensitivity(fp32, first, cands, lambda s, o, n: quantize(s, o, n, True),
                                          held[:RANK_SAMPLES], reference[:RANK_SAMPLES], runner=runner)
    screened["samples"] = min(len(held), RANK_SAMPLES)
    report["fallback"]["sensitivity"] = screened
    salient = [r["node"] for r in sens if r.get("salience")][:FALLBACK_TIMED]
    limit, why = None, ""
    if timer is not None and len(salient) > 1:
        steps("float_costs", f"timing what keeping each of {len(salient)} layers in float costs")
        copies = KeptFloat(fp32, first)  # dynamic INT8: the timed models are copies (kept_float.py)

        def one_in_float(src: Path, out: Path, nodes: list[str]) -> None:
            if len(nodes) != 1 or not copies.write(out, nodes[0]):
                quantize(src, out, nodes, False)

        costs, base_ms, fp32_ms = float_costs(fp32, first, one_in_float, salient, timer.at_device_threads)
        sens = rank_by_cost(sens, costs, FLOAT_COST_FLOOR * base_ms)
        said = f"{timer.clock} clock, {timer.threads} thread{'s' if timer.threads > 1 else ''}"
        report["fallback"]["ranked_by"] = f"salience per ms in float ({said})"
        if must_pay:
            limit = affordable([r for r in sens if r.get("salience") is not None], base_ms, fp32_ms)
            why = (f"estimated from each layer's cost in float: {base_ms:.3f} ms quantized + the kept layers' costs "
                   f"against {fp32_ms:.3f} ms for {fp32.name}")
    steps("search", "keeping the most sensitive layers in float")
    second = work / "fallback.onnx"
    fb = fallback(fp32, second, lambda s, o, n: quantize(s, o, n, False), sens, held, judge.outputs, tolerance,
                  "cosine_min" if metric == "score_drop" else metric, runner=runner, evaluate=score,
                  reference_model=judge.model, max_excluded=limit, max_why=why)
    report["fallback"].update({k: v for k, v in fb.items() if k not in ("fidelity", "path")})
    if not (fb.get("within_tolerance", True) and second.exists()):
        return first
    if score is not None:
        report["eval"][report["format"]] = fb["fidelity"]["score"]
    report["fidelity"] = _fidelity(reference, runner(second, held), held, report)
    report["excluded_layers"] = fb.get("excluded", []) + report["excluded_layers"]
    return second


def _time_against_fp32(fp32: Path, model: Path, name: str, profile: DeviceProfile, feed: dict[str, np.ndarray],
                       report: dict[str, Any], steps: _Steps) -> None:
    """report["latency"] and ["speedup_vs_fp32"]: `model` against fp32, interleaved, with the profile's providers."""
    steps("timing", f"timing fp32 vs {name} on {profile.name}")
    ab = device_latency({"fp32": fp32, name: model}, profile, feed, baseline="fp32")
    report["latency"] = ab.to_json()
    report["speedup_vs_fp32"] = ab.speedup(name, "wall")


def quant_stage(fp32: Path, dst: Path, profile: DeviceProfile, calib: Optional[str], opts: QuantOptions,
                on_stage: Callable[[str], None] = lambda s: None, reference_model: Optional[Path] = None,
                torch_source: Optional[TorchSource] = None) -> QuantResult:
    """Quantize fp32 -> dst and say how (QuantResult); dst is written only if everything succeeded.

    `reference_model`: what --tolerance is measured against when it is not `fp32` itself (the unpruned model
    when `compress run` quantizes a pruned one): the tolerance then bounds the loss of the whole chain.
    `torch_source`: the PyTorch model `fp32` was exported from, which a torch backend (--backend inc) quantizes.
    """
    backend = check_format(profile, opts)
    model = onnx.load(str(fp32), load_external_data=True)
    bad = nonfinite_initializers(model, must_be_finite(model.graph))
    del model
    if bad:  # its ranges and scales would be NaN: onnxruntime's quantizer fails deep inside, or writes garbage
        raise InputError(f"{fp32}: NaN or Inf in {len(bad)} weight tensor(s) ({few(bad)}): a model with "
                         "non-finite weights cannot be quantized")
    if backend.takes == "torch" and torch_source is None:
        raise UsageError(f"--backend {backend.backend} quantizes the PyTorch model, and this command has only ONNX: "
                         f"use `compress run MODEL --backend {backend.backend} ...`")
    calib_part, held_part, calib_info = _split_calib(calib, opts.max_calib, opts.calib_name)
    held = calibration_feeds(fp32, held_part, seed=99, max_samples=64, label=calib)
    simulated = backend.simulated(profile, opts)
    report: dict[str, Any] = {"format": opts.to, "device": profile.name, "calibration": calib_info,
                              "simulated": simulated}
    steps = _Steps(on_stage)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst.parent) as tmp:
        work = Path(tmp)
        job = QuantJob(fp32, work / "quantized.onnx", work, profile, opts, calib, calib_part, held, simulated,
                       torch_source, steps.say)
        steps("quantize")
        made = backend.quantize(job)
        report["quantizer"] = made.info
        report["backend"] = backend.backend
        final = _judged(backend, made, job, report, reference_model, steps)
        if opts.measure and not simulated:
            _time_against_fp32(fp32, final, opts.to, profile, held[0], report, steps)
        proto = onnx.load(str(final))  # with its external data, rewritten under dst's own name
        bad = nonfinite_initializers(proto, must_be_finite(proto.graph))
        if bad:  # whatever the cause (data, a degenerate range, a bug): never a silently broken model
            raise ModelError(f"the {opts.to} model has NaN or Inf in {len(bad)} scale or weight tensor(s) "
                             f"({few(bad)}): not written")
        write_model(proto, dst, external=proto.ByteSize() >= TWO_GB if proto.ByteSize() > 0 else False)
    report["onnx"] = str(dst)
    report["preset"] = made.preset
    report["step_seconds"] = steps.stop()
    return QuantResult.from_json(report)


def _judged(backend: Backend, made: Quantized, job: QuantJob, report: dict[str, Any],
            reference_model: Optional[Path], steps: _Steps) -> Path:
    """Op selection, fidelity, --eval and the float fallback on what the backend made; returns the model to keep
    and fills `report` (in this order: op_selection, fidelity, the format's own fields, excluded_layers, eval,
    fallback)."""
    fp32, work, held, opts = job.fp32, job.work, job.held, job.opts
    first = made.path
    slow_ops: list[str] = []  # ops that op selection keeps in fp32; every later quantization leaves them too
    if backend.selects_ops and opts.select_ops and made.requantize is not None:
        steps("op_selection", f"timing each quantized op against fp32 on {job.profile.name}")
        sel = _select_ops(fp32, first, work, job.profile, made.requantize, held[0])
        report["op_selection"] = {k: v for k, v in sel.items() if k != "path"}
        first, slow_ops = Path(sel["path"]), list(sel["kept_fp32"])
    if made.fidelity is not None:  # measured by the backend on these held-out feeds
        report["fidelity"] = made.fidelity
        report.update(made.report)
        report["excluded_layers"] = made.excluded_layers
        return first
    runner, runner_options = backend.outputs()
    reference = onnx_outputs(fp32, held)
    steps("fidelity", "measuring fidelity on held-out inputs")
    report["fidelity"] = _fidelity(reference, runner(first, held), held, report)
    report.update(made.report)
    report["excluded_layers"] = made.excluded_layers + _op_selection_reasons(report.get("op_selection"))
    judge = _Judge(Path(reference_model) if reference_model else fp32, reference)
    if reference_model is not None:
        judge.outputs = onnx_outputs(judge.model, held)
    if opts.evaluate is not None:  # the user's --eval metric, bound to the session options the format needs
        steps("eval", f"scoring fp32 and {opts.to} with --eval")
        judge.score = opts.evaluate.bind(runner_options)
        report["eval"] = {"function": opts.evaluate.spec, "fp32": judge.score(judge.model), opts.to: judge.score(first)}
    if opts.tolerance is None:
        return first
    if made.requantize is None:
        report["fallback"] = {"tolerance": opts.tolerance, "note": f"no per-layer fallback with --backend "
                              f"{backend.backend} (its graph is quantized in torch); use --backend ort for it"}
        return first
    requantize = made.requantize
    metric, err = _error(first, fp32, judge, runner, held, report, measured=True)
    if reference_model is not None and err > opts.tolerance:
        _, base = _error(fp32, fp32, judge, onnx_outputs, held, report)
        if base > opts.tolerance:  # e.g. a cut too deep: no layer kept in float can win that back
            report["fallback"] = {"metric": metric, "tolerance": opts.tolerance, "error_before": err,
                                  "against": "reference", "within_tolerance": False, "input_error": base,
                                  "skipped": "the float model quantization starts from is already outside the "
                                             f"tolerance ({base:.4g}): no layer kept in float can bring it back"}
            return first
    if made.recalibrated is not None and err > opts.tolerance:
        first, method, err = _recalibrate(fp32, first, work, opts.method, made.recalibrated, slow_ops, runner, held,
                                          reference, err, opts.tolerance, judge, report, steps)
        if method != opts.method:
            requantize = made.recalibrated(method)

    def keep_slow_ops(src: Path, out: Path, nodes: list[str], only: bool) -> None:
        requantize(src, out, nodes if only else sorted(set(nodes) | set(slow_ops)), only)

    # ranked by time only where this machine runs what the device runs (op selection warns; this just skips)
    local = opts.select_ops and not job.simulated and describe_host()["arch"] == job.profile.arch
    timer = _timer(job.profile, held[0])[0] if local else None
    return _fallback(fp32, first, work, keep_slow_ops, runner, held, reference, metric, err, opts.tolerance, judge,
                     report, steps, timer, opts.fallback_must_pay, slow_ops)
