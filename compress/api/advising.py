"""`compress.formats`: which 8-bit format (INT8 per-tensor/per-channel, FP8 E4M3/E5M2) for this model on this
device, from measurements on the user's data (compress.quantization.advisor)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from compress.core import InputError, UsageError, atomic_path, check_output_path
from compress.data import DataOptions, data_opts_of, user_data
from compress.models import onnx_model_inputs
from compress.quantization import advise, advisor_report
from compress.report import FormatAdvice
from devices import load_profile

PathLike = Union[str, Path]


def formats(model: PathLike, device: str, *, calib: Optional[str] = None, max_calib: Optional[int] = None,
            tolerance: float = 0.01, max_layers: Optional[int] = None, plot: Optional[PathLike] = None,
            output: Optional[PathLike] = None, image_size: Optional[str] = None, crop_pct: Optional[float] = None,
            mean: Optional[str] = None, std: Optional[str] = None, interpolation: Optional[str] = None,
            seq_len: Optional[int] = None, tokenizer: Optional[str] = None, column: Optional[str] = None,
            label_column: str = DataOptions.default("label_column"), skip_bad: bool = False,
            on_stage: Optional[Callable[[str], None]] = None) -> FormatAdvice:
    """Measure INT8 and FP8 fidelity per layer and for the whole MODEL (.onnx) on CALIB, and recommend a format for
    DEVICE; the compress.report.FormatAdvice (`recommendation["format"]`, `whole_model`, `layers`). With `plot`
    (PNG) and `output` (Markdown) those files are written too.

    Keyword arguments are `compress formats`' options, with its defaults. `on_stage(text)` hears each step.

        >>> import compress
        >>> a = compress.formats("model.onnx", "host", calib="calib.npz")
        >>> a.recommendation["format"], a.whole_model["int8_per_channel"]["error"]
    """
    say = on_stage or (lambda s: None)
    model = str(model)
    if not 0 <= tolerance < 1:
        raise UsageError(f"--tolerance {tolerance}: must be in [0, 1)")
    if max_layers is not None and max_layers < 0:
        raise UsageError(f"--max-layers {max_layers}: must be >= 0")
    inputs = [model, calib, device]
    for flag, p in (("--plot", plot), ("-o", output)):
        if p:
            check_output_path(str(p), inputs, flag=flag)
    if plot and output and Path(plot).expanduser().absolute() == Path(output).expanduser().absolute():
        raise UsageError(f"--plot {plot} is also the -o output; choose another path")
    if not Path(model).expanduser().is_file():
        raise InputError(f"model {model} not found")
    dopts = data_opts_of(locals())
    profile = load_profile(device)
    written = output or plot
    near = Path(written).expanduser().absolute().parent if written else Path(tempfile.gettempdir())
    with user_data(onnx_model_inputs(model), dopts, near, calib, max_calib=max_calib) as data:
        say("measuring formats")
        report = advise(model, profile, data.calib, tolerance=tolerance, max_layers=max_layers, calib_label=calib,
                        on_step=say)
    if plot:
        advisor_report.plot_formats(report, plot)
        report["plot"] = str(plot)
    if output:
        with atomic_path(output) as tmp:
            rel = os.path.relpath(Path(plot).absolute(), Path(output).absolute().parent) if plot else None  # as the .md sees it
            tmp.write_text(advisor_report.markdown(report, plot=rel))
        report["markdown"] = str(output)
    return FormatAdvice.from_json(report)
