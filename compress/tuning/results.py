"""search.json and sweep.json as typed models: what `compress search` / `compress sweep` (and compress.search /
compress.sweep) hand back, checked where they are built and published as JSON Schemas beside report.json's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from compress.core import Result

SEARCH_SCHEMA = "edge-compress/search/1"
SWEEP_SCHEMA = "edge-compress/sweep/1"
SEARCH_SCHEMA_FILE = Path(__file__).with_name("search.schema.json")
SWEEP_SCHEMA_FILE = Path(__file__).with_name("sweep.schema.json")


class Trial(Result):
    """One Ray Tune trial (one `compress run`): done, stopped early (hopeless), or crashed with its error."""

    id: str
    config: dict[str, Any]
    label: str
    status: Literal["done", "stopped early", "crashed"]
    fidelity: Optional[float] = None
    p50_ms: Optional[float] = None
    speedup: Optional[float] = None
    score: Optional[float] = None
    seconds: Optional[float] = None
    report: Optional[str] = None  # the trial's report.json
    profiled_on: Optional[Any] = None  # the Ray node that timed it
    error: Optional[str] = None
    why: Optional[str] = None


class Candidate(Result):
    """One measured variant of one trial, as the Pareto set and the pick see it."""

    name: str
    trial: Optional[str]
    settings: Optional[str]
    variant: str
    p50_ms: Optional[float]
    speedup_vs_fp32: Optional[float]
    size_bytes: Optional[int]
    fidelity: Optional[dict[str, Any]]
    accuracy: Optional[float]
    pareto: bool


class SearchSummary(Result):
    """search.json: the space, every trial, the candidates with the Pareto set, and the pick (None: no model met
    the budget and floor, `reason` says which)."""

    schema_: Literal["edge-compress/search/1"] = Field(SEARCH_SCHEMA, alias="schema")
    model: str
    device: str
    command: str
    latency_budget_ms: Optional[float]
    floor: Optional[float]
    floor_on: str
    seed: int
    trials_requested: int
    space: dict[str, Any]
    ray: dict[str, Any]
    seconds: float
    objective: str
    algorithm: str
    trials: list[Trial]
    candidates: list[Candidate]
    pareto: list[str]
    recommended: Optional[str]
    recommended_settings: Optional[str]
    reason: str
    best_report: Optional[str] = None  # OUTDIR/best/: the pick's run folder
    best_onnx: Optional[str] = None


class SweepCell(Result):
    """One cell of a sweep (a model x device x settings `compress run`) and, when it finished, what its run
    recommends with that variant's figures and the final variant's (`final`)."""

    id: str
    model: Optional[str]
    device: Optional[str]
    settings: str
    status: Literal["done", "stopped early", "crashed"]
    error: Optional[str]
    report: Optional[str]
    recommended: Optional[str]
    reason: Optional[str] = None
    p50_ms: Optional[float] = None
    speedup_vs_fp32: Optional[float] = None
    fidelity: Optional[dict[str, Any]] = None
    size_bytes: Optional[int] = None
    final: Optional[dict[str, Any]] = None


class SweepSummary(Result):
    """sweep.json: every cell with its status and recommendation."""

    schema_: Literal["edge-compress/sweep/1"] = Field(SWEEP_SCHEMA, alias="schema")
    sweep: str
    command: str
    ray: dict[str, Any]
    seconds: float
    tolerance: float
    cells: list[SweepCell]
