"""edge-compress: prune, quantize, export and profile PyTorch models for edge devices."""

__version__ = "0.1.0"
