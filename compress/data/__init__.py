"""The user's data for --calib and --eval: one registry of sources (arrays, image folders, text files, Hugging
Face datasets), each read sample by sample and written once to the .npz every command reads lazily.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "npz_rows": ["Member", "npz_members", "read_rows"],
    "options": ["DataOptions"],
    "registry": ["DataSource", "ModelInputs", "SOURCES", "Sample", "register"],
    "resolve": ["Resolved", "is_data", "open_source", "read_option", "resolve_data", "source_forms"],
    "user_files": ["UserData", "data_opts", "data_opts_of", "user_data"],
    "writer": ["materialize"],
})
