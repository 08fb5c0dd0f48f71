"""Factories for bench/arch_suite.py: timm and ultralytics models from their own code, random weights, no download.

The folder in $EDGE_COMPRESS_ARCH_SITE (see arch_suite.py) goes on sys.path, after declaring the two torchvision
op schemas its CUDA-built wheel cannot register against the CPU torch (torchvision's Python code then imports;
neither timm's classifiers nor YOLO's forward calls those ops: NMS is post-processing).
"""

from __future__ import annotations

import os
import sys

import torch
from arch_list import TIMM, YOLO

_SITE = os.environ.get("EDGE_COMPRESS_ARCH_SITE")
if _SITE and _SITE not in sys.path:
    sys.path.insert(0, _SITE)
_LIB = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas last as long as this object
for _op in ("nms", "qnms"):
    _LIB.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
os.environ.setdefault("YOLO_OFFLINE", "1")

import timm  # noqa: E402

try:  # imported now: the model file's sys.path is gone by the time a factory runs
    from ultralytics.nn.tasks import DetectionModel
except ImportError:  # timm alone: the YOLO factories say so
    DetectionModel = None


def _timm(name: str):
    return lambda: timm.create_model(name, pretrained=False)


def _yolo(config: str):
    def build():
        if DetectionModel is None:
            raise ImportError(f"{config}: ultralytics is not in $EDGE_COMPRESS_ARCH_SITE")
        model = DetectionModel(config, verbose=False)
        model.model[-1].export = True  # the head's decoded boxes and scores, as an exported YOLO carries them
        return model.eval()

    return build


for _name in TIMM:
    globals()[_name] = _timm(_name)
for _name, _config in YOLO.items():
    globals()[_name] = _yolo(_config)
