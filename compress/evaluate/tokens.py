"""Fidelity for language models: next-token agreement with the reference, and perplexity on the held-out text.

A decoder's logits [N, T, V] are a prediction per position; the cosine of the whole block, the label-free rule
for other models, says little about what a user of a generating model sees: `compress run ./tiny-gpt2 --calib
ids.npz --generate --quant int4` (the trained byte-level GPT-2 of bench/, 64 windows of 32 bytes of json's
source, 16 held out) gave INT4 a worst cosine of 0.99985 while 3.2% of its next tokens differed from fp32's.
So where the run knows the model generates (`compress run --generate`), both are measured: next-token agreement
(the share of positions whose arg-max token is the reference's, the classifier rule applied per position;
llama.cpp's "same top p") and each model's perplexity on the held-out tokens (each position predicting the next;
padding masked out), the figure Optimum and onnxruntime-genai users compare formats by. On real text (--calib)
the tolerance bounds the relative increase of perplexity over the reference's: in that run INT4's perplexity was
6.196 against fp32's 6.210 (the 3.2% were near ties), which 1 - agreement would have refused at the default 1%.
On random tokens it bounds 1 - agreement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np


def token_ids(batches: Sequence[Mapping[str, Any]]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) [N, T] over the batches (concatenated on axis 0), or None where a batch has no `input_ids`.
    The mask is `attention_mask` where the batches carry one, else all ones."""
    ids, masks = [], []
    for b in batches:
        if "input_ids" not in b:
            return None
        x = np.asarray(b["input_ids"])
        if x.ndim != 2:
            return None
        ids.append(x.astype(np.int64, copy=False))
        m = b.get("attention_mask")
        masks.append(np.ones_like(ids[-1]) if m is None else np.asarray(m).astype(np.int64, copy=False))
    if not ids or len({x.shape[1] for x in ids}) != 1:
        return None
    return np.concatenate(ids), np.concatenate(masks)


def token_fidelity(ref: np.ndarray, cand: np.ndarray, ids: np.ndarray, mask: np.ndarray, finite: np.ndarray,
                   real: bool = False) -> Optional[dict[str, Any]]:
    """next_token_agreement, perplexity (the candidate's) and reference_perplexity for logits [N, T, V] of the
    tokens `ids` [N, T]; None where the logits are not laid out so (a sample with non-finite outputs agrees on
    nothing and makes the perplexity None: it cannot be vouched for). Positions are those whose token and next
    token are both unmasked. `real`: the tokens are real text, so perplexity_increase (the candidate's over the
    reference's, relative) is what the tolerance bounds; on random tokens a model made worse can have a lower
    perplexity (flatter predictions), so there the agreement is judged."""
    if ref.ndim != 3 or ref.shape[:2] != ids.shape or ref.shape[2] <= 1 or ids.shape[1] < 2:
        return None
    valid = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)  # position t predicts token t + 1
    positions = int(valid.sum())
    if positions == 0:
        return None
    agree = (ref[:, :-1].argmax(axis=-1) == cand[:, :-1].argmax(axis=-1)) & finite[:, None] & valid
    out: dict[str, Any] = {"next_token_agreement": float(agree.sum() / positions), "perplexity": None,
                           "reference_perplexity": _perplexity(ref, ids, valid), "token_positions": positions}
    if finite.all():
        out["perplexity"] = _perplexity(cand, ids, valid)
    if real:
        ppl, base = out["perplexity"], out["reference_perplexity"]
        out["perplexity_increase"] = None if ppl is None or not base else ppl / base - 1.0  # None: judged as 0/1
    return out


def _perplexity(logits: np.ndarray, ids: np.ndarray, valid: np.ndarray) -> Optional[float]:
    """exp of the mean negative log-likelihood of each next token, one sample at a time in float64 (a [T, V]
    block of a 50k vocabulary is 50 MB at T = 128; the whole [N, T, V] in float64 need not exist at once)."""
    total, count = 0.0, 0
    for x, y, v in zip(logits, ids, valid):
        if not v.any():
            continue
        z = x[:-1][v].astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z[np.arange(len(z)), y[1:][v]] - np.log(np.exp(z).sum(axis=-1))
        total -= float(logp.sum())
        count += len(z)
    if count == 0:
        return None
    value = float(np.exp(total / count))
    return value if np.isfinite(value) else None
