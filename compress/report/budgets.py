"""Budget gates: limits a CI job sets on what `compress profile` measured or what `compress run` recommends.

Why: a run that rejects every variant is still a successful run (exit 0), and a profile has no threshold, so a
CI job could only fail on "p50 above 12 ms on rpi4" by parsing JSON itself. Budgets are judged after the
figures are written (the JSON and the report exist either way, to read what missed) and a missed budget exits
with its own code, 3 (compress.core.BudgetMissed), distinct from a failure (1) and a usage error (2), with one
line naming each budget missed and by how much.

A run's budgets judge its recommended variant: its latency and memory as profiled on the device, its speedup
over fp32, and its drop from fp32 on what the tolerance bounds (the --eval score where there is one, else the
fidelity figure the run judged by: 1 - top-1 agreement, 1 - the boxes' F1, or 1 - the worst per-sample cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from compress.core import BudgetMissed, Options, UsageError
from compress.evaluate import judged


class Budgets(Options):
    """The limits; None: not gated. Units as the flags say: milliseconds, MB (2^20 bytes, as the profile reports
    peak RSS), a ratio, and the score's own units (like --tolerance: 0.005 is half a point of accuracy)."""

    max_p50_ms: Optional[float] = None
    max_p99_ms: Optional[float] = None
    max_peak_rss_mb: Optional[float] = None
    min_speedup: Optional[float] = None  # run only
    max_accuracy_drop: Optional[float] = None  # run only


@dataclass(frozen=True)
class Miss:
    """One budget missed: the flag, its limit, the value measured, and the unit both are in."""

    flag: str
    limit: float
    value: float
    unit: str
    over: bool  # True: a maximum exceeded; False: a minimum not reached

    def __str__(self) -> str:
        gap = self.value - self.limit if self.over else self.limit - self.value
        share = f", {gap / self.limit:.0%}" if self.limit else ""
        side = "over" if self.over else "under"
        return f"{_fmt(self.value)}{self.unit} is {side} {self.flag} {_fmt(self.limit)} by {_fmt(gap)}{self.unit}{share}"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _max(flag: str, limit: Optional[float], value: Optional[float], unit: str, what: str) -> list[Miss]:
    if limit is None:
        return []
    if value is None:
        raise BudgetMissed(f"{flag}: {what} was not measured, so the budget cannot be judged")
    return [Miss(flag, limit, value, unit, over=True)] if value > limit else []


def profile_misses(result: Mapping[str, Any], budgets: Budgets) -> list[Miss]:
    """The budgets a `compress profile` result (its JSON form) misses."""
    _refuse_run_only(budgets, "compress profile")
    lat = result.get("latency_ms") or {}
    return (_max("--max-p50-ms", budgets.max_p50_ms, lat.get("p50"), " ms", "p50 latency")
            + _max("--max-p99-ms", budgets.max_p99_ms, lat.get("p99"), " ms", "p99 latency")
            + _max("--max-peak-rss-mb", budgets.max_peak_rss_mb, result.get("peak_rss_mb"), " MB", "peak RSS"))


def run_misses(report: Mapping[str, Any], budgets: Budgets) -> list[Miss]:
    """The budgets a `compress run` report (report.json's form) misses, judged on its recommended variant."""
    variants = {v["name"]: v for v in report["variants"]}
    rec, fp32 = variants[report["recommended"]], variants.get("fp32")
    lat = rec.get("latency_ms") or {}
    prof = rec.get("profile") or {}
    misses = (_max("--max-p50-ms", budgets.max_p50_ms, lat.get("p50"), " ms", f"{rec['name']}'s p50 latency")
              + _max("--max-p99-ms", budgets.max_p99_ms, lat.get("p99"), " ms", f"{rec['name']}'s p99 latency")
              + _max("--max-peak-rss-mb", budgets.max_peak_rss_mb, prof.get("peak_rss_mb"), " MB",
                     f"{rec['name']}'s peak RSS"))
    if budgets.min_speedup is not None:
        speedup = rec.get("speedup_vs_fp32")
        if speedup is None:
            raise BudgetMissed(f"--min-speedup: {rec['name']} has no measured speedup, so the budget cannot be judged")
        if speedup < budgets.min_speedup:
            misses.append(Miss("--min-speedup", budgets.min_speedup, speedup, "x", over=False))
    if budgets.max_accuracy_drop is not None:
        drop, what = accuracy_drop(rec, fp32)
        misses += _max("--max-accuracy-drop", budgets.max_accuracy_drop, drop, "", what)
    return misses


def accuracy_drop(variant: Mapping[str, Any], fp32: Optional[Mapping[str, Any]]) -> tuple[float, str]:
    """(drop, what it is) of a variant from fp32: of the --eval score where both have one, else the fidelity
    loss the run's tolerance bounds (compress.evaluate.judged; fp32's own is 0)."""
    if fp32 is not None and variant.get("accuracy") is not None and fp32.get("accuracy") is not None:
        return float(fp32["accuracy"]) - float(variant["accuracy"]), "the drop of the --eval score"
    metric, loss = judged(variant.get("fidelity") or {})
    return (0.0 if variant.get("name") == "fp32" else loss), f"the fidelity loss (1 - {metric})"


def _refuse_run_only(budgets: Budgets, where: str) -> None:
    for flag, value in (("--min-speedup", budgets.min_speedup), ("--max-accuracy-drop", budgets.max_accuracy_drop)):
        if value is not None:
            raise UsageError(f"{flag} judges a compress run's recommendation; {where} has nothing to compare with")


def enforce(misses: list[Miss], subject: str) -> None:
    """Raise BudgetMissed (exit code 3) naming every budget missed, in one line."""
    if misses:
        raise BudgetMissed(f"{subject} missed {len(misses)} budget{'s' if len(misses) > 1 else ''}: "
                           + "; ".join(map(str, misses)))
