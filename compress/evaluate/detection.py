"""Fidelity for detectors: the boxes each model keeps after NMS on the same inputs, matched one to one.

A detector's raw output hides what users lose: YOLOv8n's INT8 output with one scale for boxes (0-480 px) and
class scores (0-1) kept a cosine of ~1 to fp32 while every score came out as one value (no box survived the
confidence threshold). So where a model's first output is laid out as ultralytics' YOLOv8/11 heads write it,
(N, 4 + C, A): A anchors, each a box (cx, cy, w, h in pixels) and C class scores in [0, 1] (no objectness),
both models' outputs are decoded as ultralytics' predictor does (confidence 0.25, class-aware NMS at IoU 0.7,
at most 300 boxes), and the candidate's boxes are matched to the reference's (same class, IoU >= 0.5, greedy by
reference score). F1 of that matching is what the tolerance bounds (1 - F1); the IoU and score differences of
matched boxes are reported beside it.

Only where the reference keeps some box is this the measure: a detector with random weights scores ~1e-4
everywhere and keeps none, and "no boxes in both" says nothing; the cosine judges those.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

CONF = 0.25  # ultralytics' predict defaults
NMS_IOU = 0.7
MAX_DET = 300
MATCH_IOU = 0.5  # a candidate box is the reference's when it overlaps it this much, same class
MIN_ANCHORS = 64  # fewer "anchors" than this is not a dense detection head
MAX_WH = 7680.0  # class offset for class-aware NMS in one pass (ultralytics' max_wh)


def is_detection_head(out: np.ndarray) -> bool:
    """(N, 4 + C, A) with C >= 1, A >= MIN_ANCHORS and A > 4 + C, every score row in [0, 1] and the box rows not
    (pixels): how ultralytics' YOLOv8/11 (and YOLOv5u) export their Detect head. Channels-last or normalised
    boxes are not recognised: those models are judged by the cosine."""
    if out.ndim != 3 or out.shape[1] < 5 or out.shape[2] < MIN_ANCHORS or out.shape[2] <= out.shape[1]:
        return False
    if not np.isfinite(out).all():
        return False
    scores, boxes = out[:, 4:, :], out[:, :4, :]
    return bool(scores.min() >= 0.0 and scores.max() <= 1.0 and np.abs(boxes).max() > 1.5)


def _xyxy(cxcywh: np.ndarray) -> np.ndarray:
    cx, cy, w, h = cxcywh.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] IoU of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def detections(pred: np.ndarray, conf: float = CONF, nms_iou: float = NMS_IOU,
               max_det: int = MAX_DET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's (4 + C, A) output -> (boxes xyxy [K, 4], scores [K], classes [K]) after the confidence
    threshold and class-aware NMS, highest score first."""
    cls = pred[4:].argmax(axis=0)
    score = pred[4:].max(axis=0)
    keep = np.flatnonzero(score >= conf)
    if keep.size == 0:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    keep = keep[np.argsort(-score[keep], kind="stable")][:30000]
    boxes, score, cls = _xyxy(pred[:4, keep].T.astype(np.float64)), score[keep].astype(np.float64), cls[keep]
    shifted = boxes + (cls * MAX_WH)[:, None]  # boxes of other classes never overlap
    chosen: list[int] = []
    alive = np.ones(len(keep), dtype=bool)
    for i in range(len(keep)):
        if not alive[i]:
            continue
        chosen.append(i)
        if len(chosen) >= max_det:
            break
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        if rest.size:
            alive[rest[_iou(shifted[i:i + 1], shifted[rest])[0] > nms_iou]] = False
    idx = np.array(chosen, dtype=np.int64)
    return boxes[idx], score[idx], cls[idx]


def box_fidelity(reference: np.ndarray, candidate: np.ndarray, rows: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The candidate's boxes against the reference's, both (N, 4 + C, A), over the samples in `rows` (default:
    all): {"f1", "iou_mean", "score_mae", "matched", "reference_boxes", "candidate_boxes", ...}. With no box in
    either, f1 is 1.0 and reference_boxes 0: nothing to judge by (see the module docstring)."""
    samples = range(len(reference)) if rows is None else np.flatnonzero(rows)
    matched = n_ref = n_cand = 0
    ious: list[float] = []
    score_diffs: list[float] = []
    for s in samples:
        rb, rs, rc = detections(reference[s])
        cb, cs, cc = detections(candidate[s])
        n_ref, n_cand = n_ref + len(rb), n_cand + len(cb)
        if not len(rb) or not len(cb):
            continue
        iou = np.where(rc[:, None] == cc[None, :], _iou(rb, cb), 0.0)
        taken = np.zeros(len(cb), dtype=bool)
        for i in range(len(rb)):  # reference boxes by score, each takes its best free candidate
            j = int(np.argmax(np.where(taken, -1.0, iou[i])))
            if not taken[j] and iou[i, j] >= MATCH_IOU:
                taken[j] = True
                matched += 1
                ious.append(float(iou[i, j]))
                score_diffs.append(abs(float(rs[i] - cs[j])))
    f1 = 1.0 if n_ref + n_cand == 0 else 2.0 * matched / (n_ref + n_cand)
    return {"f1": f1, "iou_mean": float(np.mean(ious)) if ious else None,
            "score_mae": float(np.mean(score_diffs)) if score_diffs else None, "matched": matched,
            "reference_boxes": n_ref, "candidate_boxes": n_cand, "conf": CONF, "nms_iou": NMS_IOU,
            "match_iou": MATCH_IOU}
