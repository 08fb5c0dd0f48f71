"""`compress search` and `compress sweep`: many `compress run`s as Ray Tune trials (Optuna TPE over the search
space; a grid for sweeps), their Pareto set, pick and reports. Importing this room imports Ray.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "options": ["SearchSettings"],
    "results": ["Candidate", "SEARCH_SCHEMA", "SWEEP_SCHEMA", "SearchSummary", "SweepCell", "SweepSummary", "Trial"],
    "study": ["run_search"],
    "sweep": ["cells", "load_sweep", "run_sweep"],
    "trials": ["fidelity_value"],
})
