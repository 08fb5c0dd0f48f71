"""The settings of `compress search`: the CLI reads its defaults from here."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from compress.core import Options, UsageError
from compress.data import DataOptions
from compress.pruning import PruneOptions


class SearchSettings(Options):
    model: str
    device: str = "host"
    weights: Optional[str] = None
    input_shapes: list[str] = Field(default_factory=list)
    calib: Optional[str] = None
    max_calib: Optional[int] = None
    data: DataOptions = Field(default_factory=DataOptions)  # how --calib/--eval that is not an .npz becomes inputs
    latency_budget_ms: Optional[float] = None
    min_fidelity: Optional[float] = None  # on top-1 agreement (classifiers) or the worst cosine
    max_accuracy_drop: Optional[float] = None  # with --eval: the score may drop this much
    eval_spec: Optional[str] = None
    metric_spec: Optional[str] = None
    objective: Optional[str] = None  # "fidelity" (within the budget) or "speed" (above the floor); None: by budget
    trials: int = 12
    seed: int = 0
    address: Optional[str] = None
    concurrency: int = 1
    runs: Optional[int] = None
    ab_rounds: int = 30
    prune_max: float = 0.6
    quants: Optional[list[str]] = None
    recover_seconds: float = PruneOptions.default("recover_seconds")  # the prune stage's default
    outdir: str = "search-out"
    resume: bool = False
    command: str = ""

    def tolerance(self) -> float:
        """The run tolerance each trial uses: its variants are 'within tolerance' exactly when they meet the floor."""
        if self.eval_spec:
            return float(self.max_accuracy_drop if self.max_accuracy_drop is not None else 0.01)
        return 1.0 - float(self.min_fidelity if self.min_fidelity is not None else 0.99)

    def goal(self) -> str:
        """With a latency budget, the most faithful model within it; without one, the fastest above the floor
        (what compress run recommends)."""
        return self.objective or ("fidelity" if self.latency_budget_ms is not None else "speed")

    def check(self) -> None:
        if self.objective not in (None, "fidelity", "speed"):
            raise UsageError(f"--objective {self.objective}: fidelity or speed")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise UsageError(f"--latency-budget {self.latency_budget_ms:g}: must be > 0 ms")
        if self.min_fidelity is not None and not 0.0 < self.min_fidelity <= 1.0:
            raise UsageError(f"--min-fidelity {self.min_fidelity:g}: must be in (0, 1]")
        if self.max_accuracy_drop is not None and not self.eval_spec:
            raise UsageError("--max-accuracy-drop bounds the drop of an --eval score: give --eval with it")
        if self.eval_spec and self.min_fidelity is not None:
            raise UsageError("--min-fidelity and --eval/--max-accuracy-drop set the same floor: pass one")
        if self.trials < 1:
            raise UsageError(f"--trials {self.trials}: at least 1")
        if self.concurrency < 1:
            raise UsageError(f"--concurrency {self.concurrency}: at least 1")
