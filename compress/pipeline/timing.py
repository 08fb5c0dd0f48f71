"""Every variant of a run timed on the device: each profiled there (p50, spread, memory), and its speedup over
fp32 measured the way the device allows (an interleaved A/B on this machine; ratios of p50s over SSH).

Files in, typed figures out (Timings), so that `compress search` can run it where the device is (a Ray task
holding the device's resource) and ship the result back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from compress.core import Result
from compress.report import VariantProfile, VariantTiming
from devices import DeviceProfile
from runtime import Latency, device_latency, profile_model


class Timings(Result):
    """What time_variants measured: per variant, and how the speedup was measured; where the device was remote,
    the device's own description (host) and its SSH target (remote); on a Ray cluster, the node that timed it."""

    variants: dict[str, VariantTiming]
    speedup_measure: str
    host: Optional[dict[str, Any]] = None
    remote: Optional[dict[str, Any]] = None
    profiled_on: Optional[dict[str, Any]] = None


def time_variants(paths: dict[str, Path], profile: DeviceProfile, feeds: dict[str, Any], runs: Optional[int] = None,
                  max_seconds: Optional[float] = None, ab_rounds: int = 30) -> Timings:
    """Profile each model on the device and its speedup over paths["fp32"]: files in, typed figures out, so that
    `compress search` can run it where the device is (a Ray task holding the device's resource), one at a time.

    Locally the speedup is the interleaved A/B's median wall-clock ratio, warm (both sides see the same machine); for
    a remote device, the ratio of p50s measured there in turn."""
    out: dict[str, dict[str, Any]] = {}
    measured = None
    for name, path in paths.items():
        prof = profile_model(path, profile, runs=runs, max_seconds=max_seconds)
        measured = prof if prof.measured_on == "remote" else None  # where the figures come from
        lat = prof.latency_ms
        out[name] = {"latency_ms": Latency(p50=lat.p50, p90=lat.p90, p99=lat.p99, mean=lat.mean, std=lat.std),
                     "profile": VariantProfile(runs=prof.runs, spread=prof.spread, providers=prof.providers,
                                               threads=prof.threads, fallback=prof.fallback, load_ms=prof.load_ms,
                                               peak_rss_mb=prof.peak_rss_mb)}
    if profile.remote is None:
        ab = device_latency(paths, profile, feeds, rounds=ab_rounds, baseline="fp32")
        for name in paths:
            out[name]["speedup_vs_fp32"] = ab.speedup(name, "wall")
        how = (f"median wall-clock of {ab.rounds} interleaved rounds of warm ~{ab.burst_ms:g} ms bursts per variant, "
               f"{ab.threads} threads")
    else:  # the interleaved A/B runs in this process, on this machine: for a remote device, ratios of its p50s
        base = out["fp32"]["latency_ms"].p50
        for name in paths:
            out[name]["speedup_vs_fp32"] = base / out[name]["latency_ms"].p50
        how = (f"ratio of p50s, each variant profiled in turn on {measured.remote['target']} over SSH "
               "(not interleaved: the interleaved A/B would have timed this machine)")
    return Timings(variants={n: VariantTiming(**v) for n, v in out.items()}, speedup_measure=how,
                   host=measured.host.to_json() if measured and measured.host else None,
                   remote=measured.remote if measured else None)
