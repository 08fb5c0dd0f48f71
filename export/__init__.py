"""torch -> ONNX export, verified against torch on the same inputs before anything is written, and the metadata
that travels inside every ONNX file we write.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "metadata": ["get_metadata", "input_specs", "set_metadata"],
    "onnx_export": ["ExportResult", "export_onnx", "flatten_outputs", "silenced", "write_model"],
}, modules=("metadata",))
