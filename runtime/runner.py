#!/usr/bin/env python3
"""Device-side latency runner: time one ONNX model with onnxruntime and print one JSON document.

This file is copied as-is to edge devices (over SSH, to a Raspberry Pi and the like) and run with whatever
Python is there, so it must stay one file, Python 3.8 syntax, and import only the standard library, numpy
and onnxruntime (onnx optionally, to size external data). The host-side `runtime.profiler` runs the same
file in a subprocess on the host, so local and remote figures come from identical code.

Usage:
    python runner.py MODEL.onnx --config CONFIG.json   (or --config - to read the config from stdin)

stdout carries exactly one JSON document: the result, or {"schema", "error": {"kind", "message"}} with exit
status 1. stderr carries JSON progress lines ({"progress", "total", "phase"}) and anything else that the
native libraries print, which readers must skip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

SCHEMA = "edge-compress/profile/1"

DEFAULTS = {
    "providers": [["CPUExecutionProvider", {}]],
    "threads": 1,
    "graph_optimization_level": "all",
    "session_config": {},  # onnxruntime session config entries (string -> string)
    "warmup": 10,
    "runs": None,  # None: adaptive, until the median's confidence interval is tight enough
    "max_seconds": 20.0,
    "min_runs": 30,
    "min_seconds": 1.0,  # a window long enough that one burst of contention cannot own the median
    "max_runs": 200000,
    "target_ci": 0.02,
    "seed": 0,
    "hotspots": False,
    "hotspot_runs": 10,
    "inputs": None,
    "inputs_npz": None,
    # A decoder with its KV cache: {"prompt_len": P, "context_len": C} times the prefill of P tokens and one decode
    # step after C tokens of past (generation_feeds), instead of one forward pass on `inputs`.
    "generation": None,
    # Missing providers: False refuses (the host already chose them); True drops them and adds CPU, for remote
    # runs where only the device knows what its onnxruntime has. The result lists what was dropped.
    "cpu_fallback": False,
}

# ONNX element types the runner can feed, by onnxruntime's type string.
ORT_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint64)": "uint64",
    "tensor(uint32)": "uint32",
    "tensor(uint16)": "uint16",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

PROGRESS_INTERVAL_S = 0.1  # the host draws a bar; more than ~10 updates a second is noise
CHECK_INTERVAL_S = 0.1  # how often adaptive mode re-sorts the samples to test convergence
Z95 = 1.959963984540054
DRIFT_BLOCKS = 4  # time-ordered blocks whose medians must agree before adaptive mode may stop
DRIFT_FACTOR = 2.0  # ...within DRIFT_FACTOR * target_ci of the overall median (a block's CI is ~2x wider)


class RunnerError(Exception):
    """A failure with a kind the host maps onto its own error classes (model, device, config, runtime)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def one_line(text: Any, limit: int = 400) -> str:
    """onnxruntime's messages span lines and repeat paths; the host shows one line per error."""
    s = str(text).strip()
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    s = lines[0] if lines else ""
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- config


def load_config(arg: Optional[str]) -> Dict[str, Any]:
    """Read the config (file or stdin) and fill defaults; unknown keys are errors so typos never pass."""
    raw = {}  # type: Dict[str, Any]
    if arg is not None:
        try:
            text = sys.stdin.read() if arg == "-" else open(arg, "r").read()
        except OSError as e:
            raise RunnerError("config", "cannot read config {}: {}".format(arg, e.strerror or e))
        if text.strip():
            try:
                raw = json.loads(text)
            except ValueError as e:
                raise RunnerError("config", "config is not valid JSON: {}".format(one_line(e)))
        if not isinstance(raw, dict):
            raise RunnerError("config", "config must be a JSON object")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise RunnerError("config", "unknown config key(s): {}; known: {}".format(", ".join(unknown), ", ".join(sorted(DEFAULTS))))
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in raw.items() if v is not None or k == "runs"})
    validate_config(cfg)
    return cfg


def _int(cfg: Dict[str, Any], key: str, low: int) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise RunnerError("config", "{} must be an integer >= {} (got {!r})".format(key, low, v))


def _num(cfg: Dict[str, Any], key: str) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise RunnerError("config", "{} must be a positive number (got {!r})".format(key, v))


