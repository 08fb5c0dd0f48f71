"""The one rule every stage and the report judge a tolerance by, in a module of its own so that what only reads
figures (budgets, reports) judges them without importing torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def judged(fid: Mapping[str, Any]) -> tuple[str, float]:
    """(metric, error) that a tolerance bounds for these figures (a fidelity dict): 1 - the F1 of matched boxes
    for a detector whose reference keeps boxes ("boxes"), for a language model judged as it generates
    (compress.evaluate.tokens) the relative increase of perplexity on real text ("perplexity") or else 1 -
    next-token agreement ("next_token"), 1 - top-1 agreement for a classifier ("top1"), else 1 - the
    worst per-sample cosine ("cosine_min"); every stage and the report judge by this one rule."""
    boxes = fid.get("boxes")
    if boxes and boxes.get("reference_boxes"):
        return "boxes", 1.0 - float(boxes["f1"])
    if fid.get("perplexity_increase") is not None:
        return "perplexity", max(0.0, float(fid["perplexity_increase"]))
    if fid.get("next_token_agreement") is not None:
        return "next_token", 1.0 - float(fid["next_token_agreement"])
    if fid.get("top1_agreement") is not None:
        return "top1", 1.0 - float(fid["top1_agreement"])
    cos = fid.get("cosine_min")
    return "cosine_min", float("inf") if cos is None else 1.0 - float(cos)
