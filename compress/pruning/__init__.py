"""Pruning: structural channel/head pruning (Torch-Pruning) with an importance registry, unstructured and 2:4
sparsity masks, per-block ratios from measured sensitivity and latency, label-free recovery, and the prune stage that runs them in order (prune_stage).

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "importance": ["IMPORTANCE", "check_applicable", "get_importance"],
    "sparsity": ["SPARSITY_NOTE", "zipped_size"],
    "allocate": ["Allocation", "prune_units"],
    "options": ["ALLOCATIONS", "PruneOptions"],
    "stage": ["prune_stage"],
    "structural": ["count_macs"],
})
