"""Weight-only INT4 for MatMuls (MatMulNBits), with 4/8-bit/float per layer allocated by salience under
--budget-mb or --avg-bits (compress.quantization.int4). Steered by its size budget, not by --tolerance."""

from __future__ import annotations

from typing import Any

from compress.core import UsageError
from compress.quantization.registry import Backend, Quantized, QuantJob


class Int4(Backend):
    format = "int4"
    backend = "ort"
    tolerance = False
    in_default_search = False
    synthetic_data_spoils = "layer salience and fidelity"

    def check(self, profile: Any, opts: Any) -> None:
        from compress.quantization.int4 import check_options

        check_options(opts.block_size, opts.budget_mb, opts.avg_bits, opts.salience)
        if opts.tolerance is not None or opts.evaluate is not None:
            raise UsageError("--to int4 is steered by --budget-mb or --avg-bits, not --tolerance/--eval")

    def quantize(self, job: QuantJob) -> Quantized:
        from compress.quantization.int4 import MB, quantize_int4

        opts = job.opts
        feeds = job.feeds(seed=0, max_samples=opts.max_calib or 16)
        job.on_stage(f"quantizing MatMul weights to INT4 (block {opts.block_size})")
        result = quantize_int4(job.fp32, job.out, feeds, job.held, block_size=opts.block_size,
                               budget_mb=opts.budget_mb, avg_bits=opts.avg_bits, salience_from=opts.salience,
                               on_stage=job.on_stage)
        above_4 = [{"node": r["node"], "op_type": r["op_type"], "bits": r["bits"], "salience": r["salience"],
                    "why": r["why"]} for r in result["layers"] if r["bits"] != 4]
        return Quantized(job.out, {k: v for k, v in result.items() if k != "path"}, fidelity=result["fidelity"],
                         excluded_layers=above_4,
                         report={"size_mb": result["size_bytes"] / MB, "fp32_size_mb": result["fp32_size_bytes"] / MB,
                                 "avg_bits": result["avg_bits"], "stored_bits": result["stored_bits"]})
