"""Pruning: structural channel/head pruning (Torch-Pruning) with an importance registry, unstructured and 2:4
sparsity masks, label-free recovery, and the prune stage that runs them in order (prune_stage).

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "importance": ["IMPORTANCE", "check_applicable", "get_importance"],
    "sparsity": ["SPARSITY_NOTE", "zipped_size"],
    "options": ["PruneOptions"],
    "stage": ["prune_stage"],
    "structural": ["count_macs"],
})
