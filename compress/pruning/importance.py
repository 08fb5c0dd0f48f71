"""Channel importance criteria for structural pruning: one registry, name -> Torch-Pruning scorer.

Every criterion scores a whole DepGraph group (all layers whose channels are removed together), so a channel
is judged by every weight it touches, not only by the layer that happens to be the group's root.

Gradient-based criteria (`taylor`) need gradients of some loss, but pruning runs without labels. The loss used
here (`label_free_loss`) is explained in its docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compress.core import ModelError, UsageError
from compress.core import first_line as _first_line

MAX_GRAD_BATCHES = 16  # scoring is a one-off estimate; its cost grows with every batch (16 x 8 = 128 samples)


class FPGMImportance(tp.importance.FPGMImportance):
    """Torch-Pruning's FPGM (filters nearest the geometric median are redundant), with one fix: for a grouped
    conv's input channels 1.6 calls `.repeat(groups)` on a 2-D tensor and fails; here rows are repeated."""

    @torch.no_grad()
    def __call__(self, group: Any, **kwargs: Any) -> torch.Tensor | None:
        fn = tp.pruner.function
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn = dep.layer, dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)):
                continue
            transposed = getattr(layer, "transposed", False)
            if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                w = (layer.weight.data.transpose(1, 0) if transposed else layer.weight.data)[idxs].flatten(1)
            elif prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
                w = (layer.weight.data if transposed else layer.weight.data.transpose(0, 1)).flatten(1)
                if prune_fn == fn.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    w = w.repeat(layer.groups, 1)
                w = w[idxs]
            else:
                continue  # FPGM looks at filters, not at normalisation layers
            v = w.abs().pow(self.p).unsqueeze(0)
            group_imp.append(torch.cdist(v, v, p=2).squeeze(0).abs().sum(0))
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


@dataclass(frozen=True)
class Criterion:
    """A registered importance criterion."""

    factory: Callable[[], Any]  # returns a torch_pruning importance object (callable on a group)
    needs_gradients: bool
    description: str
    needs_batchnorm: bool = False  # scores come only from BatchNorm layers: useless on a model without them


IMPORTANCE: dict[str, Criterion] = {
    "l1": Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=1), False,
                    "sum of |w| over every weight of the channel's group"),
    "l2": Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=2), False,
                    "sum of w^2 over every weight of the channel's group (the default)"),
    "taylor": Criterion(lambda: tp.importance.GroupTaylorImportance(), True,
                        "first-order Taylor |w * dL/dw| with a label-free loss on the calibration inputs"),
    "fpgm": Criterion(lambda: FPGMImportance(p=2), False,
                      "filters closest to the geometric median of their layer are the most redundant"),
    "lamp": Criterion(lambda: tp.importance.LAMPImportance(p=2), False,
                      "layer-adaptive magnitude (LAMP): w^2 rescaled by the layer's remaining weight mass"),
    "bn_scale": Criterion(lambda: tp.importance.BNScaleImportance(), False,
                          "BatchNorm scale |gamma| (network slimming); only for models with BatchNorm",
                          needs_batchnorm=True),
    "random": Criterion(lambda: tp.importance.RandomImportance(), False,
                        "random scores: the baseline any real criterion must beat"),
}


def known_importances() -> list[str]:
    return list(IMPORTANCE)


def describe_importances() -> list[tuple[str, str]]:
    """(name, description) for every criterion, in registry order, for `--importance list`."""
    return [(name, c.description) for name, c in IMPORTANCE.items()]


def get_criterion(name: str) -> Criterion:
    key = (name or "").strip().lower()
    if key not in IMPORTANCE:
        raise UsageError(f"--importance {name!r}: unknown criterion; one of {', '.join(IMPORTANCE)}")
    return IMPORTANCE[key]


def get_importance(name: str) -> Any:
    """A fresh torch_pruning importance object for criterion `name`; UsageError naming the known ones."""
    return get_criterion(name).factory()


