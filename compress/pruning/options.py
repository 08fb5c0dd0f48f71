"""The options of the prune stage, one set for `compress prune`, `compress run --prune` and the search: the CLI
reads its defaults from here."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from compress.core import Options, UsageError

ALLOCATIONS = ("uniform", "measured")


class PruneOptions(Options):
    ratio: Optional[float] = None  # structural: fraction of channels removed
    # "uniform": `ratio` of every block's channels; "measured": per-block ratios that save the time the uniform cut
    # saves, where measured sensitivity is lowest (compress.pruning.allocate)
    allocation: str = "uniform"
    importance: str = "l2"
    global_pruning: bool = False
    ignore: list[str] = Field(default_factory=list)
    prune_first_conv: bool = False  # structural.prune_model: the first convolution is kept unless this is set
    round_to: Optional[int] = None
    sparsity: Optional[float] = None  # masks: fraction of weights zeroed
    pattern: str = "unstructured"
    recover: bool = True
    # distillation runs until the time budget, early stopping (no gain on its validation batches in 8 checks) or
    # the steps, whichever comes first: on the demo (compress.zoo:shapes_resnet, 256 samples, 2-vCPU Xeon,
    # bench/prune_recovery.py) 25% and 50% pruned both still gained at 60 s; with 2048 samples and 110 s, 50%
    # stopped early at 88 s
    recover_steps: int = 20000
    recover_seconds: Optional[float] = 60.0
    lr: float = 1e-3  # distillation: scaled by how far the student starts from its teacher (recover.distill)
    finetune: Optional[str] = None  # file.py:fn or module:fn, run instead of the built-in distillation
    real_data: bool = True  # the tuning batches are real samples (--calib): BatchNorm statistics may be re-estimated
    # --prune auto: bisect the ratio in (0, max_ratio] for the largest cut whose fidelity to the unpruned model
    # stays within `tolerance`, in `probes` pruned-and-recovered models sharing recover_seconds
    auto: bool = False
    max_ratio: float = 0.75
    tolerance: float = 0.01
    probes: int = 4

    def check(self, ratio_flag: str = "--ratio") -> None:
        """Validate; `ratio_flag` is the option that set `ratio`, so the message names what the user typed."""
        if self.ratio is None and self.sparsity is None:
            raise UsageError(f"give {ratio_flag} (structural pruning) and/or --sparsity (weight masks)")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise UsageError(f"{ratio_flag} {self.ratio}: must be between 0 and 1 (exclusive)")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise UsageError(f"--sparsity {self.sparsity}: must be between 0 and 1 (exclusive)")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation {self.allocation!r}: one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "measured" and self.global_pruning:
            raise UsageError("--allocation measured chooses a ratio per block: it does not combine with --global")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to}: must be 1 or more")