def validate_config(cfg: Dict[str, Any]) -> None:
    """Check types and ranges up front: a bad value found after minutes of timing wastes the device."""
    _int(cfg, "threads", 1)
    _int(cfg, "warmup", 0)
    _int(cfg, "min_runs", 1)
    _int(cfg, "max_runs", 1)
    _int(cfg, "hotspot_runs", 1)
    _int(cfg, "seed", 0)
    if cfg["runs"] is not None:
        _int(cfg, "runs", 1)
    _num(cfg, "max_seconds")
    if isinstance(cfg["min_seconds"], bool) or not isinstance(cfg["min_seconds"], (int, float)) or cfg["min_seconds"] < 0:
        raise RunnerError("config", "min_seconds must be a number >= 0 (got {!r})".format(cfg["min_seconds"]))
    _num(cfg, "target_ci")
    if cfg["graph_optimization_level"] not in ("disable", "basic", "extended", "all"):
        raise RunnerError("config", "graph_optimization_level must be disable, basic, extended or all (got {!r})".format(cfg["graph_optimization_level"]))
    provs = cfg["providers"]
    if not isinstance(provs, list) or not provs:
        raise RunnerError("config", "providers must be a non-empty list of [name, options] pairs")
    norm = []  # type: List[Tuple[str, Dict[str, Any]]]
    for p in provs:
        if isinstance(p, str):
            p = [p, {}]
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict)):
            raise RunnerError("config", "each provider must be [name, {{options}}] (got {!r})".format(p))
        norm.append((p[0], dict(p[1])))
    cfg["providers"] = norm
    if not isinstance(cfg["session_config"], dict):
        raise RunnerError("config", "session_config must be an object of string entries")
    if not isinstance(cfg["hotspots"], bool):
        raise RunnerError("config", "hotspots must be true or false")
    if not isinstance(cfg["cpu_fallback"], bool):
        raise RunnerError("config", "cpu_fallback must be true or false")
    if cfg["inputs"] is not None and not isinstance(cfg["inputs"], dict):
        raise RunnerError("config", "inputs must be an object keyed by input name")
    if cfg["inputs_npz"] is not None and not isinstance(cfg["inputs_npz"], str):
        raise RunnerError("config", "inputs_npz must be a path")
    g = cfg["generation"]
    if g is not None:
        if not isinstance(g, dict) or sorted(k for k in g if k != "sizes") != ["context_len", "prompt_len"]:
            raise RunnerError("config", "generation must be an object with prompt_len and context_len, and optionally "
                                        "sizes (got {!r})".format(g))
        _int(g, "prompt_len", 1)
        _int(g, "context_len", 1)
        sizes = g.get("sizes")
        if sizes is not None:
            if not isinstance(sizes, dict) or not set(sizes) <= {"kv_heads", "head_size"}:
                raise RunnerError("config", "generation.sizes must be an object with kv_heads and head_size")
            for key in sizes:
                _int(sizes, key, 1)


# -------------------------------------------------------------------------------------------- progress


class Progress(object):
    """JSON progress lines on stderr, throttled so a fast model does not flood the pipe."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, done: int, total: Optional[int], phase: str, now: Optional[float] = None, force: bool = False) -> None:
        now = time.perf_counter() if now is None else now
        if not force and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        try:
            sys.stderr.write(json.dumps({"progress": done, "total": total, "phase": phase}) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # the host stopped listening; the result still goes to stdout


# ------------------------------------------------------------------------------------------- session


def import_ort() -> Any:
    try:
        import onnxruntime as ort  # noqa: F401
    except ImportError as e:
        raise RunnerError("device", "onnxruntime is not installed for {} ({})".format(sys.executable, one_line(e)))
    return ort


def session_options(ort: Any, cfg: Dict[str, Any], profile_prefix: Optional[str] = None) -> Any:
    """Sequential execution, inter-op 1: the device's real configuration, and the least noisy one."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg["threads"]
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[cfg["graph_optimization_level"]]
    so.log_severity_level = 3  # warnings would interleave with the progress lines on stderr
    for key, value in cfg["session_config"].items():
        try:
            so.add_session_config_entry(str(key), str(value))
        except Exception as e:
            raise RunnerError("config", "session config {}={}: {}".format(key, value, one_line(e)))
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def check_providers(ort: Any, cfg: Dict[str, Any]) -> List[str]:
    """onnxruntime silently skips a provider it lacks; the runner refuses instead, so figures never lie.

    With cpu_fallback the missing ones are dropped (CPU added last) and returned, so the result can say so.
    """
    available = ort.get_available_providers()
    missing = [name for name, _ in cfg["providers"] if name not in available]
    if missing and not cfg["cpu_fallback"]:
        raise RunnerError("device", "this onnxruntime ({}) lacks {}; available: {}".format(
            ort.__version__, ", ".join(missing), ", ".join(available)))
    if missing:
        kept = [(name, opts) for name, opts in cfg["providers"] if name in available]
        if "CPUExecutionProvider" not in [name for name, _ in kept]:
            kept.append(("CPUExecutionProvider", {}))
        cfg["providers"] = kept
    return missing


