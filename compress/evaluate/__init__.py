"""How close a compressed model stays: label-free fidelity against the reference (torch or ONNX outputs), and
the user's own score (--eval, --metric).

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "compare": ["fidelity", "onnx_outputs", "torch_outputs"],
    "tolerance_rule": ["judged"],
    "detection": ["box_fidelity", "is_detection_head"],
    "user_metric": ["LabelledMetric", "Metric", "load_metric"],
})
