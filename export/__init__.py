"""torch -> ONNX export, verified against torch on the same inputs before anything is written, and the metadata
that travels inside every ONNX file we write.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

DEFAULT_NEW_TOKENS = 16  # --with-past: tokens of greedy generation checked against torch (here: no torch import)
# --with-past: ONNX Attention (given the KV cache), RotaryEmbedding and RMSNormalization, run fused: INT4 decode
# 1.095 ms against 2.090 at opset 18 (bench/decode_formats.py). devices' generation_opset defaults to the same.
GENERATION_OPSET = 23
PAST_PREFIX = "past_key_values."  # a decoder's KV cache inputs (--with-past); runtime/runner.py keeps its own copy

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "generation": ["GenerationCheck", "GenerationExport", "export_with_past", "find_decoder", "onnx_greedy",
                   "past_names", "present_names"],
    "past": ["empty_past", "prefill_feeds"],
    "metadata": ["get_metadata", "input_specs", "set_metadata"],
    "onnx_export": ["ExportResult", "export_onnx", "flatten_outputs", "silenced", "write_model"],
}, modules=("metadata",))
