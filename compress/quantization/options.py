"""The options of the quantize stage, one set for `compress quantize`, `compress run --quant` and the search."""

from __future__ import annotations

from typing import Any, Optional

from compress.core import Options

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")  # onnxruntime's calibrators, for static INT8
# What a search tries: onnxruntime 1.32's quantize_static runs its entropy calibrator with 128 histogram bins for
# 128 levels and passes no option to change them, so its KL search keeps the whole range: the scales of minmax
# (the demo pruned 25%: all 45 the same). With 2048 bins (the calibrator called directly) it clipped far too
# much there: accuracy 0.934 against 0.975, held-out cosine min 0.44 against 0.998 (AVX2 kernels).
SEARCHED_METHODS = ("minmax", "percentile")


class QuantOptions(Options):
    to: str = "int8"
    method: str = "minmax"
    tolerance: Optional[float] = None  # None: no fallback search
    simulate: bool = False
    fp8_format: str = "e4m3fn"
    max_calib: Optional[int] = None
    calib_name: Optional[str] = None  # how reports name --calib: the user's DATA when it was read into an .npz
    measure: bool = True
    backend: str = "ort"  # INT8: "ort" (onnxruntime's quantizer on the ONNX graph) or "inc" (INC PT2E in torch)
    evaluate: Any = None  # --eval: the user's score (a compress.evaluate.Metric); --tolerance then bounds its drop
    # INT8: time each quantized op against fp32 and keep fp32 where INT8 is not faster; any format: time what each
    # layer the fallback may keep in float costs the whole model, and rank them by salience per millisecond
    select_ops: bool = True
    # the float fallback stops where keeping more layers in float would leave the model no faster than its input
    # (estimated from the layers' timed costs): `compress run` keeps a variant only if it pays; `compress quantize`
    # is asked for a model within the tolerance, whatever its speed
    fallback_must_pay: bool = False
    block_size: int = 32  # INT4: weights per scale
    budget_mb: Optional[float] = None  # INT4: total model size; layers go 8-bit or float by salience within it
    avg_bits: Optional[float] = None  # INT4: the budget as nominal bits per quantized weight (4/8/32 each)
    salience: str = "measured"  # INT4: "measured" (one model per layer) or "proxy" (weights x activations, one pass)
