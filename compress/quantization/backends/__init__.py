"""One module per quantization backend; each registers itself with compress.quantization.registry (see there)."""
