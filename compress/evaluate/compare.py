"""Label-free fidelity: how closely a compressed model reproduces its reference model's outputs.

Compression here has no labels to score accuracy with, so every stage (pruning now, quantization and the report
later) compares the candidate's outputs with the reference's on the same calibration inputs. The figures work on
numpy arrays (ONNX Runtime outputs) and torch tensors alike, so a torch-vs-torch and an ONNX-vs-torch comparison
read the same way.

Returned figures are JSON-safe: never NaN or inf. A sample whose candidate (or reference) output holds NaN/inf
has cosine 0.0 (it cannot be vouched for) and is counted in `nonfinite_samples`; `rel_l2` is None whenever it is
not finite (a non-finite output, or a zero reference against a non-zero candidate). Treat None there as failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress.core import ModelError, RuntimeFailure, sessions
from compress.core import first_line as _first_line
from compress.evaluate.detection import box_fidelity, is_detection_head
from compress.evaluate.tokens import token_fidelity, token_ids
from export import flatten_outputs

if TYPE_CHECKING:
    import onnx


def fidelity(reference: Sequence[Any], candidate: Sequence[Any],
             tokens: Sequence[Mapping[str, Any]] | None = None, real_tokens: bool = False) -> dict[str, Any]:
    """Compare two models' outputs on the same inputs.

    Each argument is either a list of outputs (one big batch) or a list over batches of such lists; batches are
    concatenated along axis 0. Returns cosine_min / cosine_mean (per sample, over the flattened concatenation of
    all of that sample's outputs), rel_l2 (||ref - cand|| / ||ref|| over everything), top1_agreement (argmax over
    the last axis of the first output when it is [N, C] with C > 1, else None), samples and nonfinite_samples;
    and "boxes" where the first output is a YOLO detection head (compress.evaluate.detection: the boxes kept
    after NMS, matched). `tokens`: the inputs of a language model that generates (its batches, with `input_ids`):
    where the first output is their logits [N, T, V], next_token_agreement, perplexity and reference_perplexity
    too (compress.evaluate.tokens); `real_tokens`: they are real text, and perplexity_increase is what the
    tolerance bounds (else the agreement).
    """
    ref = _merge_batches(reference, "reference")
    cand = _merge_batches(candidate, "candidate")
    n = _check_compatible(ref, cand)
    ref_rows, cand_rows = _per_sample(ref, n), _per_sample(cand, n)
    finite = np.isfinite(ref_rows).all(axis=1) & np.isfinite(cand_rows).all(axis=1)
    cos = _cosine_rows(ref_rows, cand_rows, finite)
    out = {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "rel_l2": _rel_l2(ref_rows, cand_rows),
        "top1_agreement": _top1(ref[0], cand[0], finite),
        "samples": n,
        "nonfinite_samples": int(n - finite.sum()),
    }
    if is_detection_head(ref[0]):
        out["boxes"] = box_fidelity(ref[0], cand[0], finite)
    got = token_ids(tokens) if tokens else None
    judged_tokens = token_fidelity(ref[0], cand[0], *got, finite, real_tokens) if got else None
    if judged_tokens:
        out.update(judged_tokens)
    return out


def _as_numpy(x: Any) -> np.ndarray:
    """float64 numpy for any tensor/array: precision for sums of squares, and bf16/int outputs compare too."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64, copy=False)


def _is_batch_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (list, tuple))


def _merge_batches(outputs: Sequence[Any], which: str) -> list[np.ndarray]:
    """Accept [out0, out1, ...] or [[out0, out1, ...] per batch]; return one array per output."""
    if not isinstance(outputs, (list, tuple)) or not outputs:
        raise ModelError(f"fidelity: no {which} outputs to compare")
    if not _is_batch_list(outputs):
        return [_as_numpy(o) for o in outputs]
    counts = {len(b) for b in outputs}
    if len(counts) != 1:
        raise ModelError(f"fidelity: {which} batches have different numbers of outputs ({sorted(counts)})")
    merged = []
    for k in range(counts.pop()):
        parts = [_as_numpy(b[k]) for b in outputs]
        if any(p.ndim == 0 for p in parts):
            raise ModelError(f"fidelity: {which} output {k} is a scalar; outputs need a leading sample axis")
        try:
            merged.append(np.concatenate(parts, axis=0))
        except ValueError as e:
            raise ModelError(f"fidelity: {which} output {k} cannot be concatenated across batches ({_first_line(e)})") from e
    return merged


def _check_compatible(ref: list[np.ndarray], cand: list[np.ndarray]) -> int:
    """Same number of outputs and shapes, one shared sample count; returns that count."""
    if len(ref) != len(cand):
        raise ModelError(f"fidelity: the reference has {len(ref)} outputs, the candidate {len(cand)}")
    for k, (r, c) in enumerate(zip(ref, cand)):
        if r.shape != c.shape:
            raise ModelError(f"fidelity: output {k} has shape {list(c.shape)} in the candidate, {list(r.shape)} in the reference")
        if r.ndim == 0:
            raise ModelError(f"fidelity: output {k} is a scalar; outputs need a leading sample axis")
    counts = {r.shape[0] for r in ref}
    if len(counts) != 1:
        raise ModelError(f"fidelity: outputs disagree on the number of samples (axis 0 sizes {sorted(counts)})")
    n = counts.pop()
    if n == 0:
        raise ModelError("fidelity: no samples to compare")
    return n


