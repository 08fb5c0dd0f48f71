"""The prune stage: structural pruning and/or sparsity masks, then label-free recovery, with fidelity
measured before and after. `compress prune` and `compress run --prune` both go through here.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from torch import nn

from compress.evaluate import fidelity, torch_outputs
from compress.models import Prepared
from compress.pruning.allocate import PROBE_SHARE, PROBE_STEPS, ProbeRecovery, allocate
from compress.pruning.options import PruneOptions
from compress.pruning.recover import distill, load_finetune, recalibrate_batchnorm, run_finetune
from compress.pruning.sparsity import apply_sparsity
from compress.pruning.structural import prune_model
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
    if opts.auto:
        return prune_auto(model, inputs, opts, on_stage)
    example, train, held_out = inputs.example, inputs.train, inputs.held_out
    opts.check()
    report: dict[str, Any] = {"structural": None, "sparsity": None, "recovery": None}
    reference = torch_outputs(model, held_out)
    student = model
    protected: list[str] = []
    if opts.ratio is not None:
        kw = {"importance": opts.importance, "ignore": opts.ignore, "round_to": opts.round_to, "calib": train,
              "prune_first_conv": opts.prune_first_conv}
        alloc = None
        if opts.allocation == "measured":
            on_stage(f"measuring where to cut: each block's sensitivity and latency ({opts.ratio:.0%})")
            fit, val = split_validation(train)
            real = opts.recover and opts.real_data
            # probes recover as the stage will (shortened), unless the user's own fine-tuning does it
            share = None if opts.recover_seconds is None else opts.recover_seconds * PROBE_SHARE
            rec = None if opts.finetune else ProbeRecovery(min(PROBE_STEPS, opts.recover_steps), opts.lr, share)
            alloc = allocate(model, example, fit, val or train, ratio=opts.ratio, recalibrate=real, recovery=rec, **kw)
        on_stage(f"pruning {opts.ratio:.0%} of channels ({opts.importance})")
        ratios = alloc.ratios if alloc is not None and alloc.ratios else None  # no blocks found: the uniform cut
        res = prune_model(model, example, ratio=0.0 if ratios else opts.ratio, ratios=ratios,
                          global_pruning=opts.global_pruning, **kw)
        res.ratio = opts.ratio
        student, protected = res.module, list(res.protected)
        report["structural"] = res.to_json()
        if alloc is not None:
            report["structural"]["allocation"] = alloc.to_json()
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


def prune_auto(model: nn.Module, inputs: Prepared, opts: PruneOptions,
               on_stage: Callable[[str], None] = lambda s: None) -> tuple[nn.Module, PruneResult]:
    """--prune auto: the largest ratio in (0, max_ratio] whose pruned and recovered model keeps its held-out
    fidelity loss within `tolerance`, by bisection over `probes` full prune+recover runs (each gets an equal share
    of recover_seconds, so the whole search costs what one recovery was given). The probe itself is the result:
    nothing is pruned twice. When no probe fits, the smallest one is returned, to be judged (and refused) like any
    cut that misses. The probes go into the result's `auto`."""
    lo, hi = 0.0, opts.max_ratio
    share = None if opts.recover_seconds is None else opts.recover_seconds / opts.probes
    probes: list[dict[str, Any]] = []
    best: tuple[nn.Module, PruneResult] | None = None
    smallest: tuple[nn.Module, PruneResult] | None = None
    for k in range(opts.probes):
        ratio = round((lo + hi) / 2 if k else hi / 2, 4)
        on_stage(f"--prune auto: probe {k + 1}/{opts.probes}, ratio {ratio:.0%}")
        probe = opts.model_copy(update={"auto": False, "ratio": ratio, "recover_seconds": share})
        t0 = time.perf_counter()
        got = prune_stage(model, inputs, probe, on_stage)
        loss = got[1].fidelity.loss()
        within = loss <= opts.tolerance
        probes.append({"ratio": ratio, "loss": loss if loss != float("inf") else None, "within": within,
                       "seconds": round(time.perf_counter() - t0, 1)})
        if within:
            lo, best = ratio, got
        else:
            hi, smallest = ratio, got  # misses only ever move down: this is the smallest so far
    module, result = best if best is not None else smallest  # type: ignore[misc]
    result.auto = {"tolerance": opts.tolerance, "max_ratio": opts.max_ratio, "probes": probes,
                   "chosen": lo if best is not None else None}
    return module, result
