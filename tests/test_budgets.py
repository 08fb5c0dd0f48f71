"""Budget gates: `compress profile` and `compress run` judge their figures against the caller's limits after
writing them, and a miss exits 3 (distinct from failure, 1, and usage, 2) with one line naming each budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compress.core import BudgetMissed, UsageError
from compress.report import Budgets, accuracy_drop, enforce, profile_misses, run_misses


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture()
def small(tmp_path: Path, matmul_onnx) -> Path:
    return matmul_onnx(tmp_path / "small.onnx", rows=1)


def _report(speedup: float = 2.0, acc: tuple[float | None, float | None] = (None, None)) -> dict:
    def variant(name: str, p50: float, s: float, a: float | None, cos: float) -> dict:
        return {"name": name, "latency_ms": {"p50": p50, "p99": p50 * 1.5}, "profile": {"peak_rss_mb": 80.0},
                "speedup_vs_fp32": s, "accuracy": a,
                "fidelity": {"cosine_min": cos, "top1_agreement": None}}
    return {"recommended": "int8", "variants": [variant("fp32", 10.0, 1.0, acc[0], 1.0),
                                                variant("int8", 10.0 / speedup, speedup, acc[1], 0.99)]}


def test_run_budgets_judge_the_recommended_variant():
    rep = _report(speedup=2.0)
    assert run_misses(rep, Budgets(max_p50_ms=5.0, min_speedup=2.0, max_peak_rss_mb=80.0)) == []
    misses = run_misses(rep, Budgets(max_p50_ms=4.0, min_speedup=2.5, max_p99_ms=100.0))
    assert [m.flag for m in misses] == ["--max-p50-ms", "--min-speedup"]
    text = [str(m) for m in misses]
    assert text[0] == "5 ms is over --max-p50-ms 4 by 1 ms, 25%"
    assert text[1] == "2x is under --min-speedup 2.5 by 0.5x, 20%"
    with pytest.raises(BudgetMissed) as e:
        enforce(misses, "the recommended variant 'int8'")
    assert e.value.exit_code == 3 and "missed 2 budgets" in str(e.value) and "\n" not in str(e.value)


def test_accuracy_drop_is_the_eval_score_else_the_judged_fidelity():
    with_eval = _report(acc=(0.90, 0.88))
    drop, what = accuracy_drop(with_eval["variants"][1], with_eval["variants"][0])
    assert drop == pytest.approx(0.02) and "--eval" in what
    assert [m.flag for m in run_misses(with_eval, Budgets(max_accuracy_drop=0.01))] == ["--max-accuracy-drop"]
    assert run_misses(with_eval, Budgets(max_accuracy_drop=0.03)) == []
    plain = _report()
    drop, what = accuracy_drop(plain["variants"][1], plain["variants"][0])
    assert drop == pytest.approx(0.01) and "cosine_min" in what  # 1 - the worst per-sample cosine
    assert accuracy_drop(plain["variants"][0], plain["variants"][0])[0] == 0.0  # fp32 against itself


def test_a_budget_on_a_figure_not_measured_is_not_passed_silently():
    rep = _report()
    rep["variants"][1]["latency_ms"] = None  # simulated: nothing timed
    with pytest.raises(BudgetMissed, match="not measured"):
        run_misses(rep, Budgets(max_p50_ms=1.0))
    with pytest.raises(UsageError, match="--min-speedup"):
        profile_misses({"latency_ms": {"p50": 1.0}}, Budgets(min_speedup=1.5))


def test_profile_budget_exit_codes(small, tmp_path):
    ok = _cli("profile", str(small), "--runs", "20", "--max-p50-ms", "1000", "--max-peak-rss-mb", "100000")
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "p.json"
    missed = _cli("profile", str(small), "--runs", "20", "--max-p50-ms", "0.000001", "--max-peak-rss-mb", "1",
                  "--json", str(out))
    assert missed.returncode == 3, missed.stderr
    lines = [ln for ln in missed.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "small.onnx missed 2 budgets" in lines[0]
    assert "over --max-p50-ms 1e-06" in lines[0] and "over --max-peak-rss-mb 1 " in lines[0]
    assert json.loads(out.read_text())["latency_ms"]["p50"] > 0  # the figures were written all the same
    piped = _cli("profile", str(small), "--runs", "5", "--max-p99-ms", "0.000001", "--json", "-")
    assert piped.returncode == 3 and json.loads(piped.stdout)["latency_ms"]["p99"] > 0


def test_run_budget_exit_codes(tmp_path):
    out = tmp_path / "out"
    args = ["run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--device", "host", "--quant", "none",
            "--runs", "5", "--no-tune-threads", "-o", str(out)]
    r = _cli(*args, "--min-speedup", "1.5", "--max-accuracy-drop", "0")
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the recommended variant 'fp32' missed 1 budget: 1x is under --min-speedup 1.5")
    assert json.loads((out / "report.json").read_text())["recommended"] == "fp32"  # the report is there to read
    r = _cli(*args, "--overwrite", "--max-p50-ms", "10000", "--max-accuracy-drop", "0")
    assert r.returncode == 0, r.stderr
