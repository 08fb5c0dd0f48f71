"""Host side of profiling: check the model, settle the execution providers, run `runner.py`, read its JSON.

The runner always runs in a subprocess, even on the host, so that peak RSS is the runner's own (not this
tool's torch-laden process) and so that the code that times a model here is the code copied to devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from compress.core import DeviceError, InputError, UsageError, first_line, warn
from devices import DeviceProfile, RemoteSpec, describe_host, normalize_arch
from devices import providers as ep_registry
from export import PAST_PREFIX, get_metadata
from runtime.remote import Target, resolve_spec, run_runner_remote
from runtime.result import ProfileResult
from runtime.runner import generation_feeds
from runtime.stream import ProgressFn, parse_output, stream_process

RUNNER = Path(__file__).with_name("runner.py")

# Defaults chosen so that two profiles of one model agree on p50 within a few percent on a noisy machine:
# at least 30 timed runs over at least 1 s, then on until the median's 95% CI is within 2% (relative width)
# and the medians of four time-ordered blocks agree within 4% (no drift), for at most 20 s.
DEFAULT_WARMUP = 10
DEFAULT_MIN_RUNS = 30
DEFAULT_MIN_SECONDS = 1.0
DEFAULT_TARGET_CI = 0.02
DEFAULT_MAX_SECONDS = 20.0


def profile_model(
    onnx_path: str | Path,
    profile: DeviceProfile,
    *,
    runs: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    hotspots: bool = False,
    max_seconds: float | None = None,
    inputs: dict[str, dict[str, Any]] | None = None,
    on_progress: ProgressFn | None = None,
    remote: RemoteSpec | None = None,
    remote_timeout: float | None = None,
    prompt_len: int | None = None,
    context_len: int | None = None,
) -> ProfileResult:
    """Time ONNX_PATH as PROFILE would run it and return the runner's result plus device and host facts.

    runs=None is adaptive (see DEFAULT_*). `inputs` overrides, per input name, the shape/value-range specs
    read from the model's edge_compress metadata, key by key (a given shape keeps the metadata's value range).

    `remote` (default: the profile's `remote:`) runs the same runner on that device over SSH
    (runtime.remote). The device's onnxruntime then settles the execution providers, not this machine's:
    the profile's EPs are sent as they are and the runner applies cpu_fallback there. The result's "host"
    then describes the device, "client" this machine, and "remote" how the device was reached; "measured_on"
    says which ("local" or "remote"). remote_timeout bounds the whole remote run (default: see _remote_timeout).

    A decoder exported with its KV cache (past_key_values.* inputs) is timed as it generates: the prefill of
    `prompt_len` tokens and one decode step after `context_len` tokens of past (defaults DEFAULT_PROMPT_LEN and
    DEFAULT_CONTEXT_LEN, within the model's positions); the result's `generation` has both.
    """
    path = Path(onnx_path).expanduser()
    proto = _checked_proto(path)
    meta_inputs = metadata_input_specs(proto)
    if remote is None and profile.remote is not None:  # relative key paths in a YAML are relative to the YAML

        remote = resolve_spec(profile.remote, base_dir=profile.source.parent if profile.source else None)
    if remote is None:
        chosen, missing = resolve_providers(profile)
    else:  # only the device knows what its onnxruntime has
        chosen, missing = [[ep.name, dict(ep.options)] for ep in profile.execution_providers], []
    user = inputs or {}
    specs = {name: {**meta_inputs.get(name, {}), **user.get(name, {})} for name in {**meta_inputs, **user}}
    generation = generation_lengths(path.name, proto, prompt_len, context_len, path.parent)
    if generation is None:
        check_shapes_given(path.name, proto, specs)
    config = {
        "providers": chosen,
        "threads": threads if threads is not None else profile.threads,
        "graph_optimization_level": profile.graph_optimization_level,
        "session_config": dict(profile.session_config),
        "warmup": DEFAULT_WARMUP if warmup is None else warmup,
        "runs": runs,
        "min_runs": DEFAULT_MIN_RUNS,
        "min_seconds": DEFAULT_MIN_SECONDS,
        "target_ci": DEFAULT_TARGET_CI,
        "max_seconds": DEFAULT_MAX_SECONDS if max_seconds is None else max_seconds,
        "seed": 0,
        "hotspots": hotspots,
        "inputs": specs or None,
        "generation": generation,
    }
    if remote is None:
        _warn_oversubscribed(config["threads"])
        result = run_runner(path, config, on_progress)
    else:
        result = _run_remote(path, profile, {**config, "cpu_fallback": profile.cpu_fallback}, remote, on_progress,
                             remote_timeout if remote_timeout is not None else _remote_timeout(config))
        missing = list(result.get("missing_providers") or [])
    dropped = _silently_dropped(profile, result, missing)
    if dropped and not profile.cpu_fallback:
        # onnxruntime listed the EP but could not start it (e.g. CUDA libraries absent) and fell back itself
        raise DeviceError(f"device {profile.name!r} needs {', '.join(dropped)}: {'the device' if remote else 'this'}'s "
                          f"onnxruntime has it but could not start it (missing driver or libraries?) and ran on "
                          f"{', '.join(result.get('providers') or ['?'])}")
    missing = missing + dropped
    result["device"] = {"name": profile.name, "arch": profile.arch, "source": str(profile.source) if profile.source else None}
    result["fallback"] = bool(missing)
    result["missing_providers"] = missing
    if remote is None:
        result["measured_on"] = "local"
        result["host"] = describe_host()
        result["remote"] = None
    else:
        result["measured_on"] = "remote"
        result["host"] = _describe_device(result)
        result["client"] = describe_host()
        result["model"] = str(path)  # the runner saw its temporary copy, which is gone
    return ProfileResult.from_json(result)


REMOTE_GRACE_S = 600.0  # copying, loading and warm-up on a slow board, on top of the timing budget
REMOTE_FIXED_RUNS_TIMEOUT_S = 3600.0


def _remote_timeout(config: dict[str, Any]) -> float:
    """Adaptive timing stops itself after max_seconds (twice with hotspots); fixed --runs has no time bound."""
    if config["runs"] is not None:
        return REMOTE_FIXED_RUNS_TIMEOUT_S
    return REMOTE_GRACE_S + float(config["max_seconds"]) * (2 if config["hotspots"] else 1)


def _run_remote(path: Path, profile: DeviceProfile, config: dict[str, Any], remote: RemoteSpec,
                on_progress: ProgressFn | None, timeout: float) -> dict[str, Any]:
    target = Target(remote.user, remote.host, remote.port)
    try:
        result = run_runner_remote(path, config, remote, on_progress, timeout=timeout)
    except DeviceError as e:
        if "lacks" in str(e) and not profile.cpu_fallback:  # the runner refused: the device's onnxruntime lacks an EP
            raise DeviceError(f"device {profile.name!r} {e}. Install the EP's onnxruntime package on the device, or set "
                              "cpu_fallback: true in the profile to profile on CPU anyway") from None
        raise
    plat = result.get("platform") or {}
    result["remote"] = {
        "target": str(target),
        "python": remote.python,
        "python_version": plat.get("python"),
        "onnxruntime": result.get("onnxruntime_version"),
        "providers_available": list(result.get("available_providers") or []),
        "cpu": plat.get("processor"),
        "machine": plat.get("machine"),
        "os": f"{plat.get('system') or ''} {plat.get('release') or ''}".strip() or None,
        "cpu_count": plat.get("cpu_count"),
    }
    missing = list(result.get("missing_providers") or [])
    if missing:
        warn(f"device {profile.name!r} asks for {' and '.join(missing)}, which the onnxruntime "
             f"{result.get('onnxruntime_version')} on {target} lacks (install {_packages(missing)} there); profiled on "
             f"{', '.join(result.get('providers') or ['?'])} instead — these figures are not the device's")
    cores = plat.get("cpu_count")
    if isinstance(cores, int) and cores and result.get("threads", 0) > cores:
        warn(f"{result['threads']} threads on {target}, which has {cores} cores: the figures are slow and noisy; "
             f"pass --threads {cores} (or fix the profile's threads)")
    return result


def _describe_device(result: dict[str, Any]) -> dict[str, Any]:
    """The remote device in describe_host()'s shape (ISA flags are not reported by the runner: see the profile)."""
    plat = result.get("platform") or {}
    machine = plat.get("machine")
    return {
        "arch": normalize_arch(machine) if machine else None,
        "cpu": plat.get("processor"),
        "isa": None,
        "cores": plat.get("cpu_count"),
        "os": f"{plat.get('system') or ''} {plat.get('release') or ''}".strip() or None,
        "python": plat.get("python"),
        "onnxruntime": result.get("onnxruntime_version"),
        "onnxruntime_providers": list(result.get("available_providers") or []),
        "remote": (result.get("remote") or {}).get("target"),
    }


# --------------------------------------------------------------------------------------------- model


def check_model(path: Path) -> dict[str, dict[str, Any]]:
    """Refuse a missing or malformed file before spending a subprocess on it; return metadata input specs."""
    return metadata_input_specs(_checked_proto(path))


def _checked_proto(path: Path) -> Any:
    """The model's graph (weights in side files not read), once the file has passed onnx's checker."""
    import onnx

    if not path.exists():
        raise InputError(f"model {path} not found")
    if not path.is_file():
        raise InputError(f"model {path} is not a file")
    try:
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            # onnxruntime registers some of its own ops in the ONNX domain (onnxruntime-genai's models use
            # SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization there), which onnx's checker
            # knows nothing of: the runner's session is the judge of those
            if "No Op registered for" not in str(e):
                raise
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, ValidationError, OSError: all mean "not a usable model"
        raise InputError(f"{path} is not a valid ONNX model: {first_line(e)}") from e
    return proto


def metadata_input_specs(proto: Any) -> dict[str, dict[str, Any]]:
    """Input specs the exporter stored (metadata_props 'edge_compress'); optional, so bad JSON is ignored."""
    meta = get_metadata(proto)
    if meta is not None:
        listed = meta.get("inputs") if isinstance(meta, dict) else None
        specs = {}
        for spec in listed if isinstance(listed, list) else []:
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                specs[spec["name"]] = {k: spec[k] for k in ("shape", "dtype", "low", "high") if spec.get(k) is not None}
        return _fit_shapes(proto, specs)
    return {}


def graph_input_dims(proto: Any) -> dict[str, list[Any]]:
    """Each fed input's dims as the graph declares them: an int, the symbolic name (str), or None (unnamed)."""
    dims = {}
    weights = {t.name for t in proto.graph.initializer}  # old IRs list weights as inputs; they are not fed
    for vi in proto.graph.input:
        if vi.name not in weights and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims[vi.name] = _declared_dims(vi)
    return dims


def _declared_dims(vi: Any) -> list[Any]:
    """A graph value's dims as declared: an int, the symbolic name (str), or None (unnamed)."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def unsized_axis(dims: list[Any], given: Any = None) -> int | None:
    """The first axis after the batch that neither the graph (a positive int) nor `given` (a shape the caller or
    the file's metadata supplies; None: none) sizes, else None. The profiler and synthetic calibration ask it."""
    if given is not None:
        return None
    return next((i for i, d in enumerate(dims) if i > 0 and not (isinstance(d, int) and d > 0)), None)


DEFAULT_PROMPT_LEN = 32
DEFAULT_CONTEXT_LEN = 128


def generation_lengths(shown: str, proto: Any, prompt_len: int | None, context_len: int | None,
                       folder: Path | None = None) -> dict[str, Any] | None:
    """The prompt and context lengths to time a decoder with its KV cache at; None for any other model (where
    asking for them is a UsageError). The defaults shrink to fit the positions the model has (its metadata's
    max_positions, or an onnxruntime-genai folder's context_length); asking for more than it has is an error,
    not a silent extrapolation. `folder`: the model's, for onnxruntime-genai's genai_config.json ("sizes": the
    cache's heads and head size its graph leaves symbolic, which the runner is given)."""
    decoder = any(i.name.startswith(PAST_PREFIX) for i in proto.graph.input)
    if not decoder:
        if prompt_len is not None or context_len is not None:
            raise UsageError(f"{shown}: --prompt-len/--context-len time a decoder exported with its KV cache "
                             "(compress export --with-past), and this model has no past_key_values inputs")
        return None
    meta = get_metadata(proto) or {}
    limit = (meta.get("generation") or {}).get("max_positions") if isinstance(meta, dict) else None
    sizes = genai_sizes(folder) if folder is not None else {}
    genai_limit = sizes.pop("max_positions", None)
    limit = limit if isinstance(limit, int) and limit > 1 else genai_limit
    for flag, n in (("--prompt-len", prompt_len), ("--context-len", context_len)):
        if n is not None and limit is not None and n + (flag == "--context-len") > limit:
            raise UsageError(f"{shown}: {flag} {n} is past the model's {limit} positions")
    prompt = prompt_len or (min(DEFAULT_PROMPT_LEN, limit) if limit else DEFAULT_PROMPT_LEN)
    context = context_len or (min(DEFAULT_CONTEXT_LEN, limit - 1) if limit else DEFAULT_CONTEXT_LEN)
    return {"prompt_len": prompt, "context_len": context, **({"sizes": sizes} if sizes else {})}


GENAI_CONFIG = "genai_config.json"
GENAI_CONFIG_MAX_BYTES = 1 << 20


def genai_sizes(folder: Path) -> dict[str, int]:
    """kv_heads, head_size and max_positions of an onnxruntime-genai model folder (its genai_config.json: the
    builder leaves the graph's head size symbolic, `kv_cache_dim`); {} without one. A config that cannot be read
    is an error: it is the model's own description."""
    cfg = folder / GENAI_CONFIG
    if not cfg.is_file():
        return {}
    try:
        if cfg.stat().st_size > GENAI_CONFIG_MAX_BYTES:
            raise ValueError(f"larger than {GENAI_CONFIG_MAX_BYTES} bytes")
        model = json.loads(cfg.read_text())["model"]
        dec = model["decoder"]
        sizes = {"kv_heads": dec.get("num_key_value_heads") or dec["num_attention_heads"], "head_size": dec["head_size"],
                 "max_positions": model.get("context_length")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{cfg}: not an onnxruntime-genai config this can read ({first_line(e)})") from e
    return {k: v for k, v in sizes.items() if isinstance(v, int) and v > 0}


def decode_step_feeds(onnx_path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The decode step a decoder with its KV cache is compared on (one token after the default context, within
    its positions), built as the runner builds it on the device, and the lengths used. Variants whose caches differ
    (a pruned one keeps fewer heads) are fed at their own sizes by interleaved_latency."""
    path = Path(onnx_path)
    proto = _checked_proto(path)
    lengths = generation_lengths(path.name, proto, None, None, path.parent)
    if lengths is None:
        raise UsageError(f"{path.name}: not a decoder exported with its KV cache (no past_key_values inputs)")
    _, decode = generation_feeds(np, _GraphArgs(proto), lengths["prompt_len"], lengths["context_len"], seed=0,
                                 sizes=lengths.get("sizes"))
    return decode, lengths


class _GraphArgs:
    """A graph's inputs and outputs as an onnxruntime session lists them (name, shape, type), read from the
    graph itself: the decode step's feeds need only those, not a session holding every weight."""

    def __init__(self, proto: Any) -> None:
        from onnx import helper as onnx_helper

        def arg(vi: Any) -> Any:
            kind = onnx_helper.tensor_dtype_to_string(vi.type.tensor_type.elem_type).rpartition(".")[2].lower()
            return SimpleNamespace(name=vi.name, shape=_declared_dims(vi), type=f"tensor({kind})")

        weights = {t.name for t in proto.graph.initializer}
        self.inputs = [arg(vi) for vi in proto.graph.input if vi.name not in weights]
        self.outputs = [arg(vi) for vi in proto.graph.output]

    def get_inputs(self) -> list[Any]:
        return self.inputs

    def get_outputs(self) -> list[Any]:
        return self.outputs


def check_shapes_given(shown: str, proto: Any, specs: dict[str, dict[str, Any]]) -> None:
    """A symbolic dimension other than the first (the batch, timed at 1) needs a shape from the file's metadata
    or the caller: timing a BERT exported elsewhere at sequence length 1 measures nothing anyone runs, and it
    used to happen silently."""
    for name, dims in graph_input_dims(proto).items():
        i = unsized_axis(dims, specs.get(name, {}).get("shape"))
        if i is not None:
            shown_dims = "[" + ", ".join(str(x) if isinstance(x, int) and x > 0 else (x or "?") for x in dims) + "]"
            example = ",".join("1" if j == 0 else (str(x) if isinstance(x, int) and x > 0 else "N") for j, x in enumerate(dims))
            raise UsageError(f"{shown}: input {name!r} {shown_dims} has a symbolic dimension {dims[i] or '?'!s} (axis "
                             f"{i}) and no shape to time it at: give --input-shape {name}={example} (N: the size you run)")


def _fit_shapes(proto: Any, specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Drop metadata shapes the graph contradicts (a later edit changed an input): the graph is the truth.

    Only metadata is treated this leniently; shapes the caller passes are checked strictly by the runner.
    """
    graph_dims = {n: [d if isinstance(d, int) and d > 0 else None for d in dims]
                  for n, dims in graph_input_dims(proto).items()}
    out = {}
    for name, spec in specs.items():
        if name not in graph_dims:
            continue  # an input the graph no longer has (or an initializer): the runner would refuse it
        shape, dims = spec.get("shape"), graph_dims[name]
        if shape is not None and not (
            isinstance(shape, list) and len(shape) == len(dims)
            and all(isinstance(s, int) and (d is None or s == d) for s, d in zip(shape, dims))
        ):
            spec = {k: v for k, v in spec.items() if k != "shape"}
        out[name] = spec
    return out


# ----------------------------------------------------------------------------------------- providers


def resolve_providers(profile: DeviceProfile) -> tuple[list[list[Any]], list[str]]:
    """The profile's EPs that this onnxruntime has, plus CPU when falling back; and the ones it lacks.

    A missing EP is an error unless the profile allows CPU fallback, because figures from another EP
    describe another device.
    """
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    missing = [ep.name for ep in profile.execution_providers if ep.name not in available]
    if missing and not profile.cpu_fallback:
        raise DeviceError(_missing_message(profile, missing, available))
    chosen = [[ep.name, dict(ep.options)] for ep in profile.execution_providers if ep.name in available]
    if missing:
        if "CPUExecutionProvider" not in [name for name, _ in chosen]:
            chosen.append(["CPUExecutionProvider", {}])
        warn(_fallback_message(profile, missing, [name for name, _ in chosen]))
    return chosen, missing


def _silently_dropped(profile: DeviceProfile, result: dict[str, Any], already: list[str]) -> list[str]:
    """EPs the session was asked for but did not use: onnxruntime drops one that fails to initialise."""
    used = set(result.get("providers") or [])
    dropped = [ep.name for ep in profile.execution_providers if ep.name not in used and ep.name not in already]
    if dropped and profile.cpu_fallback:
        warn(f"device {profile.name!r}: onnxruntime could not start {', '.join(dropped)} and ran on "
             f"{', '.join(result.get('providers') or ['?'])} instead — these figures are not the device's")
    return dropped


def _package(name: str) -> str:
    try:
        return ep_registry.resolve(name).package
    except KeyError:
        return "an onnxruntime build that has it"


def _missing_message(profile: DeviceProfile, missing: list[str], available: list[str]) -> str:
    import onnxruntime as ort

    needs = "; ".join(f"{m} (install {_package(m)})" for m in missing)
    return (f"device {profile.name!r} needs {needs}, which this onnxruntime {ort.__version__} lacks; "
            f"available: {', '.join(available)}. Set cpu_fallback: true in the profile to profile on CPU anyway")


def _packages(missing: list[str]) -> str:
    """Distinct packages, dropping one another names more precisely ('onnxruntime-gpu' vs '... (with TensorRT)')."""
    pkgs = list(dict.fromkeys(_package(m) for m in missing))
    return " or ".join(p for p in pkgs if not any(q != p and q.startswith(p) for q in pkgs))


def _fallback_message(profile: DeviceProfile, missing: list[str], used: list[str]) -> str:
    asks = " and ".join(missing)
    install = f"install {_packages(missing)}"
    return (f"device {profile.name!r} asks for {asks}, which this onnxruntime lacks ({install}); profiling on "
            f"{', '.join(used)} instead — these figures are not the device's")


# ---------------------------------------------------------------------------------------- subprocess


def run_runner(model: Path, config: dict[str, Any], on_progress: ProgressFn | None = None,
               python: str | None = None) -> dict[str, Any]:
    """Run runner.py on MODEL with CONFIG on stdin; stream progress; map an error document to EdgeError."""
    cmd = [python or sys.executable, str(RUNNER), str(model), "--config", "-"]
    run = stream_process(cmd, config, on_progress, what="the runner")
    return parse_output(run.stdout, run.rc, run.last_line)


# ---------------------------------------------------------------------------------------------- misc


def _warn_oversubscribed(threads: int) -> None:
    """More intra-op threads than cores makes every run wait on preempted workers: noise, not the device."""
    import os

    cores = os.cpu_count() or 0
    if cores and threads > cores:
        warn(f"{threads} threads on a machine with {cores} cores: runs will queue for CPUs and the figures will "
             f"be slow and noisy; pass --threads {cores} or profile on the device itself")
