"""Device profiles: one YAML file per target device, the schema and loader, host detection, the registry of
execution providers a profile may name, and profiles built from a probed device.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "host": ["describe_host", "normalize_arch", "usable_cores"],
    "loader": ["list_profiles", "load_profile", "parse_yaml", "read_text"],
    "probed": ["header_lines", "profile_from_probe"],
    "schema": ["DeviceProfile", "RemoteSpec"],
}, modules=("providers",))
