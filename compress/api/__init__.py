"""The Python API: what the `compress` commands do, as functions a script or a CI job calls, with the commands'
option names as keyword arguments, the typed results back (their `.to_json()` is what `--json` prints), and the
project's own exceptions (compress.core: InputError, UsageError, ...; each message the one line the CLI prints).
The CLI is a thin layer over these. `import compress` names them: `compress.export(...)`, `compress.prune(...)`,
`compress.quantize(...)`, `compress.formats(...)`, `compress.profile(...)`, `compress.run(...)`,
`compress.search(...)`, `compress.sweep(...)`, `compress.compare(...)`.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "advising": ["formats"],
    "comparing": ["compare"],
    "exporting": ["export"],
    "profiling": ["input_specs", "profile"],
    "pruning": ["prune"],
    "quantizing": ["quantize"],
    "running": ["run"],
    "searching": ["search", "sweep", "sweep_cells"],
})
