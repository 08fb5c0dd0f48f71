"""Quantization: one registry of backends (onnxruntime INT8, INC INT8, FP8, weight-only INT4; registry.py and
one module each in backends/), device presets, calibration,
pre-processing, latency-aware op selection, accuracy-aware fallback, the quantize stage that runs a backend and
judges it (quant_stage), and the format advisor (`compress formats`).

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "advisor": ["advise"],
    "fp8": ["fp8_outputs", "fp8_session_options"],
    "registry": [
        "Backend", "QuantJob", "Quantized", "backend_for", "backend_names", "format_info", "format_names",
    ],
    "options": ["CALIBRATION_METHODS", "SEARCHED_METHODS", "QuantOptions"],
    "stage": ["check_format", "quant_stage"],
}, modules=("advisor_report",))
