"""`compress.profile`: one ONNX model timed as a device profile runs it, here or on the device over SSH."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from compress.core import UsageError, warn
from compress.models import onnx_model_inputs, parse_input_shape, shape_args
from devices import load_profile
from runtime import Target, profile_model, resolve_spec


def profile(model: Union[str, Path], device: str = "host", *, input_shape: Union[str, Sequence[str]] = (),
            runs: Optional[int] = None, warmup: Optional[int] = None, threads: Optional[int] = None,
            max_seconds: Optional[float] = None, hotspots: bool = False, remote: Optional[str] = None,
            identity: Optional[str] = None, known_hosts: Optional[str] = None, remote_python: Optional[str] = None,
            prompt_len: Optional[int] = None, context_len: Optional[int] = None, on_progress: Any = None) -> Any:
    """Time MODEL (.onnx) with onnxruntime as the device profile DEVICE (a bundled name or a YAML file)
    configures it; the runtime.ProfileResult (p50/p90/p99 in `latency_ms`, `spread`, `peak_rss_mb`, ...).

    Keyword arguments are `compress profile`'s options: `input_shape` ("input_ids=1,128", one or a list),
    `runs` (None: adaptive, until the p50's 95% CI is within 2%), `remote` (USER@HOST[:PORT]: time it on that
    machine over SSH; host keys verified against `known_hosts`). A decoder exported with its KV cache
    (`compress export --with-past`) is timed as it generates: the prefill of `prompt_len` tokens and one decode
    step after `context_len` tokens of past (`generation`: p50/p90 of each, tokens per second). `on_progress(done,
    total, phase)` hears the runner's progress; None: nothing is reported.

        >>> import compress
        >>> r = compress.profile("model.onnx", device="host", runs=50)
        >>> r.latency_ms.p50, r.peak_rss_mb
    """
    shapes = shape_args(input_shape)
    dev = load_profile(device)
    spec = resolve_spec(dev.remote, target=remote, identity=identity, known_hosts=known_hosts, python=remote_python,
                        base_dir=dev.source.parent if dev.source else None)
    if spec is not None and dev.detect:
        warn(f"remote {Target(spec.user, spec.host, spec.port)} with the {dev.name!r} profile: its ISA, cores and "
             "threads were detected on THIS machine, not on the device; `compress devices probe --remote ...` writes "
             "a profile for the device itself")
    return profile_model(model, dev, runs=runs, warmup=warmup, threads=threads, hotspots=hotspots,
                         max_seconds=max_seconds, on_progress=on_progress, remote=spec,
                         inputs=input_specs(str(model), shapes), prompt_len=prompt_len, context_len=context_len)


def input_specs(model: str, input_shapes: Sequence[str]) -> Optional[dict[str, dict[str, Any]]]:
    """--input-shape as the profiler's per-input specs; an unnamed one names the model's only input."""
    if not input_shapes:
        return None
    names = list(onnx_model_inputs(model).names)
    specs: dict[str, dict[str, Any]] = {}
    for arg in map(parse_input_shape, input_shapes):
        name = arg.name
        if name is None:
            if len(names) != 1:
                raise UsageError(f"--input-shape without a name: {model} has inputs {', '.join(names)}; write NAME=SHAPE")
            name = names[0]
        if name not in names:
            raise UsageError(f"--input-shape names {name!r}, which is not an input of {model}; its inputs are {', '.join(names)}")
        specs[name] = {"shape": list(arg.shape), **({"dtype": arg.dtype} if arg.dtype else {})}
    return specs
