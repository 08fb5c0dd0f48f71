"""INT8 with onnxruntime's quantizer on the ONNX graph, in the device profile's preset (the default backend:
bench/quant_inc.py, 2026-11-22, resnet_demo 3.40x over fp32 against INC's 3.18x, 1 thread; MiniLM 2.57x
against 2.50x, at cosine min 0.997 against 0.991)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.quantization.registry import Backend, Quantized, QuantJob, Requantize


def _signedness(preset: dict[str, Any]) -> str:
    short = {"uint8": "U8", "int8": "S8"}
    return short[preset["activation_type"]] + short[preset["weight_type"]]


class Int8Ort(Backend):
    format = "int8"
    backend = "ort"
    calibration_methods = True
    selects_ops = True

    def quantize(self, job: QuantJob) -> Quantized:
        from compress.quantization.int8 import quantize_int8, try_presets
        from compress.quantization.presets import preset_for
        from compress.quantization.reuse import Prepared

        profile, opts = job.profile, job.opts
        job.on_stage(f"quantizing to INT8 for {profile.name}")
        result = try_presets(job.fp32, job.out, profile, job.calib_part, method=opts.method, calib_label=job.calib_label)
        preset = result.get("preset")
        chosen = preset_for(profile, _signedness(preset), family=result.get("family"))  # the faster candidate
        reuse = Prepared(job.work / "prepared")  # the stage's folder: removed with it

        def calibrated(method: str) -> Requantize:
            def requantize(src: Path, out: Path, nodes: list[str], only: bool) -> None:
                # the first result's recipe (graph rewrite, smoothing) is reused: re-tuning per layer costs minutes
                kw = {"include": nodes} if only else {"exclude": sorted(set(nodes))}
                quantize_int8(src, out, profile, job.calib_part, method=method, preset=chosen,
                              recipe=result.get("recipe"), calib_label=job.calib_label, announce=False,
                              reuse=reuse, **kw)

            return requantize

        # dynamic INT8 measures each activation's range at run time: no calibration method to try instead (on
        # MiniLM, percentile recalibration re-quantized a 90 MB model for the same error, 4.9 s)
        dynamic = result.get("mode") == "dynamic"
        return Quantized(job.out, {k: v for k, v in result.items() if k != "path"}, preset=preset,
                         requantize=calibrated(opts.method), recalibrated=None if dynamic else calibrated)
