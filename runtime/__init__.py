"""onnxruntime sessions built from a device profile, the latency profiler, and the device-side runner."""
