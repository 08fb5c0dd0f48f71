"""Interleaved A/B latency: several ONNX models timed in alternation in one process, medians compared.

Ratios between two models are what compression decisions rest on, and on a shared machine a sequential
A-then-B measurement mostly measures the neighbours. Interleaving puts A and B under the same conditions;
with one intra-op thread, the calling thread's CPU clock (time.thread_time) also excludes preemption,
which held a fp32/int8 ratio to 2.89-2.96x here where wall-clock medians swung 1.7x-3.9x. Wall-clock
figures are reported too: they are what users see.

One run per model per round measures each run from cold: the other models have just evicted its weights and
activations from cache. A deployed model runs over and over, warm, and a cold start costs a sub-millisecond
model a larger share of its time than a big one. `burst_ms` times each model in warm bursts instead, still
interleaved: on a `make demo` run's files (pruned 25% and its INT8, AVX2 kernels, 2 threads, workers not
spinning; `bench/speedup_measure.py RUN --pipeline 3` under bench/isa/avx2_only.sh), INT8 was 1.78-1.80x fp32
one run per round and 2.31-2.36x in warm bursts of WARM_BURST_MS, three pairs alternating.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from compress.core import RuntimeFailure, first_line, sessions
from export import PAST_PREFIX
from runtime.profiler import resolve_providers

MAX_BURST = 50  # counted runs per model per round, however fast the model
# How the speed a user is shown is measured: warm bursts of about 2 ms per model per round (8 runs of the demo's
# 0.25 ms INT8 model, one of a 35 ms ResNet), interleaved
WARM_BURST_MS = 2.0


@dataclass
class ABResult:
    """Per model: median wall-clock and thread-CPU milliseconds; ratios are taken against `baseline`."""

    wall_ms: dict[str, float]
    cpu_ms: dict[str, float]
    rounds: int
    threads: int
    baseline: str
    burst_ms: float = 0.0  # > 0: warm bursts of about this long per model per round (see interleaved_latency)

    def speedup(self, name: str, clock: str = "cpu") -> float:
        ms = self.cpu_ms if clock == "cpu" else self.wall_ms
        return ms[self.baseline] / ms[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline, "rounds": self.rounds, "threads": self.threads, "burst_ms": self.burst_ms,
            "wall_ms": self.wall_ms, "cpu_ms": self.cpu_ms,
            "speedup_wall": {n: self.speedup(n, "wall") for n in self.wall_ms},
            "speedup_cpu": {n: self.speedup(n, "cpu") for n in self.cpu_ms},
        }


def _own_cache_sizes(sess: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A decoder's KV-cache feeds at this model's own heads and head size, keeping the batch and past length the
    feeds give: variants of one decoder share every other input, but a pruned one keeps fewer heads."""
    out = dict(feeds)
    rng = np.random.default_rng(0)
    for i in sess.get_inputs():
        have = out.get(i.name)
        if have is None or not i.name.startswith(PAST_PREFIX) or have.ndim != len(i.shape):
            continue
        want = tuple(d if isinstance(d, int) else have.shape[k] for k, d in enumerate(i.shape))
        if want != have.shape:
            out[i.name] = rng.standard_normal(want).astype(have.dtype)
    return out


def _session(path: Path, providers: list[Any], threads: int, session_config: dict[str, str]) -> Any:
    try:
        return sessions.session(path, providers=providers, threads=threads, config=session_config)
    except Exception as e:
        raise RuntimeFailure(f"onnxruntime cannot load {path}: {first_line(e)}") from e


