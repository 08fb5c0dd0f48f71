"""Interleaved A/B timing: warm bursts leave out each model's cold start after another model ran."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress.core import sessions
from runtime import MAX_BURST, interleaved_latency


class _Fake:
    """A session whose run takes `ms`, plus `cold_ms` when another model ran last (its cache evicted)."""

    last: list[str] = [""]

    def __init__(self, name: str, ms: float, cold_ms: float) -> None:
        self.name, self.ms, self.cold_ms, self.runs = name, ms, cold_ms, 0

    def get_inputs(self) -> list:
        return [SimpleNamespace(name="x")]

    def get_outputs(self) -> list:
        return [SimpleNamespace(name="y")]

    def run(self, outs: list, feeds: dict) -> list:
        self.runs += 1
        delay = self.ms + (self.cold_ms if _Fake.last[0] != self.name else 0.0)
        _Fake.last[0] = self.name
        if delay:
            time.sleep(delay / 1e3)
        return [None]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, _Fake]:
    made = {"fast": _Fake("fast", 0.0, 3.0), "slow": _Fake("slow", 4.0, 0.0)}
    monkeypatch.setattr(sessions, "session", lambda path, **kw: made[Path(path).stem])
    return made


def test_one_run_per_round_times_each_model_from_cold(fakes: dict[str, _Fake]) -> None:
    ab = interleaved_latency({"fast": "fast.onnx", "slow": "slow.onnx"}, feeds={"x": None}, rounds=4, warmup=2)
    assert fakes["fast"].runs == fakes["slow"].runs == 2 + 4
    assert ab.wall_ms["fast"] >= 3.0  # every counted run followed the other model
    assert ab.burst_ms == 0.0


def test_warm_bursts_run_a_fast_model_over_and_over_and_leave_out_its_cold_start(fakes: dict[str, _Fake]) -> None:
    ab = interleaved_latency({"fast": "fast.onnx", "slow": "slow.onnx"}, feeds={"x": None}, rounds=4, warmup=2,
                             burst_ms=2.0)
    # the fast model: one uncounted run from cold, then as many as fit in 2 ms (capped); the slow one, slower than
    # a burst, still once per round and counted
    assert fakes["fast"].runs == 2 + 4 * (1 + MAX_BURST)
    assert fakes["slow"].runs == 2 + 4
    assert ab.wall_ms["fast"] < 1.0
    assert ab.wall_ms["slow"] >= 4.0
    assert ab.to_json()["burst_ms"] == 2.0
