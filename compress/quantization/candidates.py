"""Candidate graphs timed side by side on this machine, and the rule that picks one.

INT8 (onnxruntime and INC backends alike) tries a few equivalent graphs (fusions, the residual Add -> Sum
rewrite, the space-to-depth stem) and keeps the fastest; one thread, interleaved rounds and CPU-clock medians,
so that the choice holds on a shared, noisy machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime import interleaved_latency

KEEP_MARGIN = 0.02  # a rewrite must be this much faster than the plain graph to be kept
TUNE_ROUNDS = 15
TUNE_MIN_SECONDS = 0.6


def time_candidates(models: Mapping[str, Path], feed: Mapping[str, np.ndarray], **kw: Any) -> Any:
    opts = {"threads": 1, "rounds": TUNE_ROUNDS, "warmup": 3, "min_seconds": TUNE_MIN_SECONDS, **kw}
    return interleaved_latency({k: str(v) for k, v in models.items()}, feeds=dict(feed), **opts)


def pick(result: Any, plain: str, margin: float = KEEP_MARGIN) -> str:
    """The fastest candidate, unless the plain one is within `margin` of it (noise does not buy a rewrite)."""
    fastest = min(result.cpu_ms, key=result.cpu_ms.get)
    return plain if result.cpu_ms[plain] <= result.cpu_ms[fastest] * (1 + margin) else fastest


def timing_json(result: Any) -> dict[str, Any]:
    return {n: {"cpu_ms": round(result.cpu_ms[n], 4), "wall_ms": round(result.wall_ms[n], 4)} for n in result.cpu_ms}