def check_applicable(name: str, model: nn.Module) -> None:
    """Refuse criteria that would score nothing on this model (bn_scale without BatchNorm prunes nothing)."""
    crit = get_criterion(name)
    if crit.needs_batchnorm and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UsageError(f"--importance {name}: the model has no BatchNorm layers to score; use l2, l1, taylor, fpgm or lamp")


def _named_tensors(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Float tensors of a forward() result with their key paths (HF ModelOutput keys, tuple indices)."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)] if out.is_floating_point() and out.requires_grad else []
    if isinstance(out, Mapping) or (hasattr(out, "items") and callable(out.items)):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        return []
    found: list[tuple[str, torch.Tensor]] = []
    for k, v in items:
        found += _named_tensors(v, f"{prefix}.{k}" if prefix else k)
    return found


def _is_logits(name: str, y: torch.Tensor) -> bool:
    """Class scores: an output named *logits*, or an unnamed (plain tensor or tuple item) 2-D [batch, classes]
    output that is not a unit-norm embedding (a softmax over an L2-normalised embedding means nothing).
    Other named outputs (`last_hidden_state`, `pooler_output`) are features."""
    if "logits" in name.lower():
        return y.dim() >= 2 and y.shape[-1] > 1
    unnamed = all(part.isdigit() for part in name.split(".") if part)
    if not unnamed or y.dim() != 2 or y.shape[-1] < 2:
        return False
    norms = y.detach().norm(dim=-1)
    return not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)


def label_free_loss(out: Any) -> torch.Tensor:
    """A loss with useful gradients when no labels exist, summed over the model's float outputs.

    - Class scores: cross-entropy against the model's own argmax (self-distillation pseudo-labels). Its
      gradient, softmax - onehot(argmax), is what the empirical Fisher of the model's own predictions uses;
      channels that move the predicted class's margin score high.
    - Anything else (embeddings, hidden states, feature maps): 1/2 ||y - mean||^2 with the mean taken per
      feature (channel, for NCHW maps) over samples and positions, and detached. Its gradient is the output's deviation from its
      average, so |w * dL/dw| ranks channels by how much of the output's variation across inputs (the part
      that carries information) they produce. The plain ||y||^2 would be degenerate: dominated by constant
      offsets, and constant -- zero gradient -- for L2-normalised embeddings. With a single row (batch 1,
      pooled) there is no across-input mean, so the row's own scalar mean is used.
    A first-order loss against the original outputs (distillation) would have zero gradient here, since the
    model is still the original.
    """
    terms = []
    for name, y in _named_tensors(out):
        y = y.float()
        if _is_logits(name, y):
            logits = y.reshape(-1, y.shape[-1])
            terms.append(F.cross_entropy(logits, logits.detach().argmax(-1)))
        else:
            if y.dim() == 4:  # NCHW feature maps: channels are the features
                y = y.movedim(1, -1)
            rows = y.reshape(-1, y.shape[-1]) if y.dim() >= 2 else y.reshape(1, -1)
            mean = rows.detach().mean(0, keepdim=True) if rows.shape[0] > 1 else rows.detach().mean()
            terms.append(0.5 * (rows - mean).pow(2).sum(-1).mean())
    if not terms:
        raise ModelError("the model returned no float tensors with gradients, so gradient-based importance cannot be computed")
    return torch.stack(terms).sum()


def accumulate_gradients(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                         max_batches: int = MAX_GRAD_BATCHES) -> int:
    """Fill every parameter's .grad with the label-free loss's gradient summed over `batches`.

    The model stays in eval mode (dropout off, BatchNorm statistics frozen): scores must describe the model
    that will be deployed. Parameters the loss does not reach get zero gradients so scorers can read them.
    Returns the number of batches used.
    """
    model.zero_grad(set_to_none=True)
    used = 0
    with torch.enable_grad():
        for batch in batches:
            if used >= max_batches:
                break
            try:
                loss = label_free_loss(model(**batch))
            except ModelError:
                raise
            except Exception as e:
                raise ModelError(f"forward() failed while scoring channels: {type(e).__name__}: {_first_line(e)}") from e
            loss.backward()
            used += 1
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return used
