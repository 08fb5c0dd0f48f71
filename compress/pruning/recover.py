"""Recovery after compression without labels: a short distillation from the uncompressed model, or the user's own
fine-tuning function (`--finetune file.py:fn` / `module:fn`).

There are no labels on the calibration set, so the only target available is what the original model itself
outputs; distillation pulls the compressed student back towards it. Both models stay in eval() mode throughout
distillation: dropout must not fire, and BatchNorm statistics must not drift with each small batch.

Before that, `recalibrate_batchnorm` re-estimates BatchNorm running statistics once, on the real calibration
samples: removing channels changes the mean and variance of what every following BatchNorm sees, and its old
statistics then mis-normalise. Measured on the shipped trained demo (compress.zoo:shapes_resnet): 25% of
channels pruned, held-out accuracy 51% -> 96% from re-estimation alone; 50%: 10% -> 37%, and 66% after
distillation. On random inputs (no --calib) it would fit the statistics to noise, so it runs on real data only.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from compress.core import ModelError, UsageError
from compress.core import first_line as _first_line
from compress.models import load_option_function
from compress.pruning.structural import main_blocks
from export import flatten_outputs

Batch = Mapping[str, Any]
# Augmented distillation's schedule: the learning rate rises over the first WARMUP_STEPS steps (without it, a peak
# of 6e-3 diverged in 400 steps on the demo pruned 50%; with it, it trained), and early stopping waits until
# EARLY_STOP_AFTER of the budget has passed: at the peak rate the validation loss wanders, and stopping then kept
# a checkpoint from before the decay that brings the gains (50% pruned, 1024 samples: stopped at 40 s of 110,
# 88.9% held-out; waiting, 94.0%). A validation loss over twice the best is no wandering: that stops earlier.
WARMUP_STEPS = 100
EARLY_STOP_AFTER = 0.5
# A plateau does not stop training at once: the learning rate is then taken down the rest of its cosine within
# ANNEAL of the budget (or what is left of it), and training stops there. Stopping at the plateau kept a
# student trained at half its peak rate: the demo pruned 50% uniformly (AVX2 kernels, 256 samples) scored 89.84%
# held-out with a 120 s budget (stopped at 59 s) against 92.97% with 60 s (decayed to the end).
ANNEAL = 0.2
# A student farther than FAR (loss over the teacher's variance) learns the block outputs too (hints, whose 1x1 maps
# start at zero) at FAR_LR times the learning rate. On the demo (60 s, 256 samples, 2-vCPU Xeon, seeds 1 and 2),
# held-out accuracy, 1x against 3x: 25% uniform (loss 0.34) 95.9/96.7% vs 96.9/96.5%; 50% (0.84; 1.7x against
# 3x) 91.6/90.4% vs 92.8/91.2%. A close student wants the lower rate: the demo's measured 25% cut (0.15) 97.9/98.2% at 1x,
# 97.7/97.3% at 3x.
FAR = 0.3
FAR_LR = 3.0
FINETUNE_FORMS = "path/to/file.py:fn or package.module:fn, where fn(model, calib_batches) returns a model or None"


def _merged(batches: Sequence[Batch], size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Calibration batches joined into batches of up to `size` samples where their shapes allow: BatchNorm in
    train mode needs more than one value per channel, and batch-1 samples of a net pooled to 1x1 have one."""
    feeds = [_to_tensors(b) for b in batches]
    out: list[dict[str, torch.Tensor]] = []
    group: list[dict[str, torch.Tensor]] = []

    def flush() -> None:
        if group:
            out.append({k: torch.cat([g[k] for g in group]) for k in group[0]})
            group.clear()

    for f in feeds:
        fits = group and all(k in f and f[k].shape[1:] == v.shape[1:] for k, v in group[0].items()) and len(f) == len(group[0])
        if group and (not fits or sum(next(iter(g.values())).shape[0] for g in group) >= size):
            flush()
        group.append(f)
    flush()
    return out


