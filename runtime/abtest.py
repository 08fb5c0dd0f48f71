"""Interleaved A/B latency: several ONNX models timed in alternation in one process, medians compared.

Ratios between two models are what compression decisions rest on, and on a shared machine a sequential
A-then-B measurement mostly measures the neighbours. Interleaving puts A and B under the same conditions;
with one intra-op thread, the calling thread's CPU clock (time.thread_time) also excludes preemption,
which held a fp32/int8 ratio to 2.89-2.96x here where wall-clock medians swung 1.7x-3.9x. Wall-clock
figures are reported too: they are what users see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from compress.core import RuntimeFailure, first_line, sessions


@dataclass
class ABResult:
    """Per model: median wall-clock and thread-CPU milliseconds; ratios are taken against `baseline`."""

    wall_ms: dict[str, float]
    cpu_ms: dict[str, float]
    rounds: int
    threads: int
    baseline: str

    def speedup(self, name: str, clock: str = "cpu") -> float:
        ms = self.cpu_ms if clock == "cpu" else self.wall_ms
        return ms[self.baseline] / ms[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline, "rounds": self.rounds, "threads": self.threads,
            "wall_ms": self.wall_ms, "cpu_ms": self.cpu_ms,
            "speedup_wall": {n: self.speedup(n, "wall") for n in self.wall_ms},
            "speedup_cpu": {n: self.speedup(n, "cpu") for n in self.cpu_ms},
        }


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
    threads: int = 1,
    session_config: Optional[dict[str, str]] = None,
    rounds: int = 30,
    min_seconds: float = 0.0,
    warmup: int = 5,
    baseline: Optional[str] = None,
    on_round: Optional[Callable[[int, int], None]] = None,
) -> ABResult:
    """Time each model once per round, rounds in alternating order, and take per-model medians.

    All models must take the same inputs (one model and its compressed variants); `feeds` defaults to
    random data shaped for the first model. `min_seconds` raises the round count for fast models, whose
    sub-millisecond runs need many rounds before a median means anything.
    """
    if not models:
        raise ValueError("no models to time")
    providers = providers or ["CPUExecutionProvider"]
    opened = {n: _session(Path(p), providers, threads, session_config or {}) for n, p in models.items()}
    names = list(opened)
    if feeds is None:
        feeds = random_feeds(opened[names[0]])
    runners = {}
    for n, s in opened.items():
        wanted = {i.name for i in s.get_inputs()}
        f = {k: v for k, v in feeds.items() if k in wanted}
        outs = [o.name for o in s.get_outputs()]
        runners[n] = (lambda s=s, f=f, outs=outs: s.run(outs, f))
    t0 = time.perf_counter()
    for run in runners.values():
        for _ in range(warmup):
            run()
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    if min_seconds > 0 and per_round > 0:
        rounds = max(rounds, min(int(min_seconds / per_round) + 1, 20000))
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            run = runners[n]
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
        rounds=rounds, threads=threads, baseline=baseline or names[0],
    )