def _per_sample(outputs: list[np.ndarray], n: int) -> np.ndarray:
    """[N, D]: each sample's outputs flattened and concatenated, so one figure covers the whole model."""
    return np.concatenate([o.reshape(n, -1) for o in outputs], axis=1)


def _cosine_rows(ref: np.ndarray, cand: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Row-wise cosine; 1.0 when both rows are zero, 0.0 when one is or when either is not finite."""
    with np.errstate(all="ignore"):
        # Scale each row by its largest magnitude first: float64 squares of float32 extremes cannot overflow then.
        r = ref / np.where(finite, np.abs(ref).max(axis=1, initial=0.0), 1.0)[:, None].clip(min=np.finfo(np.float64).tiny)
        c = cand / np.where(finite, np.abs(cand).max(axis=1, initial=0.0), 1.0)[:, None].clip(min=np.finfo(np.float64).tiny)
        nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
        cos = np.einsum("ij,ij->i", r, c) / (nr * nc)
    ref_zero, cand_zero = nr == 0, nc == 0
    cos = np.where(ref_zero & cand_zero, 1.0, np.where(ref_zero | cand_zero, 0.0, cos))
    cos = np.where(finite, cos, 0.0)
    return np.clip(cos, -1.0, 1.0)  # rounding can leave 1 + 1e-16


def _rel_l2(ref: np.ndarray, cand: np.ndarray) -> float | None:
    """||ref - cand|| / ||ref||; 0.0 when both are zero, None when not finite (see the module docstring)."""
    with np.errstate(all="ignore"):
        num = float(np.linalg.norm((ref - cand).ravel()))
        den = float(np.linalg.norm(ref.ravel()))
    if not (np.isfinite(num) and np.isfinite(den)):
        return None
    if den == 0.0:
        return 0.0 if num == 0.0 else None
    return num / den


def _top1(ref: np.ndarray, cand: np.ndarray, finite: np.ndarray) -> float | None:
    """Agreement of the predicted class; only meaningful for classifier-shaped [N, C] outputs.

    Sentence/image embeddings are [N, D] too, but their argmax is no class: a 0.997-cosine INT8 MiniLM
    "disagrees" on a third of its rows. L2-normalised rows (every finite row of unit length) are taken as
    embeddings and judged by cosine only.
    """
    if ref.ndim != 2 or ref.shape[1] <= 1:
        return None
    rows = ref[finite] if finite.any() else ref
    norms = np.linalg.norm(rows, axis=1)
    if len(norms) and np.allclose(norms, 1.0, atol=1e-3):
        return None
    agree = (ref.argmax(axis=1) == cand.argmax(axis=1)) & finite
    return float(agree.mean())


def _feeds_as_tensors(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16 (and some other torch dtypes): those come back as float32."""
    t = t.detach().cpu()
    try:
        return t.numpy()
    except TypeError:
        return t.float().numpy()


def torch_outputs(model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> list[list[np.ndarray]]:
    """Run `model` in eval mode without gradients on each batch; outputs flattened as the ONNX exporters do.

    The model's train/eval flag is restored afterwards, so measuring fidelity never changes the model.
    """
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                try:
                    out = model(**_feeds_as_tensors(batch))
                except Exception as e:
                    raise ModelError(f"forward() failed on calibration batch {i}: {type(e).__name__}: {_first_line(e)}") from e
                flat = flatten_outputs(out)
                if not flat:
                    raise ModelError(f"forward() returned {type(out).__name__} with no tensors to compare")
                results.append([_tensor_to_numpy(t) for _, t in flat])
    finally:
        model.train(was_training)
    return results


def onnx_outputs(path: str | Path | bytes | onnx.ModelProto, batches: Sequence[Mapping[str, Any]], session_options: Any = None) -> list[list[np.ndarray]]:
    """Run an ONNX file with onnxruntime's CPU provider on each batch, feeding only the graph's own inputs.

    Batches may carry inputs the export dropped (unused by the graph); those are left out rather than rejected.
    `session_options` is for graphs the default optimisation level cannot run (FP8 Q/DQ).
    """
    opts = session_options or sessions.session_options()
    opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business here
    try:
        sess = sessions.session(path, opts)
    except Exception as e:
        raise ModelError(f"onnxruntime cannot load {_named(path)}: {_first_line(e)}") from e
    names = [i.name for i in sess.get_inputs()]
    results = []
    for i, batch in enumerate(batches):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ModelError(f"{path} needs input(s) {', '.join(missing)} that calibration batch {i} does not have")
        feeds = {n: _feed_numpy(batch[n]) for n in names}
        try:
            results.append(list(sess.run(None, feeds)))
        except Exception as e:
            raise RuntimeFailure(f"onnxruntime failed running {_named(path)} on calibration batch {i}: {_first_line(e)}") from e
    return results


def _named(model: Any) -> str:
    return str(model) if isinstance(model, (str, Path)) else "the model in memory"


def _feed_numpy(v: Any) -> np.ndarray:
    return _tensor_to_numpy(v) if isinstance(v, torch.Tensor) else np.ascontiguousarray(v)
