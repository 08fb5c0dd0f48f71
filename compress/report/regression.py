"""Two profiles, or two runs, compared figure by figure: what `compress compare OLD NEW --max-regression 5%` reads.

Why: a CI job that keeps last release's profile beside the model wants "did this change make it slower or
bigger", not a p50 to read by eye. Each figure has a better direction (latency and memory lower, speedup and
accuracy higher); a change in the worse direction by more than the limit is a regression, and `compress compare`
exits 3 (compress.core.BudgetMissed) naming each one. Profiles carry their p50's 95% confidence interval; where
the two intervals overlap the change is reported as within noise and is not a regression, whatever its size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import Field

from compress.core import InputError, Result
from compress.report.schema import REPORT_SCHEMA as RUN_SCHEMA
from runtime import PROFILE_SCHEMA

COMPARE_SCHEMA = "edge-compress/compare/1"
SCHEMA_FILE = Path(__file__).with_name("compare.schema.json")


class FigureJson(Result):
    """One figure of a comparison as `compress compare --json` writes it (Change.to_json)."""

    figure: str
    old: Optional[float]
    new: Optional[float]
    unit: str
    lower_is_better: bool
    noise: bool
    change: Optional[float]  # new / old - 1
    worse: bool
    regressed: Optional[bool]  # None without --max-regression

    def __str__(self) -> str:
        pct = f" ({self.change:+.1%})" if self.change is not None else ""
        return f"{self.figure} {_fmt(self.old)} -> {_fmt(self.new)}{self.unit}{pct}"


class Comparison(Result):
    """`compress compare --json`: two profiles or two run reports, figure by figure."""

    schema_: Literal["edge-compress/compare/1"] = Field(COMPARE_SCHEMA, alias="schema")
    kind: Literal["profile", "run"]
    old: str
    new: str
    max_regression: Optional[float]
    figures: list[FigureJson]
    recommended: Optional[dict[str, Optional[str]]] = None  # runs: {"old": ..., "new": ...}

    def regressions(self) -> list[FigureJson]:
        """The figures that moved the wrong way by more than max_regression (none without a limit)."""
        return [f for f in self.figures if f.regressed]



@dataclass(frozen=True)
class Change:
    """One figure in both files. `change` is relative (new / old - 1); `worse` says whether it moved in the
    figure's worse direction; `noise` that the two measurements' confidence intervals overlap."""

    figure: str
    old: Optional[float]
    new: Optional[float]
    unit: str
    lower_is_better: bool
    noise: bool = False

    @property
    def change(self) -> Optional[float]:
        if self.old is None or self.new is None or self.old == 0:
            return None
        return self.new / self.old - 1.0

    @property
    def worse(self) -> bool:
        c = self.change
        return c is not None and (c > 0 if self.lower_is_better else c < 0)

    def regressed(self, limit: float) -> bool:
        c = self.change
        return self.worse and not self.noise and c is not None and abs(c) > limit

    def to_json(self, limit: Optional[float]) -> dict[str, Any]:
        return {**asdict(self), "change": self.change, "worse": self.worse,
                "regressed": self.regressed(limit) if limit is not None else None}


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def kind_of(doc: Mapping[str, Any], name: str) -> str:
    """"profile" or "run", from the file's schema; InputError for anything else."""
    schema = doc.get("schema") if isinstance(doc, Mapping) else None
    if schema == PROFILE_SCHEMA:
        return "profile"
    if schema == RUN_SCHEMA:
        return "run"
    raise InputError(f"{name}: not a `compress profile --json` or `compress run` report.json (schema {schema!r}); "
                     f"compare reads {PROFILE_SCHEMA} and {RUN_SCHEMA}")


def _num(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _overlap(a: Any, b: Any) -> bool:
    if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == 2 and len(b) == 2):
        return False
    return float(a[0]) <= float(b[1]) and float(b[0]) <= float(a[1])


def profile_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    lo, ln = old.get("latency_ms") or {}, new.get("latency_ms") or {}
    noise = _overlap((old.get("spread") or {}).get("p50_ci_ms"), (new.get("spread") or {}).get("p50_ci_ms"))
    return [Change("p50", _num(lo.get("p50")), _num(ln.get("p50")), " ms", True, noise),
            Change("p99", _num(lo.get("p99")), _num(ln.get("p99")), " ms", True),
            Change("peak RSS", _num(old.get("peak_rss_mb")), _num(new.get("peak_rss_mb")), " MB", True)]


def run_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Per variant both runs built: p50, p99, peak RSS, speedup over fp32 and the --eval score."""
    olds = {v["name"]: v for v in old.get("variants") or []}
    out: list[Change] = []
    for v in new.get("variants") or []:
        o = olds.get(v["name"])
        if o is None:
            continue
        lo, ln = o.get("latency_ms") or {}, v.get("latency_ms") or {}
        n = v["name"]
        noise = _overlap(((o.get("profile") or {}).get("spread") or {}).get("p50_ci_ms"),
                         ((v.get("profile") or {}).get("spread") or {}).get("p50_ci_ms"))
        out += [Change(f"{n} p50", _num(lo.get("p50")), _num(ln.get("p50")), " ms", True, noise),
                Change(f"{n} p99", _num(lo.get("p99")), _num(ln.get("p99")), " ms", True),
                Change(f"{n} peak RSS", _num((o.get("profile") or {}).get("peak_rss_mb")),
                       _num((v.get("profile") or {}).get("peak_rss_mb")), " MB", True)]
        if n != "fp32":
            out.append(Change(f"{n} speedup", _num(o.get("speedup_vs_fp32")), _num(v.get("speedup_vs_fp32")), "x",
                              False))
        if v.get("accuracy") is not None or o.get("accuracy") is not None:
            out.append(Change(f"{n} accuracy", _num(o.get("accuracy")), _num(v.get("accuracy")), "", False))
    return [c for c in out if c.old is not None or c.new is not None]


def changes(old: Mapping[str, Any], new: Mapping[str, Any], old_name: str, new_name: str) -> tuple[str, list[Change]]:
    """(kind, the figures of both files); two files of different kinds cannot be compared."""
    ko, kn = kind_of(old, old_name), kind_of(new, new_name)
    if ko != kn:
        raise InputError(f"{old_name} is a {ko} and {new_name} a {kn}: compare two profiles or two run reports")
    return ko, (profile_changes(old, new) if ko == "profile" else run_changes(old, new))


def parse_limit(text: str) -> float:
    """"5%" or "0.05" -> 0.05; ValueError for anything else or a negative limit."""
    t = text.strip()
    value = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    if not value >= 0:
        raise ValueError(text)
    return value
