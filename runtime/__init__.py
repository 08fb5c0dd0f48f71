"""Profiling on the device: the profiler (host side), the SSH transport, interleaved A/B timing on this
machine, and the device-side runner (runner.py, one self-contained file copied to devices, not imported here).

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "abtest": [
        "MAX_BURST", "THREAD_GAIN", "WARM_BURST_MS", "TunedAB", "device_latency", "fewest_fastest", "interleaved_latency", "thread_candidates",
        "tuned_latency",
    ],
    "profiler": ["DEFAULT_MAX_SECONDS", "check_model", "decode_step_feeds", "profile_model", "resolve_providers",
                 "unsized_axis"],
    "remote": ["Target", "probe", "resolve_spec"],
    "result": ["GenerationTiming", "Latency", "PROFILE_SCHEMA", "ProfileResult", "Spread", "check_profile"],
})
