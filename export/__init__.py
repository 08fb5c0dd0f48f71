"""torch -> ONNX export, verified against torch on the same inputs before anything is written."""
