"""The profile document (`compress profile --json`, and each variant's figures in a run report), as a typed
model whose JSON Schema ships with the package (runtime/profile.schema.json) for CI jobs that parse it.

runner.py writes the document on the device with the standard library only; the host checks it against this
model before handing it on, so a field the runner renamed fails here, in the tests, not in a user's script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from compress.core import OpenResult, Result

PROFILE_SCHEMA = "edge-compress/profile/1"
SCHEMA_FILE = Path(__file__).with_name("profile.schema.json")


class Latency(Result):
    """Milliseconds per run of the timed runs (p50 is what every comparison uses)."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: Optional[float] = None
    max: Optional[float] = None


class Spread(OpenResult):
    """How much the timing can be trusted: the p50's 95% confidence interval, drift between time-ordered
    blocks, and how busy the machine was."""

    iqr_ms: Optional[float] = None
    p50_ci_ms: Optional[list[float]] = None
    p50_ci_rel: Optional[float] = None
    cv: Optional[float] = None
    drift_rel: Optional[float] = None
    converged: Optional[bool] = None
    adaptive: Optional[bool] = None
    target_ci: Optional[float] = None
    other_cpu_frac: Optional[float] = None  # other processes' share of the CPU while timing
    steal_frac: Optional[float] = None  # the hypervisor's


class TensorSpec(OpenResult):
    name: str
    shape: list[Any]
    dtype: str


class DeviceRef(Result):
    name: str
    arch: str
    source: Optional[str] = None


class Machine(OpenResult):
    """The machine that was timed (describe_host's facts: arch, CPU model, ISA flags, cores, versions)."""

    arch: Optional[str] = None
    cpu: Optional[str] = None


class PhaseTiming(Result):
    """One timed phase of generation: its runs, percentiles and how far to trust them."""

    runs: int
    latency_ms: Latency
    spread: Spread


class GenerationTiming(Result):
    """A decoder with its KV cache (compress export --with-past) timed as it generates: the prefill of a prompt of
    `prompt_len` tokens, and one decode step (one new token) after `context_len` tokens of past. The profile's
    own latency_ms/spread are the decode step's: the figure generation repeats for every token."""

    prompt_len: int
    context_len: int
    prefill: PhaseTiming
    decode: PhaseTiming
    tokens_per_s: Optional[float] = None  # decode: 1000 / its p50
    prefill_tokens_per_s: Optional[float] = None  # prompt tokens per second of prefill


class ProfileResult(Result):
    """One model profiled on one device with its profile's execution providers and threads."""

    schema_: Literal["edge-compress/profile/1"] = Field(PROFILE_SCHEMA, alias="schema")
    model: str
    model_size_bytes: int
    providers: list[str]
    requested_providers: list[Any]
    missing_providers: list[str]
    threads: int
    graph_optimization_level: str
    session_config: dict[str, str]
    runs: int
    warmup: int
    timing_s: float
    latency_ms: Latency
    spread: Spread
    throughput_per_s: Optional[float] = None
    load_ms: float
    peak_rss_mb: Optional[float] = None
    inputs: list[TensorSpec]
    outputs: list[str]
    onnxruntime_version: str
    available_providers: list[str]
    platform: dict[str, Any]
    hotspots: Optional[Any] = None
    generation: Optional[GenerationTiming] = None  # decoders with their KV cache: prefill and per-token decode
    device: DeviceRef
    fallback: bool
    measured_on: Literal["local", "remote"]
    host: Optional[Machine] = None
    remote: Optional[dict[str, Any]] = None
    client: Optional[Machine] = None


def check_profile(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` unchanged when it matches ProfileResult; a pydantic ValidationError otherwise (a bug of ours)."""
    ProfileResult.from_json(doc)
    return doc
