"""Unstructured and 2:4 (N:M) weight sparsity on Conv/Linear layers, as masks baked into plain weights.

Structured pruning removes channels and so makes every runtime faster; sparsity only zeroes weights, and what
that buys depends on the runtime. The result holds truly zero weights (no torch.nn.utils.prune
re-parametrisation left behind), so the exporters see ordinary tensors, plus the masks, so a recovery step
(`recover.distill(after_step=result.after_step)`) can re-apply them after every optimizer step.

2:4 groups follow NVIDIA's ASP / TensorRT layout: 4 consecutive *input channels* at each output channel and
kernel position (Linear: weight[out, in] in groups of 4 along `in`; Conv: weight[out, in, kh, kw] seen as
[out, kh, kw, in]). That is the layout Ampere's sparse tensor cores consume; grouping the flattened
in*kh*kw axis instead would give a 2:4 pattern no sparse kernel can use.
"""

from __future__ import annotations

import copy
import fnmatch
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from compress.core import InputError, ModelError, UsageError, few
from compress.core import first_line as _first_line

PATTERNS = ("unstructured", "2:4")
SCOPES = ("layer", "global")
COVERED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

SPARSITY_NOTE = (
    "Sparse weights are stored dense: onnxruntime's CPU execution provider has no sparse kernels for these "
    "Conv/MatMul/Gemm weights, so latency will not drop. Sparsity pays in compressed download size (zeros "
    "compress), or on hardware and runtimes with sparse kernels, e.g. 2:4 on NVIDIA Ampere or newer with TensorRT "
    "sparse tensor cores."
)


@dataclass
class SparsityResult:
    """A sparsified copy of the model and what was done to it."""

    module: nn.Module
    pattern: str
    ratio: float
    scope: str
    masks: dict[str, torch.Tensor]  # layer name -> bool mask shaped like its weight; True = kept
    layers: list[dict[str, Any]]  # {name, shape, params, sparsity} per covered layer
    skipped: list[dict[str, str]] = field(default_factory=list)  # {name, reason}

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all covered weights."""
        total = sum(layer["params"] for layer in self.layers)
        zeros = sum(layer["zeros"] for layer in self.layers)
        return zeros / total if total else 0.0

    def reapply(self, model: nn.Module | None = None) -> None:
        """Zero the masked weights again (after an optimizer step moved them); `model` defaults to self.module.

        Any model with the same layer names and weight shapes works, e.g. a deepcopy made for a trial.
        """
        model = self.module if model is None else model
        with torch.no_grad():
            for name, mask in self.masks.items():
                weight = _weight_of(model, name)
                if weight.shape != mask.shape:
                    raise ModelError(f"sparsity mask for {name} is {list(mask.shape)} but the weight is {list(weight.shape)}")
                weight.masked_fill_(~mask.to(weight.device), 0)

    @property
    def after_step(self) -> Callable[[nn.Module], None]:
        """The callable `recover.distill(after_step=...)` takes: keeps zeros zero while the student trains."""
        return self.reapply

    def refresh(self) -> None:
        """Recount per-layer sparsity from the module's current weights (e.g. after distillation)."""
        for layer in self.layers:
            w = _weight_of(self.module, layer["name"])
            layer["zeros"] = int((w == 0).sum())
            layer["sparsity"] = round(layer["zeros"] / layer["params"], 6)

    def to_json(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern, "ratio": self.ratio, "scope": self.scope, "sparsity": round(self.sparsity, 6),
            "covered_params": sum(layer["params"] for layer in self.layers),
            "layers": [dict(layer) for layer in self.layers], "skipped": [dict(s) for s in self.skipped],
            "note": SPARSITY_NOTE,
        }


def apply_sparsity(
    module: nn.Module,
    ratio: float,
    pattern: str = "unstructured",
    *,
    ignore: Iterable[str] = (),
    protect: Iterable[str] = (),
    scope: str = "layer",
) -> SparsityResult:
    """Magnitude sparsity on a deepcopy of `module` (the input is left untouched).

    unstructured: zero the `ratio` smallest |w| of each layer (scope "layer") or of all covered layers together
    (scope "global": raw magnitudes compared across layers, so layers with small weights lose more).
    2:4: keep the 2 largest |w| of every 4 consecutive input channels; ratio must be 0.5; layers whose input
    channel count is not a multiple of 4 are skipped and reported. `ignore` (the user's) and `protect` (the
    pipeline's, e.g. the classifier) name layers to leave dense: exact module names, a parent module's name, or
    fnmatch globs. An `ignore` entry that matches nothing is a UsageError, since it is probably a typo.
    """
    _check_args(ratio, pattern, scope)
    ignore, protect = list(ignore), list(protect)
    _check_ignore(module, ignore)
    try:
        model = copy.deepcopy(module)
    except Exception as e:
        raise ModelError(f"cannot copy the model to sparsify it: {type(e).__name__}: {_first_line(e)}") from e
    covered, skipped = _select_layers(model, ignore, protect)
    if pattern == "2:4":
        masks = _masks_2of4(covered, skipped)
    elif scope == "global":
        masks = _masks_global(covered, ratio)
    else:
        masks = {name: _mask_smallest(w.detach().abs(), ratio) for name, w in covered}
    if not masks:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3])
        raise ModelError(f"no Conv/Linear weights to sparsify{f' ({reasons})' if reasons else ''}")
    result = SparsityResult(model, pattern, 0.5 if pattern == "2:4" else float(ratio), scope, masks,
                            [_layer_entry(name, w) for name, w in covered if name in masks], skipped)
    result.reapply()
    result.refresh()
    return result