def create_session(ort: Any, model: str, cfg: Dict[str, Any], profile_prefix: Optional[str] = None) -> Any:
    names = [name for name, _ in cfg["providers"]]
    opts = [{str(k): _option_str(v) for k, v in o.items()} for _, o in cfg["providers"]]
    try:
        return ort.InferenceSession(model, sess_options=session_options(ort, cfg, profile_prefix), providers=names, provider_options=opts)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types, all Exception
        raise RunnerError("model", "onnxruntime cannot load {}: {}".format(model, one_line(e)))


def _option_str(v: Any) -> str:
    """Provider options travel as strings; JSON true/false must become the "1"/"0" every EP accepts."""
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


# -------------------------------------------------------------------------------------------- inputs


def _spec_for(cfg: Dict[str, Any], name: str) -> Dict[str, Any]:
    spec = (cfg["inputs"] or {}).get(name) or {}
    if not isinstance(spec, dict):
        raise RunnerError("config", "inputs[{!r}] must be an object with shape/dtype/low/high".format(name))
    return spec


def resolve_shape(name: str, model_shape: List[Any], spec: Dict[str, Any]) -> List[int]:
    """Concrete shape: the spec's dims fill symbolic ones; a fixed dim the spec contradicts is an error."""
    given = spec.get("shape")
    if given is None:
        return [d if isinstance(d, int) and d >= 0 else 1 for d in model_shape]
    if not isinstance(given, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in given):
        raise RunnerError("config", "inputs[{!r}].shape must be a list of non-negative integers (got {!r})".format(name, given))
    if len(given) != len(model_shape):
        raise RunnerError("config", "input {!r}: shape {} has rank {}, the model's {} has rank {}".format(
            name, given, len(given), _shape_text(model_shape), len(model_shape)))
    for g, m in zip(given, model_shape):
        if isinstance(m, int) and m >= 0 and g != m:
            raise RunnerError("config", "input {!r}: shape {} does not fit the model's {}".format(name, given, _shape_text(model_shape)))
    return list(given)