def random_feeds(sess: Any, seed: int = 0, specs: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, np.ndarray]:
    """Feeds for every graph input: symbolic dims 1 unless specs give a shape; ints in [low, high], masks ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        spec = (specs or {}).get(inp.name, {})
        shape = spec.get("shape") or [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        if inp.type == "tensor(float)":
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
        elif "mask" in inp.name:
            feeds[inp.name] = np.ones(shape, dtype=np.int64 if "int64" in inp.type else np.int32)
        else:
            lo, hi = int(spec.get("low", 0) or 0), int(spec.get("high", 1) or 1)
            feeds[inp.name] = rng.integers(lo, hi + 1, shape).astype(np.int64 if "int64" in inp.type else np.int32)
    return feeds


def interleaved_latency(
    models: dict[str, str | Path],
    *,
    feeds: Optional[dict[str, np.ndarray]] = None,
    providers: Optional[list[Any]] = None,
    threads: int | Mapping[str, int] = 1,
    session_config: Optional[dict[str, str]] = None,
    rounds: int = 30,
    min_seconds: float = 0.0,
    warmup: int = 5,
    baseline: Optional[str] = None,
    on_round: Optional[Callable[[int, int], None]] = None,
    burst_ms: float = 0.0,
) -> ABResult:
    """Time each model once per round, rounds in alternating order, and take per-model medians.

    With `burst_ms` > 0 each model runs back to back for about that long in each round, and where that is
    several runs the first (from cold, after another model) is not counted; a model slower than `burst_ms`
    still runs once per round, its cold start a small share of its time.

    All models must take the same inputs (one model and its compressed variants); `feeds` defaults to
    random data shaped for the first model. `min_seconds` raises the round count for fast models, whose
    sub-millisecond runs need many rounds before a median means anything. `threads`: intra-op threads of every
    session, or per model (the result's `threads` is then the most any had).
    """
    if not models:
        raise ValueError("no models to time")
    providers = providers or ["CPUExecutionProvider"]
    per_model = dict(threads) if isinstance(threads, Mapping) else {n: threads for n in models}
    opened = {n: _session(Path(p), providers, per_model[n], session_config or {}) for n, p in models.items()}
    names = list(opened)
    if feeds is None:
        feeds = random_feeds(opened[names[0]])
    runners = {}
    for n, s in opened.items():
        wanted = {i.name for i in s.get_inputs()}
        f = _own_cache_sizes(s, {k: v for k, v in feeds.items() if k in wanted})
        outs = [o.name for o in s.get_outputs()]
        runners[n] = (lambda s=s, f=f, outs=outs: s.run(outs, f))
    warm: dict[str, float] = {}
    for n, run in runners.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            run()
        warm[n] = (time.perf_counter() - t0) / max(warmup, 1)
    counted = {n: max(1, min(int(round(burst_ms * 1e-3 / t)), MAX_BURST)) if burst_ms > 0 and t > 0 else 1
               for n, t in warm.items()}
    lead = {n: int(k > 1) for n, k in counted.items()}  # an uncounted run from cold before each burst
    per_round = sum(t * (counted[n] + lead[n]) for n, t in warm.items())
    if min_seconds > 0 and per_round > 0:
        rounds = max(rounds, min(int(min_seconds / per_round) + 1, 20000))
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            run = runners[n]
            for _ in range(lead[n]):
                run()
            for _ in range(counted[n]):
                w0, c0 = time.perf_counter(), time.thread_time()
                run()
                c1, w1 = time.thread_time(), time.perf_counter()
                wall[n].append(w1 - w0)
                cpu[n].append(c1 - c0)
        if on_round:
            on_round(r + 1, rounds)
    return ABResult(
        wall_ms={n: float(np.median(v)) * 1e3 for n, v in wall.items()},
        cpu_ms={n: float(np.median(v)) * 1e3 for n, v in cpu.items()},
        rounds=rounds, threads=max(per_model.values()), baseline=baseline or names[0], burst_ms=burst_ms,
    )


# a thread that buys less than this is not worth a core taken from the rest of the application (and is noise)
THREAD_GAIN = 0.02


def thread_candidates(threads: int) -> list[int]:
    """The intra-op thread counts worth trying up to `threads`: 1, 2, 4, ... and `threads` itself."""
    out, t = [], 1
    while t < threads:
        out.append(t)
        t *= 2
    return out + [max(1, threads)]


def fewest_fastest(ms_by_threads: Mapping[int, float]) -> int:
    """The fewest threads within THREAD_GAIN of the fastest median."""
    best = min(ms_by_threads.values())
    return min(t for t, ms in ms_by_threads.items() if ms <= best * (1 + THREAD_GAIN))


@dataclass
class TunedAB:
    """Each model timed at each candidate intra-op thread count, all of them interleaved in one run, and each
    taken at its fastest count (`chosen`): a model is deployed with the setting that suits it, the baseline too.

    Why: the second intra-op thread of a 2-vCPU AMD EPYC (AVX2 kernels) bought `make demo`'s 0.35 ms fp32 CNN
    nothing and cost its 0.16 ms INT8 0.04 ms (1 thread 2.22x, 2 threads 1.86x; bench/speedup_measure.py):
    on sub-millisecond models the hand-off to workers costs more than they save, and how much depends on the
    model, so the count is measured per model, as Olive's session-parameter tuning does."""

    ab: ABResult  # keyed by at(name, threads)
    candidates: list[int]
    chosen: dict[str, int]
    baseline: str

    @staticmethod
    def at(name: str, threads: int) -> str:
        return f"{name}@{threads}"

    def wall_ms(self, name: str, threads: Optional[int] = None) -> float:
        return self.ab.wall_ms[self.at(name, threads or self.chosen[name])]

    def speedup(self, name: str) -> float:
        """Wall-clock, each side at its own fastest thread count (the per-thread CPU clock misses the workers)."""
        return self.wall_ms(self.baseline) / self.wall_ms(name)

    def table(self) -> dict[str, dict[int, float]]:
        """Per model, per thread count: the median wall-clock milliseconds."""
        return {n: {t: self.wall_ms(n, t) for t in self.candidates} for n in self.chosen}


def tuned_latency(models: dict[str, str | Path], profile: Any, feeds: Optional[dict[str, np.ndarray]], *,
                  candidates: Sequence[int], baseline: str, rounds: int = 30, min_seconds: float = 3.0,
                  warmup: int = 5) -> TunedAB:
    """device_latency with each model at every count in `candidates` (min_seconds for each count), interleaved."""
    cands = sorted(set(candidates))
    pairs = {TunedAB.at(n, t): (str(p), t) for n, p in models.items() for t in cands}
    providers, _ = resolve_providers(profile)
    ab = interleaved_latency({k: p for k, (p, _) in pairs.items()}, feeds=feeds,
                             providers=[(p, dict(o)) for p, o in providers], threads={k: t for k, (_, t) in pairs.items()},
                             session_config=dict(profile.session_config), rounds=rounds,
                             min_seconds=min_seconds * len(cands), warmup=warmup, baseline=TunedAB.at(baseline, cands[0]),
                             burst_ms=WARM_BURST_MS)
    chosen = {n: fewest_fastest({t: ab.wall_ms[TunedAB.at(n, t)] for t in cands}) for n in models}
    return TunedAB(ab=ab, candidates=cands, chosen=chosen, baseline=baseline)


def device_latency(models: dict[str, str | Path], profile: Any, feeds: Optional[dict[str, np.ndarray]], *,
                   threads: Optional[int] = None, baseline: Optional[str] = None, rounds: int = 30,
                   min_seconds: float = 3.0, warmup: int = 5) -> ABResult:
    """`models` timed on this machine as `profile`'s device runs them (its providers, its threads or `threads`,
    its session options), interleaved in warm bursts (WARM_BURST_MS): the speed a deployed model has."""
    providers, _ = resolve_providers(profile)
    return interleaved_latency({k: str(v) for k, v in models.items()}, feeds=feeds,
                               providers=[(p, dict(o)) for p, o in providers], threads=threads or profile.threads,
                               session_config=dict(profile.session_config), rounds=rounds, min_seconds=min_seconds,
                               warmup=warmup, baseline=baseline, burst_ms=WARM_BURST_MS)
