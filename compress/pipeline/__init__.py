"""`compress run`: load -> prune -> export -> quantize -> profile every variant on the device -> recommend ->
report, with a stage cache so that a rerun reuses finished stages.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "options": ["RunOptions"],
    "run": ["run_pipeline"],
    "timing": ["Timings", "time_variants"],
    "stage_cache": ["StageCache"],
})
