"""FP8 (E4M3FN / E5M2) Q/DQ with scales we compute ourselves; simulated (fidelity only) on a device without
FP8 hardware when the user asks for it with --simulate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.core import UsageError
from compress.quantization.registry import Backend, Outputs, Quantized, QuantJob


class Fp8(Backend):
    format = "fp8"
    backend = "ort"
    needs = "fp8"
    synthetic_data_spoils = "quantization scales"

    def check(self, profile: Any, opts: Any) -> None:
        if not profile.fp8 and not opts.simulate:
            raise UsageError(f"device {profile.name!r} has no FP8 hardware: use --to int8 (INT8 dot-product units: "
                             f"{'yes' if profile.int8_dot else 'no'}), or add --simulate to measure FP8 fidelity only")
        super().check(profile, opts)

    def outputs(self) -> tuple[Outputs, Any]:
        from compress.quantization.fp8 import fp8_outputs, fp8_session_options

        return fp8_outputs, fp8_session_options()

    def quantize(self, job: QuantJob) -> Quantized:
        from compress.quantization.fp8 import quantize_fp8

        opts = job.opts
        job.on_stage(f"quantizing to FP8 ({opts.fp8_format}{', simulated' if job.simulated else ''})")
        feeds = job.feeds(seed=0, max_samples=opts.max_calib or 64)
        result = quantize_fp8(job.fp32, job.out, feeds, fmt=opts.fp8_format, simulated=job.simulated)

        def requantize(src: Path, out: Path, nodes: list[str], only: bool) -> None:
            kw = {"include": nodes} if only else {"exclude": nodes}
            quantize_fp8(src, out, feeds, fmt=opts.fp8_format, simulated=job.simulated, **kw)

        return Quantized(job.out, {k: v for k, v in result.items() if k != "path"}, requantize=requantize)