def _shape_text(shape: List[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def random_feed(np: Any, rng: Any, name: str, shape: List[int], dtype: str, spec: Dict[str, Any]) -> Any:
    """Data a real model accepts: masks of ones, ints in [low, high], floats N(0,1) or uniform in [low, high]."""
    low, high = spec.get("low"), spec.get("high")
    if "mask" in name.lower():
        return np.ones(shape, dtype=dtype)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.dtype(dtype).kind in "iu":
        lo = int(math.floor(low)) if low is not None else 0
        hi = int(math.floor(high)) if high is not None else 1
        if hi < lo:
            raise RunnerError("config", "input {!r}: high {} is below low {}".format(name, high, low))
        return rng.integers(lo, hi + 1, size=shape).astype(dtype)
    if low is not None and high is not None and float(high) > float(low):
        return rng.uniform(float(low), float(high), size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def npz_feeds(np: Any, path: str, inputs: List[Any], shapes: Dict[str, List[int]]) -> Dict[str, Any]:
    """The first sample batch of a calibration .npz (first axis = samples), cast to the model's types."""
    try:
        npz = np.load(path, allow_pickle=False)
        data = {k: npz[k] for k in npz.files}
    except Exception as e:
        raise RunnerError("config", "inputs_npz {} is not a readable .npz: {}".format(path, one_line(e) or type(e).__name__))
    names = [i.name for i in inputs]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise RunnerError("config", "inputs_npz {}: {} not an input of the model; its inputs are {}".format(
            path, ", ".join(repr(k) for k in unknown), ", ".join(names)))
    feeds = {}
    for inp in inputs:
        if inp.name not in data:
            continue
        arr = data[inp.name]
        rank = len(inp.shape)
        if arr.ndim == rank + 1:  # samples stacked on a new axis: one sample is one feed
            arr = arr[0]
        elif arr.ndim == rank and rank > 0:  # the sample axis is the batch axis: take one batch
            arr = arr[: max(1, shapes[inp.name][0])]
        else:
            raise RunnerError("config", "inputs_npz {}: {!r} has shape {}, which does not fit the model's {}".format(
                path, inp.name, list(arr.shape), _shape_text(inp.shape)))
        feeds[inp.name] = np.ascontiguousarray(arr.astype(ORT_TO_NUMPY[inp.type], copy=False))
    return feeds


def timed(np: Any, sess: Any, out_names: List[str], feeds: Dict[str, Any], cfg: Dict[str, Any], progress: Progress,
          phase: str = "") -> Tuple[List[float], Dict[str, Any], Dict[str, Any], float]:
    """Warm up, then time `sess` on `feeds` (adaptive, or cfg["runs"] times): the samples, their percentiles, how
    far to trust them (with the machine's load meanwhile), and the seconds the timing took."""
    sess_run = sess.run

    def run() -> Any:
        return sess_run(out_names, feeds)

    def report(done: int, total: Optional[int], what: str, now: Optional[float] = None, force: bool = False) -> None:
        progress(done, total, phase + what, now=now, force=force)

    try:
        warm_up(run, cfg["warmup"], report)
        adaptive = cfg["runs"] is None
        load = MachineLoad()
        t_start = time.perf_counter()
        if adaptive:
            lat, converged = time_adaptive(run, cfg, report)
        else:
            lat, converged = time_fixed(run, cfg["runs"], report), True
        timing_s = time.perf_counter() - t_start
        machine_load = load.finish()
    except RunnerError:
        raise
    except Exception as e:
        raise RunnerError("runtime", "inference failed: {}".format(one_line(e) or type(e).__name__))
    latency, spread = summarise(np, lat, cfg["target_ci"], converged, adaptive)
    spread.update(machine_load)
    if not adaptive:  # the same test adaptive mode stops on, so the flag means one thing in both modes
        spread["converged"] = (spread["p50_ci_rel"] is not None and spread["p50_ci_rel"] <= cfg["target_ci"]
                               and _no_drift(lat, cfg["target_ci"]))
    return lat, latency, spread, timing_s


PAST_PREFIX = "past_key_values."


def generation_feeds(np: Any, sess: Any, prompt_len: int, context_len: int, seed: int,
                     sizes: Optional[Dict[str, int]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Feeds for a decoder exported with its KV cache (compress export --with-past): the prefill (a prompt of
    prompt_len tokens, an empty past) and one decode step (one token after a past of context_len). Token ids are
    random below the vocabulary size and the past random: neither changes the work done, only the shapes do.
    `sizes` ({"kv_heads", "head_size"}) stand where the graph leaves them symbolic (onnxruntime-genai's models
    name the head size kv_cache_dim; their genai_config.json has it)."""
    inputs = {i.name: i for i in sess.get_inputs()}
    past = [i for i in sess.get_inputs() if i.name.startswith(PAST_PREFIX)]
    if not past or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise RunnerError("model", "per-token timing needs a decoder exported with its KV cache (input_ids, "
                                   "attention_mask, past_key_values.*), and this model has inputs {}".format(
                                       ", ".join(inputs)))
    given = sizes or {}
    dims = {}
    for p in past:  # each at its own heads and head size (a pruned decoder's layers differ)
        shape = list(p.shape)
        heads = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else given.get("kv_heads")
        size = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else given.get("head_size")
        if len(shape) != 4 or not heads or not size:
            raise RunnerError("model", "{}: expected [batch, heads, past, head_dim] with fixed heads and head_dim, got {}".format(
                p.name, _shape_text(shape)))
        dims[p.name] = (heads, size)
    logits = sess.get_outputs()[0].shape
    vocab = logits[-1] if logits and isinstance(logits[-1], int) and logits[-1] > 0 else 2
    rng = np.random.default_rng(seed)
    ids_type = ORT_TO_NUMPY.get(inputs["input_ids"].type, "int64")
    mask_type = ORT_TO_NUMPY.get(inputs["attention_mask"].type, "int64")

    def step(new: int, before: int, fill: Callable[[Tuple[int, ...], str], Any]) -> Dict[str, Any]:
        feeds = {"input_ids": rng.integers(0, vocab, size=(1, new)).astype(ids_type),
                 "attention_mask": np.ones((1, before + new), dtype=mask_type)}
        for p in past:
            feeds[p.name] = fill((1, dims[p.name][0], before, dims[p.name][1]), ORT_TO_NUMPY.get(p.type, "float32"))
        return feeds

    prefill = step(prompt_len, 0, lambda shp, dt: np.zeros(shp, dtype=dt))
    decode = step(1, context_len, lambda shp, dt: rng.standard_normal(shp).astype(dt))
    return prefill, decode


def build_feeds(np: Any, sess: Any, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Feeds are built once, before timing, so the loop measures onnxruntime and not numpy."""
    inputs = sess.get_inputs()
    unknown = [k for k in (cfg["inputs"] or {}) if k not in [i.name for i in inputs]]
    if unknown:
        raise RunnerError("config", "inputs: {} not an input of the model; its inputs are {}".format(
            ", ".join(repr(k) for k in unknown), ", ".join(i.name for i in inputs)))
    rng = np.random.default_rng(cfg["seed"])
    shapes = {}
    for inp in inputs:
        if inp.type not in ORT_TO_NUMPY:
            raise RunnerError("model", "input {!r} has type {}, which the runner cannot feed".format(inp.name, inp.type))
        shapes[inp.name] = resolve_shape(inp.name, list(inp.shape), _spec_for(cfg, inp.name))
    feeds = npz_feeds(np, cfg["inputs_npz"], inputs, shapes) if cfg["inputs_npz"] else {}
    for inp in inputs:
        if inp.name not in feeds:
            # the model's declared type wins over a spec's dtype: a feed of any other type is rejected
            feeds[inp.name] = random_feed(np, rng, inp.name, shapes[inp.name], ORT_TO_NUMPY[inp.type], _spec_for(cfg, inp.name))
    return feeds


# -------------------------------------------------------------------------------------------- timing


def median_ci(sorted_vals: List[float]) -> Tuple[float, float]:
    """Distribution-free 95% CI of the median: order statistics at n/2 -/+ 1.96*sqrt(n)/2 (1-based ranks).

    Latencies are skewed and heavy-tailed (preemption, page faults), so a normal-theory interval on the
    mean would be both wrong and dominated by outliers; order statistics need no distributional assumption.
    """
    n = len(sorted_vals)
    half = Z95 * math.sqrt(n) / 2.0
    lo = int(math.floor(n / 2.0 - half))
    hi = int(math.ceil(n / 2.0 + half)) + 1
    lo = min(max(lo, 1), n)
    hi = min(max(hi, 1), n)
    return sorted_vals[lo - 1], sorted_vals[hi - 1]


def ci_rel(sorted_vals: List[float]) -> float:
    lo, hi = median_ci(sorted_vals)
    med = _median(sorted_vals)
    return (hi - lo) / med if med > 0 else float("inf")


def drift_rel(lat: List[float], blocks: int = DRIFT_BLOCKS) -> Optional[float]:
    """Largest relative gap between the median of a time-ordered block of runs and the overall median.

    A tight CI says nothing about a machine whose speed changed mid-run (another job started, the CPU
    throttled): the samples then mix two regimes. Block medians expose that, and adaptive mode runs on.
    """
    n = len(lat)
    if n < blocks * 4:
        return None  # too few runs per block to say anything
    med = _median(sorted(lat))
    if med <= 0:
        return float("inf")
    size = n // blocks
    worst = 0.0
    for b in range(blocks):
        chunk = sorted(lat[b * size:(b + 1) * size] if b < blocks - 1 else lat[b * size:])
        worst = max(worst, abs(_median(chunk) - med) / med)
    return worst


def _no_drift(lat: List[float], target: float) -> bool:
    drift = drift_rel(lat)
    return drift is None or drift <= DRIFT_FACTOR * target


def _median(sorted_vals: List[float]) -> float:
    n = len(sorted_vals)
    mid = n // 2
    return sorted_vals[mid] if n % 2 else 0.5 * (sorted_vals[mid - 1] + sorted_vals[mid])


def warm_up(run: Callable[[], Any], count: int, progress: Progress) -> None:
    for i in range(count):
        run()
        progress(i + 1, count, "warmup", force=(i + 1 == count))


def time_fixed(run: Callable[[], Any], runs: int, progress: Progress) -> List[float]:
    pc = time.perf_counter
    lat = []  # type: List[float]
    append = lat.append
    for i in range(runs):
        t0 = pc()
        run()
        t1 = pc()
        append(t1 - t0)
        progress(i + 1, runs, "timing", now=t1)
    progress(runs, runs, "timing", force=True)
    return lat


def time_adaptive(run: Callable[[], Any], cfg: Dict[str, Any], progress: Progress) -> Tuple[List[float], bool]:
    """Run until the p50 is pinned down, or until max_seconds is spent; return the samples and whether it was.

    Pinned down means: at least min_runs runs over at least min_seconds, a 95% CI of the median no wider
    than target_ci (relative), and time-ordered blocks whose medians agree (no drift). Convergence is
    re-tested at most every CHECK_INTERVAL_S (it sorts all samples), outside the timed intervals.
    """
    pc = time.perf_counter
    min_runs, target, max_runs = cfg["min_runs"], cfg["target_ci"], cfg["max_runs"]
    start = pc()
    earliest = start + float(cfg["min_seconds"])
    deadline = start + float(cfg["max_seconds"])
    next_check = start
    lat = []  # type: List[float]
    append = lat.append
    converged = False
    while True:
        t0 = pc()
        run()
        t1 = pc()
        append(t1 - t0)
        n = len(lat)
        progress(n, None, "timing", now=t1)
        if n >= min_runs and t1 >= earliest and t1 >= next_check:
            next_check = t1 + CHECK_INTERVAL_S
            if ci_rel(sorted(lat)) <= target and _no_drift(lat, target):
                converged = True
                break
        if t1 >= deadline or n >= max_runs:
            break
    progress(len(lat), None, "timing", force=True)
    return lat, converged


def summarise(np: Any, lat_s: List[float], target_ci: float, converged: bool, adaptive: bool) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Percentiles (linear interpolation, so p50 <= p90 <= p99 <= max holds), and how far to trust them."""
    ms = np.asarray(lat_s, dtype=np.float64) * 1000.0
    srt = sorted(ms.tolist())
    p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
    q25, q75 = (float(x) for x in np.percentile(ms, [25, 75]))
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    lo, hi = median_ci(srt)
    latency = {"p50": p50, "p90": p90, "p99": p99, "mean": mean, "std": std, "min": float(srt[0]), "max": float(srt[-1])}
    spread = {
        "iqr_ms": q75 - q25,
        "p50_ci_ms": [float(lo), float(hi)],
        "p50_ci_rel": (hi - lo) / p50 if p50 > 0 else None,
        "cv": std / mean if mean > 0 else None,
        "drift_rel": drift_rel(lat_s),
        "converged": bool(converged),
        "adaptive": adaptive,
        "target_ci": target_ci,
    }
    return latency, spread


# ------------------------------------------------------------------------------------------ hotspots


def hotspots(ort: Any, model: str, cfg: Dict[str, Any], feeds: Dict[str, Any], out_names: List[str], progress: Progress) -> Dict[str, Any]:
    """Per-operator time from onnxruntime's profiler, in a session of its own.

    Profiling is fixed at session creation and slows every run, so the timed session never has it on.
    """
    tmp = tempfile.mkdtemp(prefix="edge-compress-prof-")
    try:
        sess = create_session(ort, model, cfg, profile_prefix=os.path.join(tmp, "ort"))
        count = cfg["hotspot_runs"]
        total = count + 1
        for i in range(total):  # run 0 allocates buffers and is skipped when parsing
            sess.run(out_names, feeds)
            progress(i + 1, total, "hotspots", force=(i + 1 == total))
        trace = sess.end_profiling()
        with open(trace, "r") as f:
            events = json.load(f)
        return parse_trace(events)
    except RunnerError:
        raise
    except Exception as e:
        raise RunnerError("runtime", "profiling pass failed: {}".format(one_line(e) or type(e).__name__))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_trace(events: Any, top: int = 15) -> Dict[str, Any]:
    """Aggregate '<node>_kernel_time' events per op type and per node, skipping the first model_run."""
    if isinstance(events, dict):  # some builds wrap the Chrome trace in {"traceEvents": [...]}
        events = events.get("traceEvents", [])
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e.get("ts", 0))
    skip_before = runs[0]["ts"] + runs[0].get("dur", 0) if len(runs) > 1 else -1
    n_runs = max(len(runs) - 1, 1) if len(runs) > 1 else max(len(runs), 1)
    by_op = {}  # type: Dict[str, List[float]]
    by_node = {}  # type: Dict[str, List[Any]]
    suffix = "_kernel_time"
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(suffix) or e.get("ts", 0) < skip_before:
            continue
        node = name[: -len(suffix)]
        op = (e.get("args") or {}).get("op_name", "?")
        us = float(e.get("dur", 0))
        agg = by_op.setdefault(op, [0.0, set()])  # type: ignore[arg-type]
        agg[0] += us
        agg[1].add(node)
        nagg = by_node.setdefault(node, [op, 0.0])
        nagg[1] += us
    total = sum(v[0] for v in by_op.values()) or 1.0
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "runs": n_runs,
        "total_ms": total / 1000.0 / n_runs,
        "by_op_type": [{"op_type": op, "ms": v[0] / 1000.0 / n_runs, "pct": 100.0 * v[0] / total, "count": len(v[1])} for op, v in ops],
        "top_nodes": [{"name": node or "(unnamed)", "op_type": v[0], "ms": v[1] / 1000.0 / n_runs, "pct": 100.0 * v[1] / total} for node, v in nodes],
    }


# ------------------------------------------------------------------------------------------ platform


def cpu_model() -> Optional[str]:
    """The CPU's name from /proc/cpuinfo: 'model name' on x86, 'Model'/'Hardware' on a Raspberry Pi."""
    try:
        with open("/proc/cpuinfo", "r") as f:
            text = f.read()
    except OSError:
        return platform.processor() or None
    found = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            k, v = k.strip().lower(), v.strip()
            if v and k not in found:
                found[k] = v

    def named(key: str) -> Optional[str]:
        v = found.get(key)
        return v if v and not v.isdigit() else None  # x86 'model' is a number; Pi 'Model' names the board

    cpu = named("model name") or named("cpu model") or named("hardware")
    board = named("model")
    if board and cpu:
        return "{} ({})".format(board, cpu)
    return board or cpu or platform.processor() or None


class MachineLoad(object):
    """How much of the machine other processes (and the hypervisor, as steal time) took while we timed.

    No run count makes a busy machine agree with itself, so the result says how busy it was: CPU time the
    whole machine spent (/proc/stat) minus this process's own, over the CPU time available. Linux only;
    elsewhere null. A hypervisor that neither reports steal nor lets the guest see it stays invisible.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float, float]]:
        try:
            with open("/proc/stat", "r") as f:
                fields = [float(x) for x in f.readline().split()[1:9]]
            hz = float(os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError, AttributeError, IndexError):
            return None
        if len(fields) < 8:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
        own = os.times()
        return ((user + nice + system + irq + softirq) / hz, steal / hz, sum(fields) / hz, own[0] + own[1])

    def finish(self) -> Dict[str, Optional[float]]:
        end = self._sample()
        if self._start is None or end is None:
            return {"other_cpu_frac": None, "steal_frac": None}
        busy, steal, total, own = (b - a for a, b in zip(self._start, end))
        if total <= 0:
            return {"other_cpu_frac": None, "steal_frac": None}
        return {"other_cpu_frac": max(0.0, busy - own) / total, "steal_frac": max(0.0, steal) / total}


def platform_info() -> Dict[str, Any]:
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "python": platform.python_version(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def peak_rss_mb() -> Optional[float]:
    """High-water RSS of this process: VmHWM on Linux, else ru_maxrss (KiB on Linux, bytes on macOS).

    Not ru_maxrss on Linux: it survives exec, so a runner started by a big process reports that process's
    size (started by `compress run`, MiniLM's fp32 and INT8 runners both read 1859 MB, the pipeline's own
    high-water mark); VmHWM belongs to the runner's own memory map.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return rss / scale


def model_size_bytes(path: str) -> int:
    """The .onnx file plus the external-data files its initializers point at."""
    size = os.path.getsize(path)
    if not _may_have_external_data(path):
        return size
    folder = os.path.dirname(os.path.abspath(path))
    locations = _external_locations(path)
    if locations is None:  # onnx is not installed here: guess the exporter's usual names
        base = os.path.basename(path)
        stem = os.path.splitext(base)[0]
        locations = [n for n in (stem + ".data", base + ".data") if os.path.isfile(os.path.join(folder, n))]
    for loc in sorted(set(locations)):
        full = os.path.join(folder, loc)
        if os.path.isfile(full):
            size += os.path.getsize(full)
    return size


# An external tensor names its file in an external_data entry {key: "location", value: ...}: field 1 of a
# StringStringEntryProto, so the file holds these bytes. Where they are absent no tensor is external, and the
# runner skips importing onnx and parsing the model (0.44 s + 0.2 s per profile of MiniLM's 90 MB export).
_LOCATION_KEY = b"\x0a\x08location"


def _may_have_external_data(path: str) -> bool:
    import mmap

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(_LOCATION_KEY) >= 0
    except (OSError, ValueError):
        return True


def _external_locations(path: str) -> Optional[List[str]]:
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:
        return None
    locs = []
    for t in all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    locs.append(kv.value)
    return locs


def all_tensors(graph: Any) -> Any:
    """Initializers and tensor attributes, subgraphs included (If/Loop/Scan bodies hold weights too)."""
    for t in graph.initializer:
        yield t
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for t in attr.tensors:
                yield t
            if attr.HasField("g"):
                for t in all_tensors(attr.g):
                    yield t
            for g in attr.graphs:
                for t in all_tensors(g):
                    yield t


# ---------------------------------------------------------------------------------------------- main


def profile(model: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    if not os.path.isfile(model):
        raise RunnerError("model", "model file {} not found".format(model))
    try:
        import numpy as np
    except ImportError as e:
        raise RunnerError("device", "numpy is not installed for {} ({})".format(sys.executable, one_line(e)))
    ort = import_ort()
    requested = [name for name, _ in cfg["providers"]]
    missing = check_providers(ort, cfg)
    progress = Progress()

    t0 = time.perf_counter()
    sess = create_session(ort, model, cfg)
    load_ms = (time.perf_counter() - t0) * 1000.0
    out_names = [o.name for o in sess.get_outputs()]
    g = cfg["generation"]
    generation = None
    if g:  # a decoder with its KV cache: the prefill, then one decode step (the profile's figures), each timed
        prefill_feeds, feeds = generation_feeds(np, sess, g["prompt_len"], g["context_len"], cfg["seed"], g.get("sizes"))
        lat_p, latency_p, spread_p, prefill_s = timed(np, sess, out_names, prefill_feeds, cfg, progress, "prefill ")
    else:
        feeds = build_feeds(np, sess, cfg)
    lat, latency, spread, timing_s = timed(np, sess, out_names, feeds, cfg, progress, "decode " if g else "")
    rss = peak_rss_mb()  # before the profiling session exists, so the figure is the timed session's
    if g:
        timing_s += prefill_s
        generation = {
            "prompt_len": g["prompt_len"], "context_len": g["context_len"],
            "prefill": {"runs": len(lat_p), "latency_ms": latency_p, "spread": spread_p},
            "decode": {"runs": len(lat), "latency_ms": latency, "spread": spread},
            "tokens_per_s": 1000.0 / latency["p50"] if latency["p50"] > 0 else None,
            "prefill_tokens_per_s": g["prompt_len"] * 1000.0 / latency_p["p50"] if latency_p["p50"] > 0 else None,
        }
    first = next(iter(feeds.values())) if feeds else None
    batch = int(first.shape[0]) if first is not None and first.ndim > 0 else 1
    result = {
        "schema": SCHEMA,
        "model": model,
        "model_size_bytes": model_size_bytes(model),
        "providers": list(sess.get_providers()),
        "requested_providers": requested,
        "missing_providers": missing,
        "threads": cfg["threads"],
        "graph_optimization_level": cfg["graph_optimization_level"],
        "session_config": dict(cfg["session_config"]),
        "runs": len(lat),
        "warmup": cfg["warmup"],
        "timing_s": timing_s,
        "latency_ms": latency,
        "spread": spread,
        "throughput_per_s": batch / (latency["mean"] / 1000.0) if latency["mean"] > 0 else None,
        "load_ms": load_ms,
        "peak_rss_mb": rss,
        "inputs": [{"name": i.name, "shape": list(feeds[i.name].shape), "dtype": str(feeds[i.name].dtype)} for i in sess.get_inputs()],
        "outputs": out_names,
        "onnxruntime_version": ort.__version__,
        "available_providers": list(ort.get_available_providers()),
        "platform": platform_info(),
        "hotspots": None,
    }
    if generation is not None:
        result["generation"] = generation
    if cfg["hotspots"]:
        del sess  # one session at a time: the device may not hold two copies of the weights
        result["hotspots"] = hotspots(ort, model, cfg, feeds, out_names, progress)
    return result


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise RunnerError("config", "runner.py: " + message)


def parse_args(argv: List[str]) -> argparse.Namespace:
    ap = _ArgParser(prog="runner.py", description="Time an ONNX model with onnxruntime; print one JSON document.")
    ap.add_argument("model", help="path to the .onnx file")
    ap.add_argument("--config", default=None, help="JSON config file, or - for stdin")
    ap.add_argument("--debug", action="store_true", help="print tracebacks on stderr")
    return ap.parse_args(argv)


def _stdout_for_result() -> Any:
    """Keep fd 1 for the result alone: native code that prints to stdout is moved to stderr."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        return os.fdopen(saved, "w")
    except (OSError, AttributeError, ValueError):
        return sys.stdout


def main(argv: Optional[List[str]] = None, guard_stdout: bool = False) -> int:
    """Run and print one JSON document; guard_stdout (script use only) moves fd 1 so nothing else lands there."""
    argv = sys.argv[1:] if argv is None else argv
    out = _stdout_for_result() if guard_stdout else sys.stdout
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        cfg = load_config(args.config)
        doc = profile(args.model, cfg)
        rc = 0
    except RunnerError as e:
        if debug:
            import traceback
            traceback.print_exc()
        doc, rc = {"schema": SCHEMA, "error": {"kind": e.kind, "message": one_line(e.message)}}, 1
    except KeyboardInterrupt:
        doc, rc = {"schema": SCHEMA, "error": {"kind": "runtime", "message": "interrupted"}}, 130
    except Exception as e:  # a bug: still one JSON document, so the host can say something useful
        if debug:
            import traceback
            traceback.print_exc()
        doc, rc = {"schema": SCHEMA, "error": {"kind": "runtime", "message": "{}: {}".format(type(e).__name__, one_line(e))}}, 1
    out.write(json.dumps(_finite(doc), allow_nan=False, default=_json_default) + "\n")
    out.flush()
    return rc


def _finite(o: Any) -> Any:
    """NaN/inf are not JSON; a statistic that cannot be computed is null."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main(guard_stdout=True))
