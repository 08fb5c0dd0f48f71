"""The bottom floor: what every other room, and devices/, export/ and runtime/ below the application, may
use: error types with their exit codes, Ctrl-C that libraries cannot swallow, terminal output, stage clocks, atomic writes,
ONNX graph helpers, the one onnxruntime session factory and the base of typed results. It imports nothing else of the project.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "atomic": [
        "atomic_dir", "atomic_path", "check_foreign", "check_json_output", "check_onnx_output", "check_output_path",
        "claim_folder", "default_mode", "foreign_files", "move_aside", "partial_dir", "swap_in", "write_json",
        "write_manifest",
    ],
    "clock": ["StageClock"],
    "console": ["warn"],
    "extras": ["EXTRA_OF", "missing_extra"],
    "errors": ["BudgetMissed", "DeviceError", "EdgeError", "InputError", "ModelError", "RuntimeFailure", "UsageError", "few", "first_line"],
    "interrupt": ["check_interrupted", "reraise_if_interrupted"],
    "lazy": ["lazy_exports"],
    "onnxgraph": ["TWO_GB", "drop_unused", "graph_macs", "initializer_bytes", "nonfinite_initializers", "save_model"],
    "options": ["Options"],
    "results": ["OpenResult", "Result"],
}, modules=("atomic", "console", "errors", "interrupt", "onnxgraph", "sessions"))