def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Batch]) -> dict[str, Any]:
    """Reset every BatchNorm's running mean/var and re-estimate them as a plain average over `batches`.

    Only the BatchNorm layers run in train mode (dropout and everything else stay in eval); no weight changes.
    If the statistics cannot be estimated (a BatchNorm that sees one value per channel), the old ones are put
    back and the result says why. Returns {"layers", "samples"} (and "skipped" with the reason).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return {"layers": 0, "samples": 0}
    was_training = model.training
    saved = [(m.momentum, m.training) for m in bns]
    stats = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    model.eval()
    samples = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts equally
            m.train()
        with torch.no_grad():
            for feeds in _merged(batches):
                model(**feeds)
                samples += int(next(iter(feeds.values())).shape[0])
    except Exception as e:
        for m, st in zip(bns, stats):
            m.load_state_dict(st)
        return {"layers": 0, "samples": 0, "skipped": f"{type(e).__name__}: {_first_line(e)}"}
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return {"layers": len(bns), "samples": samples}


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Batch],
    *,
    steps: int = 200,
    lr: float = 1e-4,
    time_budget_s: float | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    seed: int = 0,
    augment: bool = False,
    validation: Sequence[Batch] | None = None,
    eval_every: int = 50,
    patience: int = 8,
) -> dict[str, Any]:
    """Train `student` in place to reproduce `teacher`'s outputs on `batches` (Adam, MSE, variance-normalised).

    The loss sums, over the flattened outputs, MSE(student, teacher) / var(teacher output): outputs on different
    scales (logits next to hidden states) then weigh alike, and the figure reads as a fraction of the teacher's
    own variance. Stops after `steps` optimizer steps or before a step that would overrun `time_budget_s` (the
    first step always runs). `after_step(student)` runs after every optimizer step (sparsity re-applies its masks
    there); `on_step(step, loss)` reports progress. The teacher is only ever run under no_grad and is left as it
    was. If a forward fails or the loss stops being finite, the student's weights are restored and ModelError is
    raised.

    The loss over all calibration batches is measured before and after; if training raised it (a learning rate
    too high for a student that was already close), the weights from before are put back and the result says
    "restored": True. Distillation therefore never leaves the student worse on the data it saw.
    Returns steps, seconds, loss_first / loss_last (of the first and last step's batch), lr, stopped ("steps",
    "time_budget" or "early"), loss_before / loss_after (all batches), restored, and annealed_from (step and
    seconds where a plateau started the rate's final decay) when one did.

    A few hundred calibration samples are soon learnt by heart: on compress.zoo:shapes_resnet pruned 50%, the
    loss on them fell to 0.0006 while held-out accuracy stayed at 63% (fp32: 98.6%). So, for real data:
    `augment` shows each step a new view of its batch (images: flips, shifts, noise and mixes of two samples;
    token ids: some replaced by others of the batch), with the teacher's outputs computed on that view (the
    labels come from the teacher, so any view is labelled); the learning rate decays (cosine) over the time
    budget after a warm-up (WARMUP_STEPS), and starts lower for a student already close to its teacher (lr x
    loss_before / 0.5, between 0.3x and 1x: at 25% pruned, loss 0.09, lr 1e-3 ended at 97.1% held-out accuracy
    and 3e-4 at 97.9%) and higher for one far from it (FAR_LR); and with `validation` batches (not trained on)
    the student is checked every `eval_every` steps, the best weights are kept and training stops after
    `patience` checks without improvement (with augmentation, from EARLY_STOP_AFTER of the budget on, and only
    after the rate's decay is finished within ANNEAL of the budget). The
    result then holds "curve": [[seconds, validation loss, validation top-1 agreement or None], ...]. Measured by bench/prune_recovery.py (2-vCPU Xeon with AVX-512 VNNI, 256 samples, 60 s, with the
    feature hints of _FeatureHints): held-out accuracy 66.0% -> 91.4% at 50% pruned, 97.5% -> 98.1% at 25%.
    """
    _check_args(student, teacher, batches, steps, lr, time_budget_s)
    feeds = [_to_tensors(b) for b in (_merged(batches) if augment else batches)]
    plan = _Plan(augment, [_to_tensors(b) for b in validation] if validation else [], eval_every, patience)
    snapshot = {k: v.detach().clone() for k, v in student.state_dict().items()}
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), channels_last(student, teacher):
            torch.manual_seed(seed)
            return _train(student, teacher, feeds, snapshot, steps, lr, time_budget_s, after_step, on_step, seed, plan)
    except BaseException:
        student.load_state_dict(snapshot)
        raise
    finally:
        student.train(modes[0])
        teacher.train(modes[1])


@contextlib.contextmanager
def channels_last(*models: nn.Module) -> Iterator[None]:
    """Conv weights in channels-last layout while the block runs, as they were afterwards (the teacher is the
    user's model). With the weights channels-last, torch's CPU convolutions run channels-last whatever the
    inputs' layout: on compress.zoo:shapes_resnet pruned 50% (batch 192, 2 threads, 2-vCPU Xeon) the teacher's
    forward 70 -> 37 ms and the student's forward+backward 58 -> 43 ms; with AVX2 kernels 83 -> 47 and 78 -> 56
    ms. Distillation's steps are paid in a time budget, so that is ~1.5x the steps."""
    changed: list[torch.Tensor] = []
    for m in models:
        for p in itertools.chain(m.parameters(), m.buffers()):
            if p.ndim == 4 and p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.contiguous(memory_format=torch.channels_last)
                changed.append(p)
    try:
        yield
    finally:
        for p in changed:
            p.data = p.data.contiguous()


def _check_args(student: nn.Module, teacher: nn.Module, batches: Sequence[Batch], steps: int, lr: float,
                time_budget_s: float | None) -> None:
    if not batches:
        raise UsageError("distillation needs at least one calibration batch")
    if steps < 1:
        raise UsageError(f"distillation steps must be at least 1 (got {steps})")
    if not (np.isfinite(lr) and lr > 0):
        raise UsageError(f"distillation learning rate must be a positive number (got {lr})")
    if time_budget_s is not None and not time_budget_s > 0:
        raise UsageError(f"distillation time budget must be positive seconds (got {time_budget_s})")
    # Training a student that shares storage with the teacher would train the teacher too.
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    if student is teacher or any(p.data_ptr() in teacher_ptrs for p in student.parameters()):
        raise UsageError("the student shares weights with the teacher; distil into a copy (copy.deepcopy)")
    if not any(p.requires_grad for p in student.parameters()):
        raise ModelError("the student has no trainable parameters to distil into")


def _to_tensors(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


class _FeatureHints:
    """Distillation on intermediate features too (FitNets' hints): the outputs of the model's main blocks (the
    children of its longest nn.Sequential/nn.ModuleList, at most 8, spread evenly) are matched through a learned
    1x1 map from the student's width to the teacher's (pruning changed the widths; the maps are thrown away
    afterwards). Measured on compress.zoo:shapes_resnet pruned 50% (256 samples, 60 s, 2-vCPU Xeon): held-out
    accuracy 87-88% on outputs alone, 91.8% with the hints."""

    def __init__(self, student: nn.Module, teacher: nn.Module, feed: dict[str, torch.Tensor]) -> None:
        self.names = _block_names(teacher)
        self.got: dict[str, torch.Tensor] = {}
        self.handles = []
        for side, model in (("s", student), ("t", teacher)):
            for n in self.names:
                self.handles.append(model.get_submodule(n).register_forward_hook(self._keep(side + n)))
        with torch.no_grad():
            student(**feed)
            teacher(**feed)
        self.maps = nn.ModuleDict()
        for i, n in enumerate(self.names):
            s_out, t_out = self.got.get("s" + n), self.got.get("t" + n)
            if s_out is None or t_out is None or s_out.ndim not in (3, 4) or s_out.shape[0] != t_out.shape[0]:
                continue
            if s_out.ndim == 4 and s_out.shape[2:] == t_out.shape[2:]:
                m: nn.Module = nn.Conv2d(s_out.shape[1], t_out.shape[1], 1, bias=False)
            elif s_out.ndim == 3 and s_out.shape[:2] == t_out.shape[:2]:
                m = nn.Linear(s_out.shape[2], t_out.shape[2], bias=False)
            else:
                continue
            nn.init.zeros_(m.weight)
            self.maps[str(i)] = m
        self.got.clear()

    def _keep(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self.got[key] = out
        return hook

    def teacher_features(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.got.items() if k.startswith("t")}

    def loss(self, teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        for i, m in self.maps.items():
            n = self.names[int(i)]
            s_out, t_out = self.got.get("s" + n), teacher_feats.get("t" + n)
            if s_out is None or t_out is None:
                continue
            var = float(t_out.var()) or 1.0
            total = total + torch.mean((m(s_out.float()) - t_out.float()) ** 2) / var
        return total

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.got.clear()


def _block_names(model: nn.Module, most: int = 8) -> list[str]:
    """The model's main blocks (structural.main_blocks), at most `most`, spread evenly."""
    best = main_blocks(model)
    if len(best) > most:
        best = [best[round(i * (len(best) - 1) / (most - 1))] for i in range(most)]
    return best


class _Plan:
    """How `distill` trains beyond plain steps: augmented views, and early stopping on validation batches."""

    def __init__(self, augment: bool, validation: list[dict[str, torch.Tensor]], eval_every: int, patience: int) -> None:
        self.augment, self.validation, self.eval_every, self.patience = augment, validation, max(1, eval_every), patience


def _train(student: nn.Module, teacher: nn.Module, feeds: list[dict[str, torch.Tensor]],
           snapshot: dict[str, torch.Tensor], steps: int, lr: float, time_budget_s: float | None,
           after_step: Callable[[nn.Module], None] | None, on_step: Callable[[int, float], None] | None,
           seed: int, plan: _Plan) -> dict[str, Any]:
    start = time.perf_counter()
    targets = _teacher_targets(teacher, feeds)
    weights = _output_weights(targets)
    val_targets = _teacher_targets(teacher, plan.validation) if plan.validation else []
    eval_start = time.perf_counter()
    loss_before = _calib_loss(student, feeds, targets, weights)
    eval_s = time.perf_counter() - eval_start  # the final check costs as much; the budget must leave room for it
    if not np.isfinite(loss_before):
        raise ModelError(f"the student's outputs are not finite before distillation (loss {loss_before}); check its weights")
    hints = None
    if plan.augment:  # a student that starts close to its teacher is only disturbed by large steps and hints
        far = loss_before > FAR
        lr = lr * min(1.0, max(0.3, loss_before / 0.5)) * (FAR_LR if far else 1.0)
        # hints for a student far from its teacher only: 50% pruned (loss 0.84) gained 4-5 points with them, 25%
        # pruned (loss 0.09) lost 0.8-1.2 (2-vCPU Xeon, 60 s)
        hints = _FeatureHints(student, teacher, feeds[0]) if far else None
    try:
        return _fit(student, teacher, feeds, targets, weights, val_targets, snapshot, steps, lr, time_budget_s,
                    after_step, on_step, seed, plan, hints, start, loss_before, eval_s)
    finally:
        if hints is not None:
            hints.close()


def _fit(student: nn.Module, teacher: nn.Module, feeds: list[dict[str, torch.Tensor]], targets: list[list[torch.Tensor]],
         weights: list[float], val_targets: list[list[torch.Tensor]], snapshot: dict[str, torch.Tensor], steps: int,
         lr: float, time_budget_s: float | None, after_step: Callable[[nn.Module], None] | None,
         on_step: Callable[[int, float], None] | None, seed: int, plan: _Plan, hints: _FeatureHints | None,
         start: float, loss_before: float, eval_s: float) -> dict[str, Any]:
    params = [p for p in student.parameters() if p.requires_grad]
    if hints is not None:
        params += list(hints.maps.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    order = _batch_order(len(feeds), seed)
    gen = torch.Generator().manual_seed(seed)
    loss_first = loss_last = None
    done, stopped, last_step_s = 0, "steps", 0.0
    curve: list[list[Any]] = []
    best: tuple[float, dict[str, torch.Tensor] | None] = (float("inf"), None)
    if val_targets:
        best = (_validate(student, plan.validation, val_targets, weights, curve, 0.0), None)
    stale = 0
    squeeze: tuple[float, float, int, float, int] | None = None  # the decay's rest, from a plateau (see ANNEAL)
    while done < steps:
        now = time.perf_counter()
        if time_budget_s is not None and done > 0 and (now - start) + last_step_s + eval_s > time_budget_s:
            stopped = "time_budget"
            break
        if plan.augment:  # cosine decay over whichever ends first, the steps or the time budget
            frac = done / steps if time_budget_s is None else max(done / steps, (now - start) / time_budget_s)
            if squeeze is not None:
                f0, t0, d0, span_s, span_steps = squeeze
                frac = f0 + (1.0 - f0) * max((now - t0) / span_s if span_s > 0 else 0.0, (done - d0) / span_steps)
                if frac >= 1.0:
                    stopped = "early"
                    break
            warm = min(1.0, (done + 1) / WARMUP_STEPS)
            for group in opt.param_groups:
                group["lr"] = warm * lr * 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, frac))))
        i = next(order)
        feed, target = feeds[i], targets[i]
        t_feats: dict[str, torch.Tensor] = {}
        if plan.augment:
            feed = augment_batch(feed, gen)
            target = _teacher_targets(teacher, [feed])[0]
            t_feats = hints.teacher_features() if hints is not None else {}
        loss = _loss(student, feed, target, weights, i)
        if hints is not None and t_feats:
            loss = loss + hints.loss(t_feats)
        value = float(loss.detach())
        if not np.isfinite(value):
            raise ModelError(f"distillation diverged at step {done + 1}: the loss is {value} (lower the learning rate, now {lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(student)
        done += 1
        loss_first = value if loss_first is None else loss_first
        loss_last = value
        if on_step is not None:
            on_step(done, value)
        if val_targets and done % plan.eval_every == 0:
            v = _validate(student, plan.validation, val_targets, weights, curve, time.perf_counter() - start)
            if v < best[0]:
                best, stale = (v, {k: t.detach().clone() for k, t in student.state_dict().items()}), 0
            else:
                stale += 1
                if stale >= plan.patience:
                    if not plan.augment or v > 2 * best[0]:
                        stopped = "early"  # no schedule to finish, or a climb rather than a plateau
                        break
                    if squeeze is None and frac >= EARLY_STOP_AFTER:
                        # a plateau: the rest of the decay, in ANNEAL of the budget (or what is left of it), then stop
                        t = time.perf_counter()
                        left_s = 0.0 if time_budget_s is None else max(time_budget_s - (t - start), 0.0)
                        squeeze = (frac, t, done, min(left_s, ANNEAL * time_budget_s) if time_budget_s else 0.0,
                                   max(1, min(steps - done, int(ANNEAL * steps))))
                        stale = 0
        last_step_s = time.perf_counter() - now
    start_kept = False
    if val_targets:
        v = _validate(student, plan.validation, val_targets, weights, curve, time.perf_counter() - start)
        if v >= best[0]:
            student.load_state_dict(best[1] if best[1] is not None else snapshot)
            start_kept = best[1] is None  # no checkpoint beat the starting weights
    _check_finite_weights(student, done)
    loss_after = _calib_loss(student, feeds, targets, weights)
    if not np.isfinite(loss_after):
        raise ModelError(f"distillation diverged: the loss after {done} steps is {loss_after} (lower the learning rate, now {lr:g})")
    # with validation, the best checkpoint decided (the starting weights among them)
    restored = start_kept or (loss_after > loss_before and not val_targets)
    if restored:  # training made it worse (lr too high for an already close student): keep what we had
        student.load_state_dict(snapshot)
    out = {"steps": done, "seconds": round(time.perf_counter() - start, 3), "loss_first": loss_first,
           "loss_last": loss_last, "lr": lr, "stopped": stopped, "loss_before": loss_before,
           "loss_after": loss_before if restored else loss_after, "restored": restored}
    if squeeze is not None:
        out["annealed_from"] = {"step": squeeze[2], "seconds": round(squeeze[1] - start, 2)}
    if plan.augment or val_targets:
        out.update(augmented=plan.augment, validation_samples=sum(_rows(f) for f in plan.validation), curve=curve,
                   feature_hints=[hints.names[int(k)] for k in hints.maps] if hints is not None else [])
    return out


def _rows(feed: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0


def _validate(student: nn.Module, feeds: list[dict[str, torch.Tensor]], targets: list[list[torch.Tensor]],
              weights: list[float], curve: list[list[Any]], seconds: float) -> float:
    """The loss on the validation batches (as _calib_loss gives it), appended to `curve` with the top-1 agreement
    of a classifier's output; one forward pass per batch serves both."""
    with torch.no_grad():
        outs = [_student_outputs(student, f, t, i) for i, (f, t) in enumerate(zip(feeds, targets))]
        loss = float(np.mean([float(_mse(o, t, weights)) for o, t in zip(outs, targets)]))
    agree = None
    if all(o and o[0].ndim == 2 and o[0].shape[1] > 1 for o in outs):
        hits = sum(int((o[0].argmax(1) == t[0].argmax(1)).sum()) for o, t in zip(outs, targets))
        agree = round(hits / max(1, sum(int(o[0].shape[0]) for o in outs)), 4)
    curve.append([round(seconds, 2), round(loss, 6), agree])
    return loss


def augment_batch(feed: Mapping[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A new view of a batch, for distillation (the teacher labels it, so it need not keep any label).

    Float images (N, C, H, W with H, W >= 8): random horizontal flips, a shift of up to 1/10 of the side
    (reflect-padded), Gaussian noise at 10% of the batch's std, and each sample mixed with another by up to half.
    Token ids (an integer `*input_ids`, N x L): about 10% of the positions replaced by ids drawn from the same
    batch (only where ids are not 0, so padding stays padding). Other float inputs get the noise; other integer
    inputs (masks, position and token-type ids) are left as they are."""
    out = dict(feed)
    for k, x in feed.items():
        n = int(x.shape[0]) if x.ndim else 0
        if n == 0:
            continue
        if x.is_floating_point() and x.ndim == 4 and min(x.shape[2:]) >= 8:
            flip = torch.rand(n, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            pad = max(1, min(x.shape[2:]) // 10)
            xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
            i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
            x = xp[:, :, i:i + x.shape[2], j:j + x.shape[3]]
            x = x + 0.1 * x.std() * torch.randn(x.shape, generator=gen)
            lam = (torch.rand(n, generator=gen) * 0.5).reshape(n, 1, 1, 1)
            x = (1 - lam) * x + lam * x[torch.randperm(n, generator=gen)]
        elif x.is_floating_point():
            x = x + 0.05 * x.std() * torch.randn(x.shape, generator=gen) if x.numel() > 1 else x
        elif x.ndim == 2 and k.endswith("input_ids"):  # not position or token-type ids
            swap = (torch.rand(x.shape, generator=gen) < 0.1) & (x != 0)
            pool = x[x != 0]
            if pool.numel():
                x = torch.where(swap, pool[torch.randint(0, pool.numel(), x.shape, generator=gen)], x)
        out[k] = x.contiguous()
    return out


def _calib_loss(student: nn.Module, feeds: list[dict[str, torch.Tensor]], targets: list[list[torch.Tensor]],
                weights: list[float]) -> float:
    """The loss over every calibration batch: per-step losses are one batch each and too noisy to compare."""
    with torch.no_grad():
        return float(np.mean([float(_loss(student, f, t, weights, i)) for i, (f, t) in enumerate(zip(feeds, targets))]))


def _teacher_targets(teacher: nn.Module, feeds: list[dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The teacher's outputs, computed once: it is frozen and the batches repeat, so steps only run the student."""
    targets = []
    with torch.no_grad():
        for i, f in enumerate(feeds):
            try:
                out = teacher(**f)
            except Exception as e:
                raise ModelError(f"the teacher's forward() failed on calibration batch {i}: {type(e).__name__}: {_first_line(e)}") from e
            targets.append([t.detach().float() for _, t in flatten_outputs(out) if t.is_floating_point()])
            if not targets[-1]:
                raise ModelError("the teacher returns no floating-point outputs to distil")
    return targets


def _output_weights(targets: list[list[torch.Tensor]]) -> list[float]:
    """1 / variance of each teacher output over all batches; 1.0 for a constant output (nothing to scale by)."""
    weights = []
    for k in range(len(targets[0])):
        flat = torch.cat([t[k].reshape(-1) for t in targets]).double()
        var = float(flat.var(unbiased=False)) if flat.numel() > 1 else 0.0
        weights.append(1.0 / var if np.isfinite(var) and var > 1e-12 else 1.0)
    return weights


def _batch_order(n: int, seed: int) -> Iterator[int]:
    """Cycle over the batches, reshuffled (seeded) each pass so no batch always comes last before stopping."""
    gen = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        yield from torch.randperm(n, generator=gen).tolist()


def _loss(student: nn.Module, feed: dict[str, torch.Tensor], target: list[torch.Tensor], weights: list[float],
          i: int) -> torch.Tensor:
    return _mse(_student_outputs(student, feed, target, i), target, weights)


def _student_outputs(student: nn.Module, feed: dict[str, torch.Tensor], target: list[torch.Tensor],
                     i: int) -> list[torch.Tensor]:
    """The student's float outputs on one batch, checked against the teacher's shapes."""
    try:
        out = student(**feed)
    except Exception as e:
        raise ModelError(f"the student's forward() failed on calibration batch {i}: {type(e).__name__}: {_first_line(e)}") from e
    got = [t for _, t in flatten_outputs(out) if t.is_floating_point()]
    if len(got) != len(target) or any(g.shape != t.shape for g, t in zip(got, target)):
        raise ModelError(f"the student's outputs {[list(g.shape) for g in got]} do not match the teacher's {[list(t.shape) for t in target]}")
    return got


def _mse(got: list[torch.Tensor], target: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * torch.mean((g.float() - t) ** 2) for g, t, w in zip(got, target, weights))


def _check_finite_weights(student: nn.Module, steps: int) -> None:
    """The last step's update is never seen by a loss; check it did not leave NaN/inf weights behind."""
    bad = [n for n, p in student.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(f"distillation left non-finite weights after step {steps} (in {bad[0]}); lower the learning rate")


def load_finetune(spec: str) -> Callable[..., Any]:
    """Import the `--finetune` function from `file.py:fn` or `package.module:fn`, as MODEL factories are imported."""
    return load_option_function(spec, "--finetune", FINETUNE_FORMS)


def run_finetune(fn: Callable[..., Any], model: nn.Module, batches: Sequence[Batch]) -> nn.Module:
    """Call fn(model, batches); its model (or `model` itself, trained in place, when it returns None), in eval mode.

    A user's training loop may leave the model in train mode; everything after this (fidelity, export) expects
    eval, so it is set here.
    """
    name = getattr(fn, "__name__", "fn")
    try:
        result = fn(model, batches)
    except Exception as e:
        raise ModelError(f"finetune {name} raised {type(e).__name__}: {_first_line(e)}") from e
    if result is None:
        result = model
    if not isinstance(result, nn.Module):
        raise ModelError(f"finetune {name} returned {type(result).__name__}; it must return a torch.nn.Module or None (trained in place)")
    bad = [n for n, p in result.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(f"finetune {name} left non-finite weights (in {bad[0]})")
    return result.eval()
