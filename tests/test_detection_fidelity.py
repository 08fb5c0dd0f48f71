"""Fidelity for detectors: boxes kept after NMS and matched, where the raw-tensor cosine hides what a user
loses (every score of a YOLO head rounded away by one INT8 scale shared with the boxes)."""

from __future__ import annotations

import numpy as np
import pytest

from compress.evaluate import box_fidelity, fidelity, is_detection_head, judged
from compress.evaluate.detection import CONF, detections
from compress.quantization.sensitivity import metric_error
from compress.report.schema import Fidelity
from compress.report.text import fidelity_metric, fmt_fidelity

CLASSES, ANCHORS = 6, 256


def _yolo_output(n: int = 4, seed: int = 0) -> np.ndarray:
    """(n, 4 + C, A) as ultralytics' Detect head writes it: boxes (cx, cy, w, h) in pixels of a 320 image, class
    scores after the sigmoid: mostly ~0.01, with three objects per image, each found by a few overlapping anchors."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 4 + CLASSES, ANCHORS), np.float32)
    out[:, 0:2] = rng.uniform(0, 320, (n, 2, ANCHORS))
    out[:, 2:4] = rng.uniform(4, 40, (n, 2, ANCHORS))
    out[:, 4:] = rng.uniform(0.0, 0.02, (n, CLASSES, ANCHORS))
    for s in range(n):
        for k, (cx, cy, w, h, c) in enumerate([(60, 60, 50, 40, 0), (200, 120, 80, 90, 3), (250, 260, 30, 60, 5)]):
            for j in range(3):  # three anchors on each object, slightly apart: NMS keeps the best one
                a = 10 * k + j
                out[s, :4, a] = (cx + 2 * j, cy - j, w, h)
                out[s, 4 + c, a] = 0.9 - 0.1 * j
    return out


def test_a_yolo_head_is_recognised_and_others_are_not():
    y = _yolo_output()
    assert is_detection_head(y)
    assert not is_detection_head(np.random.default_rng(0).standard_normal((4, 10)))  # a classifier
    assert not is_detection_head(y[:, :, :32])  # too few anchors for a dense head
    assert not is_detection_head(np.transpose(y, (0, 2, 1)))  # channels last: judged by the cosine
    logits = y.copy()
    logits[:, 4:] = logits[:, 4:] * 8 - 4  # scores before the sigmoid: not in [0, 1]
    assert not is_detection_head(logits)


def test_nms_keeps_one_box_per_object_and_class():
    boxes, scores, classes = detections(_yolo_output(1)[0])
    assert len(boxes) == 3 and sorted(classes.tolist()) == [0, 3, 5]
    assert scores.tolist() == pytest.approx([0.9, 0.9, 0.9], abs=1e-6)
    assert boxes[classes == 0][0] == pytest.approx([35, 40, 85, 80])  # cx 60, w 50 -> x 35..85


def test_identical_shifted_and_lost_boxes():
    ref = _yolo_output()
    same = box_fidelity(ref, ref.copy())
    assert same["f1"] == 1.0 and same["iou_mean"] == pytest.approx(1.0) and same["reference_boxes"] == 12
    shifted = ref.copy()
    shifted[:, 0, :] += 6.0  # every box 6 px to the right: still matched, IoU below 1
    moved = box_fidelity(ref, shifted)
    assert moved["f1"] == 1.0 and 0.7 < moved["iou_mean"] < 0.95
    lost = ref.copy()
    lost[:, 4 + 3, :] *= 0.2  # class 3 no longer passes the confidence threshold
    gone = box_fidelity(ref, lost)
    assert gone["candidate_boxes"] == 8 and gone["matched"] == 8 and gone["f1"] == pytest.approx(2 * 8 / 20)
    relabelled = ref.copy()
    relabelled[:, [4 + 0, 4 + 1]] = relabelled[:, [4 + 1, 4 + 0]]  # class 0's object now said to be class 1
    assert box_fidelity(ref, relabelled)["f1"] == pytest.approx(2 * 8 / 24)


def test_one_shared_int8_scale_keeps_the_cosine_and_loses_every_box():
    """YOLOv8n's case: boxes (0-640 px) and scores (0-1) through one uint8 scale (2.5 px a step). The whole
    output's cosine stays ~1, so a raw-tensor tolerance passes it; no score survives the threshold, and the
    boxes say so."""
    ref = _yolo_output()
    ref[:, 0, 200] = 640.0  # an anchor at the right edge of a 640-pixel image
    scale = float(ref.max()) / 255.0
    rounded = (np.clip(np.round(ref / scale), 0, 255) * scale).astype(np.float32)
    fid = fidelity([ref], [rounded])
    assert fid["cosine_min"] > 0.999
    assert fid["boxes"]["candidate_boxes"] == 0 and fid["boxes"]["f1"] == 0.0
    assert judged(fid) == ("boxes", 1.0)
    assert Fidelity(**fid).loss() == 1.0 and not Fidelity(**fid).within(0.01)
    assert metric_error(fid, "boxes") == 1.0
    from compress.tuning.trials import fidelity_value  # what a search ranks trials by: the same rule

    assert fidelity_value(fid) == 0.0 and fidelity_value({**fid, "boxes": None}) == pytest.approx(fid["cosine_min"])
    # the same tensors with the scores on their own scale keep every box
    fine = ref.copy()
    fine[:, 4:] = np.round(ref[:, 4:] * 255) / 255
    fine[:, :4] = rounded[:, :4]
    assert judged(fidelity([ref], [fine]))[1] == 0.0


def test_a_detector_whose_reference_keeps_no_box_is_judged_by_the_cosine():
    """Random weights: every score far under the threshold. "No boxes in both" is no evidence."""
    ref = _yolo_output()
    ref[:, 4:] = np.minimum(ref[:, 4:], CONF / 10)
    fid = fidelity([ref], [ref * 1.001])
    assert fid["boxes"]["reference_boxes"] == 0
    assert judged(fid)[0] == "cosine_min"


def test_reports_show_the_boxes_where_every_variant_has_them():
    ref = _yolo_output()
    fid = fidelity([ref], [ref])
    report = {"variants": [{"name": "fp32", "fidelity": fid}, {"name": "int8", "fidelity": fid}]}
    assert fidelity_metric(report) == "boxes"
    assert fmt_fidelity(fid, "boxes") == "boxes F1 100.0%"
    report["variants"][1]["fidelity"] = fidelity([np.zeros((4, 10))], [np.zeros((4, 10))])
    assert fidelity_metric(report) != "boxes"