def _check_args(ratio: float, pattern: str, scope: str) -> None:
    if pattern not in PATTERNS:
        raise UsageError(f"sparsity pattern {pattern!r}: one of {', '.join(PATTERNS)}")
    if scope not in SCOPES:
        raise UsageError(f"sparsity scope {scope!r}: one of {', '.join(SCOPES)}")
    if pattern == "2:4":
        if abs(float(ratio) - 0.5) > 1e-9:
            raise UsageError(f"2:4 sparsity is always 0.5 (2 of every 4 weights); drop the ratio {ratio:g} or use unstructured")
        if scope != "layer":
            raise UsageError("2:4 sparsity is decided within each group of 4 weights; --scope global applies to unstructured only")
        return
    if not 0.0 < float(ratio) < 1.0:
        raise UsageError(f"sparsity ratio must be between 0 and 1, exclusive (got {ratio:g})")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_ignore(module: nn.Module, ignore: list[str]) -> None:
    names = [n for n, _ in module.named_modules() if n]
    unknown = [p for p in ignore if not any(_matches(n, [p]) for n in names)]
    if unknown:
        layers = [n for n, m in module.named_modules() if isinstance(m, COVERED_TYPES)]
        hint = few(layers, 8)
        raise UsageError(f"ignored layer(s) {', '.join(map(repr, unknown))} match no module of the model; its Conv/Linear layers: {hint}")


def _select_layers(model: nn.Module, ignore: list[str], protect: list[str]) -> tuple[list[tuple[str, torch.Tensor]], list[dict[str, str]]]:
    """Covered (name, weight) pairs and skipped layers with the reason; a weight shared by two layers counts once."""
    covered, skipped, seen = [], [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, COVERED_TYPES):
            continue
        weight = getattr(mod, "weight", None)
        if _matches(name, ignore):
            skipped.append({"name": name, "reason": "ignored"})
        elif _matches(name, protect):
            skipped.append({"name": name, "reason": "protected"})
        elif not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter) or not weight.is_floating_point():
            skipped.append({"name": name, "reason": "no floating-point weight"})
        elif id(weight) in seen:
            skipped.append({"name": name, "reason": f"shares its weight with {seen[id(weight)]}"})
        else:
            seen[id(weight)] = name
            covered.append((name, weight))
    return covered, skipped


def _mask_smallest(magnitude: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep all but the round(ratio * n) smallest entries; argsort, so ties cannot change the count."""
    flat = magnitude.reshape(-1)
    k = int(round(ratio * flat.numel()))
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.argsort(flat, stable=True)[:k]] = False
    return mask.reshape(magnitude.shape)


def _masks_global(covered: list[tuple[str, torch.Tensor]], ratio: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([w.detach().abs().reshape(-1).float() for _, w in covered])
    mask = _mask_smallest(flat, ratio)
    masks, start = {}, 0
    for name, w in covered:
        masks[name] = mask[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks


def _masks_2of4(covered: list[tuple[str, torch.Tensor]], skipped: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    masks = {}
    for name, w in covered:
        cin = w.shape[1]
        if cin % 4:
            what = "in_features" if w.dim() == 2 else "input channels per group"
            skipped.append({"name": name, "reason": f"{what} ({cin}) not divisible by 4"})
            continue
        masks[name] = mask_2of4(w.detach())
    return masks


def mask_2of4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input channels (dim 1), at each output row/kernel position."""
    rows = input_groups(weight.abs())  # [R, cin]
    groups = rows.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    keep = keep.reshape(rows.shape)
    if weight.dim() == 2:
        return keep
    return keep.reshape(weight.shape[0], *weight.shape[2:], weight.shape[1]).movedim(-1, 1).contiguous()


def input_groups(weight: torch.Tensor) -> torch.Tensor:
    """The weight as [rows, input channels], input channels last: Linear as is, Conv [out, in, *k] -> [out*k, in].

    Consecutive runs of 4 along the last axis are the 2:4 groups; tests and reports use this to check them.
    """
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


def _layer_entry(name: str, w: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(w.shape), "params": w.numel(), "zeros": 0, "sparsity": 0.0}


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    try:
        weight = model.get_submodule(name).weight
    except AttributeError as e:
        raise ModelError(f"sparsity mask names layer {name!r}, which this model does not have") from e
    return weight


class _CountingSink(io.RawIOBase):
    """A write-only stream that keeps only the byte count: zipping a 2 GB model needs no second 2 GB on disk."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = len(memoryview(b).cast("B"))
        self.count += n
        return n


def zipped_size(path: str | Path) -> int:
    """Bytes of the ONNX file, plus its external `<name>.data` when present, in a DEFLATE level 9 zip archive.

    Zeros compress and float32 noise does not, so this is how sparsity shows up in what a device downloads.
    The stream is not seekable, so each entry carries a 16-byte data descriptor more than a zip on disk would.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} not found")
    files = [path] + [p for p in [path.parent / (path.name + ".data")] if p.is_file()]
    sink = _CountingSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for f in files:
            zf.write(f, arcname=f.name)
    return sink.count
