"""One module per quantization backend; each registers itself with compress.quantize.registry (see there)."""
