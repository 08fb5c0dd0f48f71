"""Wall-clock seconds per named stage or step: report.json's stage_seconds (compress run) and each quantize
stage's step_seconds. What a user waits for, and where a cost grows faster than the model (issue 19)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional


class StageClock:
    """Seconds per name, summed over every span of that name. Two forms: `with clock(name):` around a stage,
    or `start(name)` ... `stop()` for steps told apart only by where the next one starts (the quantize stage's,
    whose boundaries are its progress lines)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: Optional[tuple[str, float]] = None

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._add(stage, time.perf_counter() - t0)

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 2)

    def start(self, name: str) -> None:
        """End the open span, if any, and open one for `name`."""
        self.stop()
        self._open = (name, time.perf_counter())

    def stop(self) -> dict[str, float]:
        """End the open span, if any; the seconds so far."""
        if self._open is not None:
            name, t0 = self._open
            self._add(name, time.perf_counter() - t0)
            self._open = None
        return self.seconds
