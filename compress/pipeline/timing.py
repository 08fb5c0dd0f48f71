"""Every variant of a run timed on the device: each profiled there (p50, spread, memory), and its speedup over
fp32 measured the way the device allows (an interleaved A/B on this machine; ratios of p50s over SSH).

Files in, typed figures out (Timings), so that `compress search` can run it where the device is (a Ray task
holding the device's resource) and ship the result back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from compress.core import Result
from compress.report import ThreadTuning, VariantProfile, VariantTiming
from devices import DeviceProfile, usable_cores
from runtime import THREAD_GAIN, Latency, ProfileResult, fewest_fastest, profile_model, thread_candidates, tuned_latency


class Timings(Result):
    """What time_variants measured: per variant, and how the speedup was measured; the thread counts tried and
    chosen; where the device was remote, the device's own description (host) and its SSH target (remote); on a
    Ray cluster, the node that timed it."""

    variants: dict[str, VariantTiming]
    speedup_measure: str
    threads_tuning: Optional[ThreadTuning] = None
    host: Optional[dict[str, Any]] = None
    remote: Optional[dict[str, Any]] = None
    profiled_on: Optional[dict[str, Any]] = None


def thread_counts(profile: DeviceProfile, tune: bool) -> list[int]:
    """The intra-op thread counts to time each variant at: the profile's alone, or (tuning) 1, 2, 4, ... up to it,
    on this machine no more than it has cores for (a pool larger than the cores only queues)."""
    if not tune:
        return [profile.threads]
    return thread_candidates(profile.threads if profile.remote is not None else min(profile.threads, usable_cores()))


def time_variants(paths: dict[str, Path], profile: DeviceProfile, feeds: dict[str, Any], runs: Optional[int] = None,
                  max_seconds: Optional[float] = None, ab_rounds: int = 30, tune_threads: bool = True) -> Timings:
    """Profile each model on the device and its speedup over paths["fp32"]: files in, typed figures out, so that
    `compress search` can run it where the device is (a Ray task holding the device's resource), one at a time.

    With `tune_threads`, each variant (fp32 too) is timed at every count of thread_counts and taken at its fastest:
    its profile, its speedup and the recommendation then hold for that setting, which the report names.
    Locally the speedup is the interleaved A/B's median wall-clock ratio, warm (all see the same machine); for
    a remote device, the ratio of p50s measured there in turn."""
    counts = thread_counts(profile, tune_threads)
    if profile.remote is None:
        ab = tuned_latency(paths, profile, feeds, candidates=counts, baseline="fp32", rounds=ab_rounds)
        chosen, ms = ab.chosen, ab.table()
        profs = {n: profile_model(p, profile, runs=runs, max_seconds=max_seconds, threads=chosen[n])
                 for n, p in paths.items()}
        speedup = {n: ab.speedup(n) for n in paths}
        how = (f"median wall-clock of {ab.ab.rounds} interleaved rounds of warm ~{ab.ab.burst_ms:g} ms bursts per "
               f"variant, {_threads_said(counts)}")
        kind = "median wall-clock ms, interleaved warm bursts, all counts in the same rounds"
        measured = None
    else:  # the interleaved A/B runs in this process, on this machine: for a remote device, ratios of its p50s
        tried = {t: {n: profile_model(p, profile, runs=runs, max_seconds=max_seconds, threads=t)
                     for n, p in paths.items()} for t in counts}
        ms = {n: {t: tried[t][n].latency_ms.p50 for t in counts} for n in paths}
        chosen = {n: fewest_fastest(ms[n]) for n in paths}
        profs = {n: tried[chosen[n]][n] for n in paths}
        speedup = {n: profs["fp32"].latency_ms.p50 / profs[n].latency_ms.p50 for n in paths}
        measured = profs["fp32"]
        how = (f"ratio of p50s, each variant profiled in turn on {measured.remote['target']} over SSH "
               f"(not interleaved: the interleaved A/B would have timed this machine), {_threads_said(counts)}")
        kind = "p50 ms on the remote device, each count profiled in turn"
    tuning = None
    if len(counts) > 1:
        tuning = ThreadTuning(candidates=counts, chosen=chosen, measure=kind, tie=THREAD_GAIN,
                              ms={n: {str(t): v for t, v in by.items()} for n, by in ms.items()})
    return Timings(variants={n: _timing(profs[n], speedup[n]) for n in paths}, speedup_measure=how,
                   threads_tuning=tuning, host=measured.host.to_json() if measured and measured.host else None,
                   remote=measured.remote if measured else None)


def _threads_said(counts: list[int]) -> str:
    if len(counts) == 1:
        return f"{counts[0]} threads"
    return f"each variant (fp32 too) at its fastest of {', '.join(map(str, counts))} intra-op threads"


def _timing(prof: ProfileResult, speedup: float) -> VariantTiming:
    lat = prof.latency_ms
    return VariantTiming(latency_ms=Latency(p50=lat.p50, p90=lat.p90, p99=lat.p99, mean=lat.mean, std=lat.std),
                         profile=VariantProfile(runs=prof.runs, spread=prof.spread, providers=prof.providers,
                                                threads=prof.threads, fallback=prof.fallback, load_ms=prof.load_ms,
                                                peak_rss_mb=prof.peak_rss_mb,
                                                **({"generation": prof.generation} if prof.generation else {})),
                         speedup_vs_fp32=speedup)
