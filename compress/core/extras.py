"""Which extra brings a package: a command that needs one that is not installed says so in one line.

`pip install edge-compress` is the core (profiling, compare, device profiles); export, prune, quantize and run
from a PyTorch model need `[torch]`, search `[search]`, the plots `[plot]`, INC `[inc]`, Hugging Face models and
data `[hf]`/`[data]` (pyproject.toml). Without this a missing extra surfaced as "ModuleNotFoundError: No module
named 'torch'" from deep inside a room.
"""

from __future__ import annotations

from typing import Optional

# top-level import name -> the extra that installs it
EXTRA_OF = {
    "torch": "torch", "torch_pruning": "torch", "onnxscript": "torch", "safetensors": "torch",
    "neural_compressor": "inc", "matplotlib": "plot", "ray": "search", "optuna": "search",
    "transformers": "hf", "tokenizers": "hf", "PIL": "data", "datasets": "data",
}


def missing_extra(e: BaseException) -> Optional[str]:
    """The one-line message for an ImportError of a package an extra installs, else None."""
    if not isinstance(e, ImportError):
        return None
    root = (getattr(e, "name", None) or "").split(".")[0]
    extra = EXTRA_OF.get(root)
    if extra is None:
        return None
    return f"this needs {root}, which is not installed: pip install 'edge-compress[{extra}]'"
