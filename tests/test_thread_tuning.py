"""Each variant timed at 1, 2, 4, ... threads and kept at its fastest: on a remote device (p50s profiled there
in turn) as locally (tests/test_abtest.py times the interleaved side with fake sessions; tests/test_report.py a
real run's report)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import compress.pipeline.timing as timing
from compress.pipeline import time_variants
from devices import RemoteSpec, load_profile
from runtime import Latency, Spread

# p50 ms on the "device" per (variant, threads): fp32 scales with threads, int8 is slowed by a second one
P50 = {("fp32", 1): 4.0, ("fp32", 2): 2.4, ("fp32", 4): 2.0, ("int8", 1): 1.0, ("int8", 2): 1.2, ("int8", 4): 1.6}


def _profiled(path, profile, *, runs=None, max_seconds=None, threads=None):
    ms = P50[(Path(path).stem, threads)]
    return SimpleNamespace(latency_ms=Latency(p50=ms, p90=ms, p99=ms, mean=ms, std=0.0), runs=8, spread=Spread(),
                           providers=["CPUExecutionProvider"], threads=threads, fallback=False, load_ms=1.0,
                           peak_rss_mb=None, generation=None, remote={"target": "me@board"}, host=None)


@pytest.fixture
def board():
    return load_profile("host").model_copy(update={"remote": RemoteSpec(host="board"), "threads": 4})


def test_remote_device_profiles_each_count_and_takes_each_variant_at_its_fastest(board, monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "profile_model", lambda p, prof, **kw: calls.append((Path(p).stem, kw["threads"]))
                        or _profiled(p, prof, **kw))
    t = time_variants({"fp32": Path("fp32.onnx"), "int8": Path("int8.onnx")}, board, {})
    assert sorted(calls) == sorted(P50)  # the device's 4 threads, not this machine's cores, bound the counts
    assert t.threads_tuning.candidates == [1, 2, 4] and t.threads_tuning.chosen == {"fp32": 4, "int8": 1}
    assert t.variants["int8"].speedup_vs_fp32 == pytest.approx(2.0 / 1.0)  # each at its fastest, not 4.0/1.0
    assert t.variants["int8"].profile.threads == 1 and t.variants["fp32"].latency_ms.p50 == 2.0
    assert t.threads_tuning.ms["int8"] == {"1": 1.0, "2": 1.2, "4": 1.6}
    assert "me@board" in t.speedup_measure and "fastest of 1, 2, 4" in t.speedup_measure


def test_without_tuning_the_profile_threads_alone(board, monkeypatch):
    monkeypatch.setattr(timing, "profile_model", _profiled)
    t = time_variants({"fp32": Path("fp32.onnx"), "int8": Path("int8.onnx")}, board, {}, tune_threads=False)
    assert t.threads_tuning is None and t.variants["int8"].profile.threads == 4
    assert t.variants["int8"].speedup_vs_fp32 == pytest.approx(2.0 / 1.6)
