"""INT8 with Intel Neural Compressor: PT2E static quantization of the PyTorch module, exported to ONNX QDQ. It
has no per-layer fallback (the graph is quantized in torch), so --tolerance is only reported against."""

from __future__ import annotations

from compress.quantization.registry import Backend, Quantized, QuantJob


class Int8Inc(Backend):
    format = "int8"
    backend = "inc"
    takes = "torch"
    synthetic_data_spoils = "quantization scales"

    def quantize(self, job: QuantJob) -> Quantized:
        from compress.quantization.inc import quantize_inc

        job.on_stage("quantizing to INT8 with Intel Neural Compressor (PT2E, in torch)")
        assert job.torch_source is not None  # the stage refuses a torch backend without one
        module, example, batches = job.torch_source
        result = quantize_inc(module, example, batches, job.out, job.profile, on_stage=job.on_stage)
        return Quantized(job.out, {k: v for k, v in result.items() if k != "path"}, preset=result.get("preset"))
