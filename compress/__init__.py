"""edge-compress: prune, quantize, export and profile PyTorch models for edge devices.

The Python API (compress.api) is named here, one function per command: `compress.export(...)`,
`compress.prune(...)`, `compress.quantize(...)`, `compress.formats(...)`, `compress.profile(...)`,
`compress.run(...)`, `compress.search(...)`, `compress.sweep(...)`, `compress.compare(...)`."""

__version__ = "0.1.0"

from compress.core import lazy_exports  # noqa: E402  (after __version__, which compress.core's modules read)

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "api": ["compare", "export", "formats", "profile", "prune", "quantize", "run", "search", "sweep"]})
