"""Structural pruning that makes models faster: channels, attention heads and MLP neurons are physically
removed on Torch-Pruning's dependency graph (DepGraph), so the exported ONNX has fewer parameters and MACs.

Why each step is here:
- Widths are rounded to the device's SIMD channel multiple (`round_to`): a 37-channel conv runs at the speed of
  a 40- or 48-channel one, so unrounded pruning gives "smaller but not faster".
- Outputs never change shape: layers that produce a model output, and every layer whose output channels are
  coupled to one (a classifier's classes, BERT's residual stream behind `last_hidden_state`, a pooled
  embedding), are found on the graph and kept; the shapes are checked again after pruning.
- Attention is pruned by whole heads, so head_dim -- and with it the 1/sqrt(head_dim) scaling and every
  `view(..., -1, head_dim)` -- stays valid; the attention modules' head-count attributes are rewritten from
  one registry (ATTENTION).
- transformers' GPT-style `Conv1D` (a Linear with a transposed weight, unknown to Torch-Pruning) is swapped
  for an equivalent nn.Linear while pruning and swapped back afterwards, so fused qkv projections and MLPs are
  pruned and scored exactly like Linear layers.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode
from torch_pruning import ops

from compress.core import ModelError, UsageError
from compress.core import first_line as _first_line
from compress.pruning.importance import accumulate_gradients, check_applicable, get_criterion
from export import flatten_outputs

# --------------------------------------------------------------------------------------------------------------
# Attention registry


@dataclass(frozen=True)
class AttentionSpec:
    """How to find and fix up one attention implementation.

    qkv: child projections whose output features are heads * head_dim (one name = a fused q|k|v projection).
    heads: attribute holding the number of heads (rewritten).
    head_dim: attribute holding the per-head width (read only: whole heads are removed, head_dim never changes).
    widths: attributes holding heads * head_dim (rewritten), e.g. BERT's all_head_size or GPT-2's split_size.
    """

    qkv: tuple[str, ...]
    heads: str
    head_dim: str
    widths: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        return len(self.qkv) == 1


_BERT_LIKE = AttentionSpec(("query", "key", "value"), "num_attention_heads", "attention_head_size", ("all_head_size",))
_DISTILBERT = AttentionSpec(("q_lin", "k_lin", "v_lin"), "n_heads", "attention_head_size", ("dim",))

# Keyed by "module.ClassName". Classes not listed but shaped like a listed spec (same projection names and head
# attribute, "Attention" in the class name: RoBERTa, ELECTRA, ... copies of BERT) use that spec.
ATTENTION: dict[str, AttentionSpec] = {
    "compress.zoo.encoder.SelfAttention": AttentionSpec(("query", "key", "value"), "heads", "head_dim"),
    "transformers.models.bert.modeling_bert.BertSelfAttention": _BERT_LIKE,
    "transformers.models.bert.modeling_bert.BertSdpaSelfAttention": _BERT_LIKE,  # transformers 4.x
    "transformers.models.vit.modeling_vit.ViTSelfAttention": _BERT_LIKE,  # transformers 4.x
    "transformers.models.vit.modeling_vit.ViTSdpaSelfAttention": _BERT_LIKE,  # transformers 4.x
    "transformers.models.vit.modeling_vit.ViTAttention":
        AttentionSpec(("q_proj", "k_proj", "v_proj"), "num_attention_heads", "head_dim"),
    "transformers.models.mobilevit.modeling_mobilevit.MobileViTSelfAttention": _BERT_LIKE,
    # DistilBERT: `dim` is the attention width (n_heads * head size) in 4.x's forward; 5.x keeps it as a record.
    "transformers.models.distilbert.modeling_distilbert.DistilBertSelfAttention": _DISTILBERT,
    "transformers.models.distilbert.modeling_distilbert.MultiHeadSelfAttention": _DISTILBERT,  # transformers 4.x
    # GPT-2: fused c_attn (a Conv1D, pruned as a Linear surrogate); split_size is the width of each of q, k, v.
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention":
        AttentionSpec(("c_attn",), "num_heads", "head_dim", ("split_size",)),
}


def _class_key(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def attention_spec(m: nn.Module) -> AttentionSpec | None:
    """The registry entry for `m`: by class, else by shape for look-alike attention classes."""
    spec = ATTENTION.get(_class_key(m))
    if spec is not None:
        return spec
    if "attention" not in type(m).__name__.lower():
        return None
    for cand in dict.fromkeys(ATTENTION.values()):
        has_projs = all(isinstance(getattr(m, n, None), nn.Module) for n in cand.qkv)
        if has_projs and all(isinstance(getattr(m, a, None), int) for a in (cand.heads, cand.head_dim)):
            return cand
    return None


@dataclass
class _Attention:
    name: str
    module: nn.Module
    spec: AttentionSpec
    heads: int
    head_dim: int

    @property
    def projections(self) -> list[nn.Module]:
        return [getattr(self.module, n) for n in self.spec.qkv]

    def set_heads(self, heads: int) -> None:
        setattr(self.module, self.spec.heads, heads)
        for attr in self.spec.widths:
            setattr(self.module, attr, heads * self.head_dim)


def _find_attention(model: nn.Module) -> list[_Attention]:
    found = []
    for name, m in model.named_modules():
        spec = attention_spec(m)
        if spec is None:
            continue
        heads, head_dim = getattr(m, spec.heads, None), getattr(m, spec.head_dim, None)
        projs = [getattr(m, n, None) for n in spec.qkv]
        if not isinstance(heads, int) or not isinstance(head_dim, int) or not all(isinstance(p, nn.Linear) for p in projs):
            continue
        width = heads * head_dim * (3 if spec.fused else 1)
        if any(p.out_features != width for p in projs):
            continue  # not the layout the spec describes: leave it to the consistency checks below
        found.append(_Attention(name, m, spec, heads, head_dim))
    return found


# --------------------------------------------------------------------------------------------------------------
# transformers Conv1D <-> nn.Linear surrogates


def _is_hf_conv1d(m: nn.Module) -> bool:
    weight = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(weight, nn.Parameter) and weight.dim() == 2


def _swap_conv1d(model: nn.Module) -> dict[str, type]:
    """Replace every transformers Conv1D (y = x @ W + b, W [in, out]) by the equivalent nn.Linear (W^T)."""
    swapped: dict[str, type] = {}
    for name, m in list(model.named_modules()):
        if not _is_hf_conv1d(m):
            continue
        w = m.weight
        lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(m.weight.t())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        _set_submodule(model, name, lin)
        swapped[name] = type(m)
    return swapped


def _unswap_conv1d(model: nn.Module, swapped: dict[str, type]) -> None:
    for name, cls in swapped.items():
        lin = model.get_submodule(name)
        conv = cls.__new__(cls)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = lin.out_features, lin.in_features
        conv.weight = nn.Parameter(lin.weight.detach().t().contiguous())
        conv.bias = nn.Parameter(lin.bias.detach().clone()) if lin.bias is not None else None
        _set_submodule(model, name, conv)


def _is_leaf(m: nn.Module) -> bool:
    return not any(True for _ in m.children())


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


# --------------------------------------------------------------------------------------------------------------
# Torch-Pruning gap: splits along the last dim of token tensors


def _map_channel_last_splits(DG: Any) -> None:
    """Give `x.split(n, dim=-1)` on [batch, tokens, channels] tensors the index mapping Torch-Pruning only
    installs for dim-1 splits, so a fused q|k|v projection's channels map onto the right branch.

    Torch-Pruning's own convention (see its slice mapping) is that a 3-D tensor's channels are its last dim.
    Which branch consumes which piece is read from autograd (the output number each consumer takes), not from
    the order the graph happened to be traced in. Safe to call again after pruning: offsets are recomputed
    from the split sizes Torch-Pruning keeps up to date.
    """
    # Torch-Pruning keeps split offsets in this private class; nothing public exposes them.
    from torch_pruning.dependency.index_mapping import _SplitIndexMapping  # noqa: PLC2701

    for node in DG.module2node.values():
        if node.type != ops.OPTYPE.SPLIT:
            continue
        gf = node.grad_fn
        sizes, dim = getattr(gf, "_saved_self_sym_sizes", None), getattr(gf, "_saved_dim", None)
        if sizes is None or dim is None or len(sizes) != 3 or dim not in (2, -1):
            continue
        if node.module.split_sizes is None:
            total = int(sizes[2])
            if hasattr(gf, "_saved_split_sizes"):
                node.module.split_sizes = [int(c) for c in gf._saved_split_sizes]
            elif hasattr(gf, "_saved_split_size"):
                step = int(gf._saved_split_size)
                node.module.split_sizes = [step] * (total // step) + ([total % step] if total % step else [])
            else:
                continue
        offsets = [0]
        for c in node.module.split_sizes:
            offsets.append(offsets[-1] + c)
        node.module.offsets = offsets
        for out_node in node.outputs:
            nr = next((n for f, n in getattr(out_node.grad_fn, "next_functions", ()) if f is gf), None)
            if nr is None or nr + 1 >= len(offsets):
                continue
            for dep in node.dependencies:
                if dep.target is out_node:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr:nr + 2], reverse=False)
            for dep in out_node.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr:nr + 2], reverse=True)


# --------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class PruneResult:
    """The pruned model and what happened to it. `layers` lists every Conv/Linear/Embedding whose shape
    changed as [in, out] (Embedding: [num, dim]) and every attention whose heads changed as [heads, head_dim]."""

    module: nn.Module
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[dict[str, Any]]
    heads: dict[str, tuple[int, int]]
    protected: list[str]  # layers producing a model output (their output width is never pruned)
    ignored: list[str]  # user --ignore names (modules left exactly as they were)
    ratio: float
    importance: str
    round_to: int | None
    global_pruning: bool = False
    output_coupled: list[str] = field(default_factory=list)  # other layers kept because their outputs reach a model output
    notes: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # per-module ratios, when chosen per block
    left_whole: list[str] = field(default_factory=list)  # blocks whose pruning broke the model, kept at full width

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "module"}
        d["heads"] = {k: list(v) for k, v in self.heads.items()}
        d["layers"] = [dict(x) for x in self.layers]
        d["params_ratio"] = self.params_before / max(self.params_after, 1)
        d["macs_ratio"] = self.macs_before / max(self.macs_after, 1)
        return d


# --------------------------------------------------------------------------------------------------------------
# Entry point


def prune_model(
    module: nn.Module,
    example: dict[str, torch.Tensor],
    *,
    ratio: float,
    importance: str = "l2",
    global_pruning: bool = False,
    ignore: Sequence[str] = (),
    round_to: int | None = None,
    calib: list[dict[str, torch.Tensor]] | None = None,
    max_layer_ratio: float = 0.9,
    prune_heads: bool = True,
    ratios: Mapping[str, float] | None = None,
    prune_first_conv: bool = False,
) -> PruneResult:
    """Remove `ratio` of the channels, heads and neurons of a copy of `module` (which is left untouched).

    ratio: fraction of each prunable group's channels (and of each attention's heads) to remove, in (0, 1).
    global_pruning: rank channels across layers instead of removing `ratio` from every layer; no layer loses
        more than `max_layer_ratio` of its channels. Heads are still removed at `ratio` per attention layer:
        head scores of different layers are not comparable enough to let one layer lose all of its heads.
    ignore: module names (or prefixes, `layers.3`) to leave exactly as they are, inputs and outputs alike.
    round_to: channel counts (and attention widths) are rounded to the nearest multiple of this (never below
        one multiple).
    calib: batches for gradient-based criteria (the example is used when none are given).
    prune_heads: False keeps every attention head; MLP neurons and conv channels are still removed.
    ratios: per-module ratios (module name -> ratio in [0, 1)) for the layers under each named module, `ratio` for
        the rest (which may then be 0); a channel group takes the ratio of the module its pruning starts from.
        compress.pruning.allocate chooses them.
    prune_first_conv: also remove output channels of the first convolution (the one run first, and any other
        reading a model input directly), and so of the channels coupled to it (a ResNet's first-stage residual
        stream). Kept by default, as NNCF's filter pruning does (prune_first_conv: false): on the shapes demo pruned
        50% by measured allocation (AVX2 kernels, 256 samples, 60 s recovery; bench/prune_recovery.py --ratios
        0.5), cutting its 32-channel stem to 24 left 95.51/95.90% held-out, keeping it 96.88/97.27% (fp32 98.63%),
        two runs each.
    """
    kw = dict(ratio=ratio, importance=importance, global_pruning=global_pruning, round_to=round_to, calib=calib,
              max_layer_ratio=max_layer_ratio, prune_heads=prune_heads, ratios=ratios, prune_first_conv=prune_first_conv)
    whole: list[str] = []  # blocks whose pruning broke the model, left at full width
    said: list[str] = []
    first = ""
    for _ in range(MAX_RETRIES + 1):
        try:
            res = _prune_once(module, example, ignore=[*ignore, *whole], **kw)  # type: ignore[arg-type]
        except _BrokenBlock as e:
            if e.block is None or e.block in whole:
                raise ModelError(str(e)) from e
            whole.append(e.block)
            said.append(f"{e.block} left at full width: pruning it broke the model ({e})")
            kind = type(module.get_submodule(e.block))
            if e.in_forward and not kind.__module__.startswith("torch."):  # its own code fails on its new
                # widths: so would every block of its class (a container of torch's own runs no code of its own)
                kin = [n for n, m in module.named_modules() if type(m) is kind and n not in whole
                       and not any(n.startswith(w + ".") for w in whole)]
                whole.extend(kin)
                said.extend(f"{n} left at full width: the same code ({kind.__name__}) as {e.block}, whose forward "
                            "failed on its pruned widths" for n in kin)
            first = first or str(e)
            continue
        if whole and res.params_after >= res.params_before:  # it broke wherever it cut: not one block's doing
            raise ModelError(first)
        res.notes = said + res.notes
        res.ignored = list(dict.fromkeys(ignore))
        res.left_whole = whole
        return res
    raise ModelError(f"pruning broke the model in {MAX_RETRIES + 1} blocks in turn, each left whole and the rest "
                     f"pruned again; the first: {first}")


# A block whose pruning breaks the model is left whole (with every block of its class, when its own forward
# failed) and the rest pruned again; past this many retries the model is refused. Each retry rebuilds
# Torch-Pruning's dependency graph: MobileViT-v2-050's took 25-48 s each (Torch-Pruning 1.6.1 spends 80% of it
# comparing index lists in Group.has_pruning_op), 152 s for 5 attention blocks one at a time, 2 retries by class.
MAX_RETRIES = 16


class _BrokenBlock(ModelError):
    """Pruning broke the model inside `block` (a module name): Torch-Pruning failed on one of its layers, or the
    pruned model fails to run there (widths hard-coded in its forward: MobileViT-v2's split of one qkv conv
    into [1, d, d], EfficientViT's grouped q/k/v conv)."""

    def __init__(self, message: str, block: str | None = None, in_forward: bool = False) -> None:
        super().__init__(message)
        self.block = block
        self.in_forward = in_forward  # the block's own forward failed (not Torch-Pruning on one of its layers)

    def __reduce__(self) -> tuple[Any, ...]:  # crosses processes (a Ray trial) with its block
        return type(self), (str(self), self.block, self.in_forward)


def _block_of(name: str) -> str | None:
    """The block a layer belongs to: its parent module (the layer itself at the top level)."""
    parent = name.rpartition(".")[0]
    return parent or name or None


def _prune_once(
    module: nn.Module,
    example: dict[str, torch.Tensor],
    *,
    ratio: float,
    importance: str,
    global_pruning: bool,
    ignore: Sequence[str],
    round_to: int | None,
    calib: list[dict[str, torch.Tensor]] | None,
    max_layer_ratio: float,
    prune_heads: bool,
    ratios: Mapping[str, float] | None,
    prune_first_conv: bool,
) -> PruneResult:
    _check_args(ratio, round_to, max_layer_ratio, allow_zero=bool(ratios))
    for name, r in (ratios or {}).items():
        if not 0.0 <= r < 1.0:
            raise UsageError(f"pruning ratio {r} for {name}: must be in [0, 1)")
    crit = get_criterion(importance)
    check_applicable(importance, module)
    model = copy.deepcopy(module).eval()
    swapped = _swap_conv1d(model)  # first: every module set below must hold the surrogates, not the originals
    ignored_modules = _resolve_ignore(model, ignore)
    trace = _trace_outputs(model, example)
    before = _widths(model)
    macs_before, params_before = count_macs(model, example)
    notes: list[str] = []
    if crit.needs_gradients:
        used = accumulate_gradients(model, calib or [example])
        notes.append(f"gradients accumulated over {used} batch(es)" + ("" if calib else
                     " (the example only: pass calibration batches for scores that describe real data)"))

    imp = crit.factory()
    attention = _find_attention(model)
    unknown = _unknown_attention(model, attention, trace.attention_like)
    if unknown:
        listed = ", ".join(list(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        notes.append(f"attention not in the registry left untouched (heads and the widths it reads): {listed}")
    with warnings.catch_warnings():  # Torch-Pruning warns about every op it treats as element-wise
        warnings.filterwarnings("ignore", module=r"torch_pruning")
        per_module = {_submodule(model, n): r for n, r in (ratios or {}).items()}
        pruner = _build_pruner(model, example, imp, global_pruning, ratio, max_layer_ratio, round_to, per_module,
                               ignored=[x for m in unknown.values() for x in m.modules() if isinstance(x, nn.Linear)])
        untouchable = ignored_modules | _tied_modules(model) | {x for m in unknown.values() for x in m.modules()}
        guard = _Guard(pruner.DG, model, untouchable, trace.producers, pruner.output_grad_fns)
        pruner.guard = guard
        for a in attention:  # whole heads are removed below; the channel pass must leave q/k/v widths alone
            guard.frozen_outputs.update(a.projections)
        kept_first = [] if prune_first_conv else [m for m in trace.first_convs if m not in ignored_modules]
        guard.frozen_outputs.update(kept_first)
        heads = {}
        if prune_heads:
            for a in attention:
                left = _prune_heads(pruner.DG, imp, a, guard, _ratio_of(a.name, ratio, ratios), round_to, max_layer_ratio)
                if left != a.heads:
                    heads[a.name] = (a.heads, left)
        _prune_channels(pruner, guard)

    for p in model.parameters():
        p.grad = None
    if kept_first:
        notes.append(f"first convolution kept at full width: {', '.join(guard.names[m] for m in kept_first)} "
                     "(--prune-first-conv cuts it too)")
    head_dims = {a.name: a.head_dim for a in attention}
    layers = _changed(before, _widths(model), swapped) + [
        {"name": n, "kind": "attention", "before": [b, head_dims[n]], "after": [a, head_dims[n]]}
        for n, (b, a) in heads.items()]
    _unswap_conv1d(model, swapped)
    model.eval()
    _verify_outputs(model, example, trace.shapes)
    macs_after, params_after = count_macs(model, example)
    if params_after >= params_before:
        notes.append("nothing was removed: every group is protected, ignored, or would round to zero channels")
    protected = sorted(dict.fromkeys(guard.producers.values()))
    return PruneResult(
        module=model, params_before=params_before, params_after=params_after, macs_before=macs_before,
        macs_after=macs_after, layers=layers, heads=heads, protected=protected,
        ignored=list(dict.fromkeys(ignore)), ratio=ratio, importance=importance.strip().lower(), round_to=round_to,
        global_pruning=global_pruning, output_coupled=[n for n in guard.coupled_names() if n not in protected], notes=notes,
        ratios=dict(ratios or {}),
    )


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise UsageError(f"pruning ratio for {name!r}: the model has no such module") from e


def _ratio_of(name: str, ratio: float, ratios: Mapping[str, float] | None) -> float:
    """The ratio for module `name`: that of the longest named prefix in `ratios`, else `ratio`."""
    hits = [k for k in (ratios or {}) if name == k or name.startswith(k + ".")]
    return ratios[max(hits, key=len)] if hits else ratio  # type: ignore[index]


def _build_pruner(model: nn.Module, example: dict[str, torch.Tensor], imp: Any, global_pruning: bool, ratio: float,
                  max_layer_ratio: float, round_to: int | None,
                  per_module: Mapping[nn.Module, float] | None = None,
                  ignored: Sequence[nn.Module] = ()) -> _GuardedPruner:
    """Trace the model into a DepGraph. Heads are not declared to Torch-Pruning (num_heads): they are removed
    by `_prune_heads`, which keeps the count per layer under our control, rounding included. `ignored`: layers
    Torch-Pruning must not take as roots (the Linears of attention the registry does not describe, which the
    guard leaves whole anyway): grouping from a Llama's k_proj through its grouped-query repeat of the KV heads
    had not finished after 10.5 CPU-minutes on a 2-layer, 0.55 M-parameter model (hidden 128, 4 heads over 2 KV
    heads); ignored, a 2-layer one (hidden 64) prunes its MLP in 5 s."""
    outputs = _OutputRecorder()
    try:
        with torch.enable_grad():
            pruner = _GuardedPruner(
                model, example, importance=imp, global_pruning=global_pruning, pruning_ratio=ratio,
                max_pruning_ratio=max_layer_ratio, round_to=round_to, ignored_layers=list(ignored),
                pruning_ratio_dict=dict(per_module) if per_module else None,
                in_channel_groups={}, out_channel_groups={}, num_heads={}, output_transform=outputs,
            )
    except Exception as e:
        raise ModelError(f"Torch-Pruning cannot trace the model: {type(e).__name__}: {_first_line(e)}") from e
    pruner.output_grad_fns = outputs.grad_fns
    _map_channel_last_splits(pruner.DG)
    return pruner


class _OutputRecorder:
    """output_transform for the DepGraph trace: hands Torch-Pruning only the differentiable tensors of the
    output (integer outputs or cache objects would break its tracing) and remembers their autograd nodes, so
    the graph nodes producing model outputs are known even where Torch-Pruning adds no output node (a tensor
    that is returned and also used further inside the model)."""

    def __init__(self) -> None:
        self.grad_fns: set[Any] = set()

    def __call__(self, out: Any) -> list[torch.Tensor]:
        tensors = [t for _, t in _flat_tensors(out) if t.grad_fn is not None]
        self.grad_fns = {t.grad_fn for t in tensors}
        return tensors


def _check_args(ratio: float, round_to: int | None, max_layer_ratio: float, allow_zero: bool = False) -> None:
    if not isinstance(ratio, (int, float)) or not (0.0 <= ratio if allow_zero else 0.0 < ratio) or not ratio < 1.0:
        raise UsageError(f"pruning ratio {ratio}: must be between 0 and 1 (exclusive)")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise UsageError(f"round_to {round_to}: must be a positive integer")
    if not 0.0 < max_layer_ratio <= 1.0:
        raise UsageError(f"max_layer_ratio {max_layer_ratio}: must be in (0, 1]")


# --------------------------------------------------------------------------------------------------------------
# Which modules may not change


def _resolve_ignore(model: nn.Module, names: Iterable[str]) -> set[nn.Module]:
    """Modules named (or under a prefix named) by the user; a name matching nothing is a usage error."""
    all_names = [n for n, _ in model.named_modules() if n]
    out: set[nn.Module] = set()
    for raw in names:
        name = raw.strip().rstrip(".")
        hits = [m for n, m in model.named_modules() if n and (n == name or n.startswith(name + "."))]
        if not hits:
            close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.5)
            sample = close or [n for n in all_names if "." not in n][:5] or all_names[:5]
            raise UsageError(f"--ignore {raw!r} matches no module of the model; names look like: {', '.join(sample)}")
        for m in hits:
            out.update(m.modules())
    return out


def _tied_modules(model: nn.Module) -> set[nn.Module]:
    """Modules sharing a parameter with another module (tied embeddings / LM head): pruning one side would
    prune the shared tensor twice, so groups touching them are left alone."""
    owners: dict[int, set[nn.Module]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(m)
    return {m for ms in owners.values() if len(ms) > 1 for m in ms}


def _flat_tensors(out: Any) -> list[tuple[str, torch.Tensor]]:
    return flatten_outputs(out)


@dataclass
class _Trace:
    """What one hooked forward pass on the example tells."""

    shapes: dict[str, tuple[int, ...]]
    producers: dict[nn.Module, str]  # parameterised leaf layer -> name, for layers whose output *is* a model output
    attention_like: list[nn.Module]  # modules calling softmax / scaled_dot_product_attention in their own forward
    first_convs: list[nn.Module]  # the first convolution run, and any other that reads a model input directly


class _SoftmaxSpy(TorchFunctionMode):
    """Notes which module is running when softmax or SDPA is called: that module computes attention."""

    NAMES = frozenset({"softmax", "scaled_dot_product_attention"})

    def __init__(self, stack: list[nn.Module], found: dict[nn.Module, None]) -> None:
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self.NAMES and self.stack:
            owner = self.stack[-1]
            if len(self.stack) > 1 and _is_leaf(owner) and not any(True for _ in owner.parameters()):
                owner = self.stack[-2]  # an nn.Softmax child: the attention is its parent
            self.found.setdefault(owner)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _running_modules(model: nn.Module) -> Iterator[list[nn.Module]]:
    """The modules of `model` whose forward has begun and not returned, innermost last, kept by forward hooks
    while the context lasts: who is computing when a softmax runs, or where a forward failed."""
    running: list[nn.Module] = []

    def enter(mod: nn.Module, _inp: Any) -> None:
        running.append(mod)

    def leave(_mod: nn.Module, _inp: Any, _out: Any) -> None:  # returns None: a hook's return replaces the output
        if running:
            running.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield running
    finally:
        for h in handles:
            h.remove()


def _trace_outputs(model: nn.Module, example: dict[str, torch.Tensor]) -> _Trace:
    """Run the example once with forward hooks. A parameterised leaf layer whose output tensor *is* (by
    identity) a model output produces it: a classifier's Linear, the final LayerNorm, an lm_head."""
    produced: dict[int, tuple[weakref.ref, nn.Module]] = {}  # weak: ids of freed tensors get reused
    softmax_users: dict[nn.Module, None] = {}

    def record(mod: nn.Module, _inp: Any, out: Any) -> None:
        t = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
        if isinstance(t, torch.Tensor):
            produced[id(t)] = (weakref.ref(t), mod)

    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if _is_leaf(m) and any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(record) for m in leaves]
    first: list[nn.Module] = []
    inputs = {id(t) for t in example.values() if isinstance(t, torch.Tensor)}

    def first_conv(mod: nn.Module, inp: Any) -> None:
        x = inp[0] if isinstance(inp, tuple) and inp else None
        if mod not in first and (not first or (isinstance(x, torch.Tensor) and id(x) in inputs)):
            first.append(mod)

    handles += [m.register_forward_pre_hook(first_conv) for m in leaves if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]

    try:
        with torch.no_grad(), _running_modules(model) as stack, _SoftmaxSpy(stack, softmax_users):
            out = model(**example)
    except Exception as e:
        raise ModelError(f"forward() failed on the example inputs: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        for h in handles:
            h.remove()
    flat = _flat_tensors(out)
    if not flat:
        raise ModelError(f"forward() returned {type(out).__name__} with no tensors")
    producers = {}
    for _, t in flat:
        ref, mod = produced.get(id(t), (None, None))
        if ref is not None and ref() is t:
            producers[mod] = names[mod]
    return _Trace({n: tuple(t.shape) for n, t in flat}, producers, [m for m in softmax_users if m is not model], first)


def _unknown_attention(model: nn.Module, known: list[_Attention], attention_like: list[nn.Module]) -> dict[str, nn.Module]:
    """Modules computing attention (softmax/SDPA in their own forward, two or more Linear layers inside) that
    the registry does not describe. They are left untouched, inputs and outputs: without head bookkeeping a
    channel cut through q/k/v either breaks a `view(..., heads, head_dim)` or silently regroups channels into
    other heads, and many implementations derive head_dim from the width of the stream they read."""
    names = {m: n for n, m in model.named_modules()}
    known_mods = [a.module for a in known]
    out: dict[str, nn.Module] = {}
    for m in attention_like:
        inside = set(m.modules())
        if any(k in inside for k in known_mods) or any(m in set(k.modules()) for k in known_mods):
            continue
        if sum(isinstance(x, nn.Linear) for x in inside) >= 2:
            out[names[m]] = m
    return out


class _Guard:
    """Decides which DepGraph groups may be pruned.

    A group is refused when it would touch a user-ignored or weight-tied module (inputs or outputs), change a
    model output (it reaches a graph output node, or removes output channels of a layer that produces an
    output), or change q/k/v widths outside whole-head pruning.
    """

    def __init__(self, DG: Any, model: nn.Module, untouchable: set[nn.Module], producers: dict[nn.Module, str],
                 output_grad_fns: set[Any]) -> None:
        self.DG = DG
        self.untouchable = untouchable
        self.producers = dict(producers)
        self.frozen_outputs: set[nn.Module] = set()
        self.names = {m: n for n, m in model.named_modules()}
        self.output_nodes = {n for n in DG.module2node.values()
                             if n.type == ops.OPTYPE.OUTPUT or n.grad_fn in output_grad_fns}
        self._coupled: dict[str, None] = {}
        self._add_graph_producers()

    def _is_layer(self, node: Any) -> bool:
        return isinstance(node.module, nn.Module) and node.module in self.names

    def _add_graph_producers(self) -> None:
        """Layers whose output reaches a model output through parameter-free ops only (normalize, pooling,
        tanh, ...), for the report: they are what a user would call the output layers."""
        for out in self.output_nodes:
            stack, seen = [out], set()
            while stack:
                n = stack.pop()
                if n in seen:
                    continue
                seen.add(n)
                if self._is_layer(n):
                    self.producers.setdefault(n.module, self.names[n.module])
                else:
                    stack.extend(n.inputs)

    def reaches_output(self, group: Any) -> bool:
        """A parameter-free op or output node on a model output changes with any channel it passes; a layer
        producing an output changes only when its *output* channels are pruned."""
        for dep, _ in group:
            target = dep.target
            if target.module in self.producers and self.DG.is_out_channel_pruning_fn(dep.handler):
                return True
            out_channels = self.DG.is_out_channel_pruning_fn(dep.handler)
            if target in self.output_nodes and (out_channels or not self._is_layer(target)):
                return True
        return False

    def touches_untouchable(self, group: Any) -> bool:
        return any(dep.target.module in self.untouchable for dep, _ in group)

    def __call__(self, group: Any, *, heads: bool = False) -> bool:
        """True if the group must not be pruned."""
        if self.reaches_output(group):
            self._record(group)
            return True
        if self.touches_untouchable(group):
            return True
        return not heads and any(dep.target.module in self.frozen_outputs and self.DG.is_out_channel_pruning_fn(dep.handler)
                                 for dep, _ in group)

    def _record(self, group: Any) -> None:
        for dep, _ in group:
            m = dep.target.module
            has_weights = m in self.names and any(True for _ in m.parameters(recurse=False))
            if has_weights and self.DG.is_out_channel_pruning_fn(dep.handler):
                self._coupled.setdefault(self.names[m])

    def coupled_names(self) -> list[str]:
        return list(self._coupled)


class _GuardedPruner(tp.pruner.MetaPruner):
    """MetaPruner that skips the groups `guard` refuses and rounds grouped layers correctly.

    Both are overrides of Torch-Pruning 1.6 internals: `_check_pruning_ratio` is its per-group admission
    check; `_round_to` gets the per-channel-group count to prune but rounds as if it were the layer's total, so
    a grouped conv (g groups) either lost every channel (and was skipped) or ended at a width that is not a
    multiple. Here the channels kept per group are rounded so that g * kept is a multiple of round_to. The
    group being rounded is the one `_is_atten_group` saw last (it is called just before, in the same loop).
    """

    guard: Callable[[Any], bool] = staticmethod(lambda group: False)
    _ch_groups_now: int = 1
    current: Any = None  # root module of the group being scored or pruned, for error messages
    output_grad_fns: frozenset = frozenset()  # autograd nodes of the model's outputs in the DepGraph trace

    def _check_pruning_ratio(self, group: Any) -> bool:
        self.current = group[0].dep.target.module
        return not self.guard(group) and super()._check_pruning_ratio(group)

    def _is_atten_group(self, group: Any) -> Any:
        self._ch_groups_now = self._get_channel_groups(group)
        return super()._is_atten_group(group)

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        """Channels to prune so that the kept width is the multiple of round_to NEAREST the asked-for width.

        Torch-Pruning rounds the kept width down, which at ratio 0.3 took a 64-channel conv to 32 (50%
        pruned); nearest keeps 48. A width that would round to zero keeps one step.
        """
        groups = self._ch_groups_now
        if groups <= 1 or current_channels % groups:
            groups = 1
        per_group = current_channels // groups
        step = round_to // math.gcd(round_to, groups)
        kept = int(math.floor((per_group - n_pruned) / step + 0.5)) * step
        kept = min(max(kept, step), per_group)
        if kept >= per_group or kept <= 0:
            return 0 if kept >= per_group else per_group  # nothing to prune / all: the group is refused
        return per_group - kept


# --------------------------------------------------------------------------------------------------------------
# Pruning passes


def _kept_heads(heads: int, head_dim: int, ratio: float, round_to: int | None, max_layer_ratio: float) -> int:
    """Heads to keep: heads * (1 - ratio) rounded to the nearest step, in steps that keep heads * head_dim a multiple of round_to,
    never fewer than one step nor than (1 - max_layer_ratio) of the heads; all heads if no step fits."""
    step = round_to // math.gcd(round_to, head_dim) if round_to else 1
    if step > heads:
        return heads
    keep = math.floor(heads * (1.0 - ratio) / step + 0.5) * step
    floor_keep = math.ceil(heads * (1.0 - max_layer_ratio) - 1e-9)
    while keep < max(step, floor_keep):
        keep += step
    return min(keep, heads)


def _prune_heads(DG: Any, imp: Any, a: _Attention, guard: _Guard, ratio: float, round_to: int | None,
                 max_layer_ratio: float) -> int:
    """Remove the least important whole heads of one attention module; returns the heads left."""
    root = a.projections[0]
    pruner = DG.get_pruner_of_module(root)
    fn = pruner.prune_out_channels
    try:
        group = DG.get_pruning_group(root, fn, list(range(root.out_features)))
        if guard(group, heads=True):
            return a.heads
        scores = imp(group)
        if scores is None:
            return a.heads
        keep = _kept_heads(a.heads, a.head_dim, ratio, round_to, max_layer_ratio)
        if keep >= a.heads:
            return a.heads
        segments = 3 if a.spec.fused else 1
        head_scores = scores.detach().float().view(segments, a.heads, a.head_dim).mean(dim=(0, 2))
        drop = torch.argsort(head_scores)[: a.heads - keep].tolist()
        width = a.heads * a.head_dim
        idxs = sorted(s * width + h * a.head_dim + i for s in range(segments) for h in drop for i in range(a.head_dim))
        group = DG.get_pruning_group(root, fn, idxs)
        if not DG.check_pruning_group(group):
            return a.heads
        group.prune()
        _map_channel_last_splits(DG)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"pruning the heads of {a.name} ({type(a.module).__name__}) failed: "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    expected = keep * a.head_dim * segments
    widths = {n: p.out_features for n, p in zip(a.spec.qkv, a.projections)}
    if any(w != expected for w in widths.values()):
        raise ModelError(f"pruning the heads of {a.name} left inconsistent projection widths {widths} (expected {expected})")
    a.set_heads(keep)
    return keep


def _prune_channels(pruner: _GuardedPruner, guard: _Guard) -> None:
    """Torch-Pruning's channel pass (local or global ranking, rounding), one group at a time so a failure
    names the layer it happened at."""
    try:
        for group in pruner.step(interactive=True):
            pruner.current = group[0].dep.target.module
            group.prune()
    except Exception as e:
        where = guard.names.get(pruner.current)
        raise _BrokenBlock(f"Torch-Pruning failed at {where or repr(pruner.current)}: {type(e).__name__}: "
                           f"{_first_line(e)}", _block_of(where) if where else None) from e


# --------------------------------------------------------------------------------------------------------------
# Measuring and checking


def main_blocks(model: nn.Module) -> list[str]:
    """Names of the children of the model's longest nn.Sequential/nn.ModuleList of blocks (children that are
    modules of modules: its stages or layers, not a stem's conv/bn/relu); [] when it has none. Recovery matches
    their outputs (feature hints) and the allocation chooses a ratio for each."""
    best: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Sequential, nn.ModuleList)) or len(mod) < 2 or len(mod) <= len(best):
            continue
        if all(any(True for _ in child.children()) for child in mod.children()):
            best = [f"{name}.{k}" if name else k for k, _ in mod.named_children()]
    return best


def count_macs(model: nn.Module, example: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(MACs, params) of one forward pass on `example`, as Torch-Pruning counts them, without its prints; where
    its module hooks fail, from torch's own FLOP counter (torch.utils.flop_counter, at the dispatcher: every
    matmul and convolution whatever module runs it) and the parameter count: a figure for the report must not
    stop a run. On timm 1.0's LeViT-128S Torch-Pruning counts 283 M MACs and torch's counter 305 M (it counts
    the attention's q@k and attn@v matmuls, which are not modules); on MobileNetV3-Small 56.0 M and 56.5 M."""
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # it prints a batch-size guess per call
            macs, params = tp.utils.count_ops_and_params(model, example)
        return int(macs), int(params)
    except Exception as e:
        first = f"{type(e).__name__}: {_first_line(e)}"
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**example)
    except Exception as e:
        raise ModelError(f"counting MACs failed: {first}; torch's FLOP counter: {type(e).__name__}: "
                         f"{_first_line(e)}") from e
    return int(counter.get_total_flops() // 2), int(sum(p.numel() for p in model.parameters()))


def _widths(model: nn.Module) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = (type(m).__name__, [m.in_channels, m.out_channels])
        elif isinstance(m, nn.Linear):
            out[name] = (type(m).__name__, [m.in_features, m.out_features])
        elif isinstance(m, nn.Embedding):
            out[name] = (type(m).__name__, [m.num_embeddings, m.embedding_dim])
    return out


def _changed(before: dict[str, tuple[str, list[int]]], after: dict[str, tuple[str, list[int]]],
             swapped: dict[str, type]) -> list[dict[str, Any]]:
    rows = []
    for name, (kind, b) in before.items():
        a = after.get(name, (kind, b))[1]
        if a != b:
            rows.append({"name": name, "kind": swapped[name].__name__ if name in swapped else kind, "before": b, "after": a})
    return rows


def _verify_outputs(model: nn.Module, example: dict[str, torch.Tensor], ref: dict[str, tuple[int, ...]]) -> None:
    names = {m: n for n, m in model.named_modules()}
    with _running_modules(model) as running:
        try:
            with torch.no_grad():
                out = model(**example)
        except Exception as e:
            inner = names.get(running[-1], "") if running else ""  # where it failed: a block's own code, or a layer's
            block = inner if inner and not _is_leaf(running[-1]) else _block_of(inner) if inner else None
            raise _BrokenBlock("the pruned model no longer runs" + (f" in {inner}" if inner else "")
                               + f": {type(e).__name__}: {_first_line(e)}", block,
                               in_forward=bool(inner) and not _is_leaf(running[-1])) from e
    got = {n: tuple(t.shape) for n, t in _flat_tensors(out)}
    if got != ref:
        diff = [f"{n}: {list(ref.get(n, ()))} -> {list(got.get(n, ()))}"
                for n in dict.fromkeys([*ref, *got]) if ref.get(n) != got.get(n)]
        raise ModelError(f"pruning changed the model's output shapes ({'; '.join(diff[:3])}); "
                         "--ignore the layer producing it")


def iter_attention(model: nn.Module) -> Iterator[tuple[str, nn.Module, AttentionSpec]]:
    """(name, module, spec) for every registered attention module of `model` (for tests and reports)."""
    for name, m in model.named_modules():
        spec = attention_spec(m)
        if spec is not None:
            yield name, m, spec
