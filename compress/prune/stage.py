"""The prune stage: structural pruning and/or sparsity masks, then label-free recovery, with fidelity
measured before and after. `compress prune` and `compress run --prune` both go through here.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from compress.evaluate import fidelity, torch_outputs
from compress.models import Prepared
from compress.prune.options import PruneOptions
from compress.prune.recover import distill, load_finetune, recalibrate_batchnorm, run_finetune
from compress.prune.sparsity import apply_sparsity
from compress.prune.structural import prune_model
from compress.report import PruneResult


def split_validation(batches: list[Any]) -> tuple[list[Any], list[Any]]:
    """The tuning batches less an eighth (at least one batch, from 4 batches on) that recovery checks itself on
    and never trains on: the held-out batches judge the result, and must not pick the checkpoint too."""
    if len(batches) < 4:
        return batches, []
    k = max(1, len(batches) // 8)
    return batches[:-k], batches[-k:]


def prune_stage(model: nn.Module, inputs: Prepared, opts: PruneOptions,
                on_stage: Callable[[str], None] = lambda s: None) -> tuple[nn.Module, PruneResult]:
    """Return the compressed module and what was done to it; `model` itself is left untouched. `inputs`: the
    example, the batches recovery tunes on (train) and those fidelity is judged on (held_out)."""
    example, train, held_out = inputs.example, inputs.train, inputs.held_out
    opts.check()
    report: dict[str, Any] = {"structural": None, "sparsity": None, "recovery": None}
    reference = torch_outputs(model, held_out)
    student = model
    protected: list[str] = []
    if opts.ratio is not None:
        on_stage(f"pruning {opts.ratio:.0%} of channels ({opts.importance})")
        res = prune_model(model, example, ratio=opts.ratio, importance=opts.importance, global_pruning=opts.global_pruning,
                          ignore=opts.ignore, round_to=opts.round_to, calib=train)
        student, protected = res.module, list(res.protected)
        report["structural"] = res.to_json()
    after_step = None
    if opts.sparsity is not None:
        on_stage(f"masking {opts.sparsity:.0%} of weights ({opts.pattern})")
        sp = apply_sparsity(student, opts.sparsity, opts.pattern, ignore=opts.ignore, protect=protected)
        student = sp.module
        after_step = sp.reapply
        report["sparsity"] = sp.to_json()
    report["fidelity_before_recovery"] = fidelity(reference, torch_outputs(student, held_out))
    if opts.ratio is not None and opts.recover and opts.real_data:
        on_stage("re-estimating BatchNorm statistics on the calibration samples")
        report["batchnorm"] = recalibrate_batchnorm(student, train)
        if report["batchnorm"]["layers"]:
            report["fidelity_after_batchnorm"] = fidelity(reference, torch_outputs(student, held_out))
    if opts.finetune:
        on_stage(f"running {opts.finetune}")
        student = run_finetune(load_finetune(opts.finetune), student, train)
        if after_step is not None:
            after_step(student)
        report["recovery"] = {"method": "finetune", "fn": opts.finetune}
    elif opts.recover:
        on_stage("recovering by distillation from the unpruned model")
        fit, val = split_validation(train)
        stats = distill(student, model, fit, steps=opts.recover_steps, lr=opts.lr, time_budget_s=opts.recover_seconds,
                        after_step=after_step, augment=opts.real_data, validation=val)
        report["recovery"] = {"method": "distillation", **stats}
    student.eval()
    report["fidelity"] = fidelity(reference, torch_outputs(student, held_out))
    return student, PruneResult.from_json(report)
