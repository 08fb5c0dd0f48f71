"""A decoder-with-past graph's prefill feeds, without torch: the run's judge, the quantizer's calibration reader
(compress.quantization.calib: --calib token ids for a graph that also takes a KV cache) and export's own greedy
check feed the same empty past and mask of ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from export import PAST_PREFIX


def empty_past(inputs: Any, batch: int = 1) -> dict[str, np.ndarray]:
    """A past of length 0 for each past_key_values input of a graph (`inputs`: a session's get_inputs() or a
    graph's input list), at its own heads and head size: the prefill's."""
    out = {}
    for i in inputs:
        if not i.name.startswith(PAST_PREFIX):
            continue
        dims = list(i.shape) if hasattr(i, "shape") else [d.dim_value or None for d in i.type.tensor_type.shape.dim]
        out[i.name] = np.zeros((batch, int(dims[1]), 0, int(dims[3])), np.float32)
    return out


def prefill_feeds(batch: Mapping[str, Any], inputs: Any) -> dict[str, np.ndarray]:
    """A plain forward's batch ({input_ids: [n, length]}, and its attention_mask where it has one: padded text)
    as a decoder-with-past graph's prefill (`inputs`: its graph inputs): that mask, else ones, and an empty past,
    so its logits answer for the same tokens."""
    ids = _array(batch["input_ids"])
    mask = _array(batch["attention_mask"]) if batch.get("attention_mask") is not None else np.ones(ids.shape, np.int64)
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
            **empty_past(inputs, ids.shape[0])}


def _array(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)
