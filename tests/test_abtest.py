"""Interleaved A/B timing: warm bursts leave out each model's cold start after another model ran."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress.core import sessions
from runtime import MAX_BURST, THREAD_GAIN, fewest_fastest, interleaved_latency, thread_candidates, tuned_latency


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


# --- thread tuning ------------------------------------------------------------------------------------------


def test_thread_candidates_double_up_to_the_count_itself() -> None:
    assert [thread_candidates(n) for n in (1, 2, 3, 6, 8)] == [[1], [1, 2], [1, 2, 3], [1, 2, 4, 6], [1, 2, 4, 8]]


def test_fewest_fastest_takes_fewer_threads_unless_more_buy_more_than_the_tie() -> None:
    assert fewest_fastest({1: 1.00, 2: 1.0 - THREAD_GAIN / 2}) == 1  # a thread for under THREAD_GAIN: not taken
    assert fewest_fastest({1: 1.00, 2: 0.80, 4: 0.79}) == 2
    assert fewest_fastest({1: 0.5, 2: 0.7}) == 1


def test_tuned_latency_times_each_model_at_each_count_and_compares_them_at_their_fastest(monkeypatch) -> None:
    """A model that scales (2 ms on one thread, 1 ms on two) against one that a second thread slows down
    (0.6 ms, 1.2 ms): each is taken at its own best count, and the ratio is of those."""
    from devices import load_profile

    ms = {("scales", 1): 2.0, ("scales", 2): 1.0, ("tiny", 1): 0.6, ("tiny", 2): 1.2}
    opened = []

    def session(path, *, threads, **kw):
        opened.append((Path(path).stem, threads))
        return _Fake(f"{Path(path).stem}@{threads}", ms[(Path(path).stem, threads)], 0.0)

    monkeypatch.setattr(sessions, "session", session)
    ab = tuned_latency({"scales": "scales.onnx", "tiny": "tiny.onnx"}, load_profile("host"), {"x": None},
                       candidates=[2, 1], baseline="scales", rounds=6, min_seconds=0.0, warmup=1)
    assert sorted(opened) == sorted(ms)  # one session per model and count, all in the same rounds
    assert ab.candidates == [1, 2] and ab.chosen == {"scales": 2, "tiny": 1}
    table = ab.table()
    assert table["scales"][2] < table["scales"][1] and table["tiny"][1] < table["tiny"][2]
    assert ab.speedup("tiny") == pytest.approx(table["scales"][2] / table["tiny"][1])
    assert 1.2 < ab.speedup("tiny") < 2.0  # ~1.0/0.6, where one count for both would have said 3.3x or 0.83x
