"""`compress.quantize`: an ONNX model to INT8, FP8 or INT4 for a device, with its fidelity, fallback and speedup."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from compress.core import check_onnx_output, warn
from compress.data import DataOptions, data_opts_of, is_data, user_data
from compress.evaluate import load_metric
from compress.models import onnx_model_inputs
from compress.quantization import QuantOptions, check_format, quant_stage
from devices import load_profile
from runtime import check_model


def quantize(model: Union[str, Path], *, output: Union[str, Path], to: str = QuantOptions.default("to"),
             device: str = "host", calib: Optional[str] = None, method: str = QuantOptions.default("method"),
             tolerance: Optional[float] = None, eval: Optional[str] = None, metric: Optional[str] = None,
             backend: str = QuantOptions.default("backend"), simulate: bool = False,
             fp8_format: str = QuantOptions.default("fp8_format"), block_size: int = QuantOptions.default("block_size"),
             budget_mb: Optional[float] = None, avg_bits: Optional[float] = None,
             salience: str = QuantOptions.default("salience"), max_calib: Optional[int] = None,
             no_measure: bool = False, no_op_select: bool = False, image_size: Optional[str] = None,
             crop_pct: Optional[float] = None, mean: Optional[str] = None, std: Optional[str] = None,
             interpolation: Optional[str] = None, seq_len: Optional[int] = None, tokenizer: Optional[str] = None,
             column: Optional[str] = None, label_column: str = DataOptions.default("label_column"),
             skip_bad: bool = False, on_stage: Optional[Callable[[str], None]] = None) -> Any:
    """Quantize MODEL (.onnx) to OUTPUT as DEVICE runs it fastest; the compress.report.QuantResult (`fidelity`,
    `speedup_vs_fp32`, `excluded_layers`, `latency`, ...). Nothing is written to OUTPUT on failure.

    Keyword arguments are `compress quantize`'s options (`to="int8"|"fp8"|"int4"`, `eval=` for --eval,
    `no_measure=True` for --no-measure), with its defaults. Without `calib` the scales come from synthetic inputs
    (warned). `on_stage(text)` hears what it is doing; None: nothing is reported.

        >>> import compress
        >>> q = compress.quantize("model.onnx", to="int8", calib="calib.npz", output="model.int8.onnx")
        >>> q.fidelity.cosine_min, q.speedup_vs_fp32
    """
    say = on_stage or (lambda s: None)
    model = str(model)
    out = check_onnx_output(str(output), [model, calib, device, eval, metric])
    dopts = data_opts_of(locals())
    eval_data = bool(eval) and is_data(eval)
    opts = QuantOptions(to=to, method=method, tolerance=tolerance, simulate=simulate, fp8_format=fp8_format,
                        max_calib=max_calib, measure=not no_measure, select_ops=not no_op_select, calib_name=calib,
                        evaluate=None if eval_data else load_metric(eval, metric), backend=backend,
                        block_size=block_size, budget_mb=budget_mb, avg_bits=avg_bits, salience=salience)
    profile = load_profile(device)
    chosen = check_format(profile, opts)
    check_model(Path(model))
    if calib is None and chosen.synthetic_data_spoils:
        warn(f"no --calib: {chosen.synthetic_data_spoils} come from synthetic inputs, which are wrong for real data; "
             "pass --calib DATA with real samples")
    with user_data(onnx_model_inputs(model), dopts, out.absolute().parent, calib, eval, max_calib) as data:
        if eval_data:
            opts.evaluate = load_metric(data.eval, metric)
        say("quantizing")
        return quant_stage(Path(model), out, profile, data.calib, opts, on_stage=say)
