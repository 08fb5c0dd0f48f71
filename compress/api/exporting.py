"""`compress.export`: a PyTorch model to an ONNX file verified against torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from compress.core import UsageError, check_onnx_output
from compress.data import DataOptions, data_opts_of, user_data
from compress.models import (
    calib_samples,
    check_calib_names,
    example_inputs,
    load_calib,
    load_model,
    model_inputs,
    parse_input_shape,
    require_one_input_source,
    shape_args,
)
from devices import load_profile
from export import DEFAULT_NEW_TOKENS, GENERATION_OPSET, export_onnx, export_with_past, find_decoder

DEFAULT_OPSET = 18  # without a device profile to take one from


def export(model: str, *, output: Union[str, Path], weights: Optional[str] = None,
           input_shape: Union[str, Sequence[str]] = (), calib: Optional[str] = None, device: Optional[str] = None,
           opset: Optional[int] = None, dynamic_batch: bool = False, exporter: str = "auto", atol: float = 1e-4,
           rtol: float = 1e-3, image_size: Optional[str] = None, crop_pct: Optional[float] = None,
           mean: Optional[str] = None, std: Optional[str] = None, interpolation: Optional[str] = None,
           seq_len: Optional[int] = None, tokenizer: Optional[str] = None, column: Optional[str] = None,
           label_column: str = DataOptions.default("label_column"), skip_bad: bool = False, with_past: bool = False,
           new_tokens: int = DEFAULT_NEW_TOKENS, on_stage: Optional[Callable[[str], None]] = None) -> Any:
    """Export MODEL (FILE.py:factory, package.module:factory or a Hugging Face folder) to OUTPUT (.onnx), checked
    against torch on the example (and up to three more calibration samples); the export.ExportResult. Nothing is
    written unless onnxruntime's outputs match torch's within atol/rtol. Keyword arguments are `compress
    export`'s options; `on_stage(text)` hears what it is doing.

    `with_past=True` exports a decoder for generation instead: its KV cache as inputs and outputs (one graph for
    prefill and decode steps), written only when its greedy generation of `new_tokens` tokens from the example's
    `input_ids` equals torch's token for token; the export.GenerationExport.

        >>> import compress
        >>> r = compress.export("compress.zoo:resnet_tiny", input_shape="1,3,32,32", output="tiny.onnx")
        >>> r.exporter, r.parity["max_abs_err"]
    """
    say = on_stage or (lambda s: None)
    shapes = shape_args(input_shape)
    require_one_input_source(shapes, calib)
    out = check_onnx_output(str(output), [model, weights, calib, device])
    parsed = [parse_input_shape(s) for s in shapes]
    if opset is None:  # a decoder with its cache takes the device's generation opset (fused attention at 23)
        prof = load_profile(device) if device else None
        opset = (prof.generation_opset if with_past else prof.opset) if prof else \
            (GENERATION_OPSET if with_past else DEFAULT_OPSET)
    dopts = data_opts_of(locals())
    say("loading model")
    loaded = load_model(model, weights)
    if with_past:
        find_decoder(loaded.module)  # a model with nothing to generate fails before any data is read
    with user_data(model_inputs(loaded, shapes), dopts, out.absolute().parent, calib, max_calib=4) as got:
        data = None
        if got.calib:
            data = load_calib(got.calib)
            check_calib_names(data, loaded, calib)
        example = example_inputs(loaded, parsed, data)
        if with_past:
            if "input_ids" not in example:
                raise UsageError(f"--with-past needs the prompt as input_ids (--input-shape input_ids=1,LENGTH or "
                                 f"text --calib); {model} takes {', '.join(example)}")
            return export_with_past(loaded.module, example["input_ids"], out, opset=opset, new_tokens=new_tokens,
                                    source=model, extra_meta={"weights": weights, "calib": calib, "device": device},
                                    on_stage=say)
        # parity on a few more real samples, one at a time
        extra = calib_samples(data, list(example), start=1, count=3) if data is not None else []
        say("exporting")
        return export_onnx(loaded.module, example, out, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter,
                           extra_cases=extra, atol=atol, rtol=rtol, source=model,
                           extra_meta={"weights": weights, "calib": calib, "device": device}, on_stage=say)
