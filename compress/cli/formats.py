"""`compress formats`: which 8-bit format (INT8 per-tensor/per-channel, FP8 E4M3/E5M2) for this model on this
device, from measurements on the user's data (see compress.quantization.advisor)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import click

from compress.cli.options import CALIB_HELP, data_options, max_calib_option
from compress.core import console

EPILOG = """\b
Examples:
  compress formats model.onnx --device host --calib calib.npz
  compress formats model.onnx --device nvidia-h100-trt-fp8 --calib calib.npz --plot formats.png -o formats.md
  compress formats model.onnx --device my-npu.yaml --calib calib.npz --max-layers 12 --json -
"""


@click.command("formats", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--device", required=True, help="Device profile (name or YAML): which formats it executes fast.")
@click.option("--calib", metavar="DATA", help=CALIB_HELP + " Without it, synthetic data (warned).")
@max_calib_option
@data_options
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Largest acceptable whole-model error: 1 - top-1 agreement (classifiers) or 1 - min cosine.")
@click.option("--max-layers", type=int, default=None,
              help="Cap the per-layer sweep (default 24): the layers with the largest outlier ratios are measured.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the per-layer error plot (PNG).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Write the report as JSON to FILE ('-' for stdout).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write a Markdown report.")
def formats(model: str, device: str, calib: str | None, max_calib: int | None, tolerance: float, max_layers: int | None,
            plot: str | None, json_out: str | None, output: str | None, **data_flags: Any) -> None:
    """Measure INT8 and FP8 fidelity per layer and for the whole MODEL, and recommend a format for the device.

    The advice follows the measurements: among the formats the device runs fast (INT8 with int8_dot, FP8 with
    fp8 hardware) the one with the smallest whole-model error; FP8 only where it measures better than INT8.
    """
    from compress.core import InputError, UsageError, atomic_path, check_json_output, check_output_path
    from compress.quantization import advise

    if not 0 <= tolerance < 1:
        raise UsageError(f"--tolerance {tolerance}: must be in [0, 1)")
    if max_layers is not None and max_layers < 0:
        raise UsageError(f"--max-layers {max_layers}: must be >= 0")
    inputs = [model, calib, device]
    outs = [p for p in (plot, output) if p]
    for flag, p in (("--plot", plot), ("-o", output)):
        if p:
            check_output_path(p, inputs, flag=flag)
    if plot and output and Path(plot).expanduser().absolute() == Path(output).expanduser().absolute():
        raise UsageError(f"--plot {plot} is also the -o output; choose another path")
    check_json_output(json_out, output, inputs + outs)
    if not Path(model).expanduser().is_file():
        raise InputError(f"model {model} not found")
    from compress.data import data_opts, user_data
    from compress.models import onnx_model_inputs
    from devices import load_profile

    dopts = data_opts(**data_flags)
    profile = load_profile(device)
    near = Path(output or plot).expanduser().absolute().parent if (output or plot) else Path(tempfile.gettempdir())
    with user_data(onnx_model_inputs(model), dopts, near, calib, max_calib=max_calib) as data, \
            console.progress("measuring formats") as step:
        report = advise(model, profile, data.calib, tolerance=tolerance, max_layers=max_layers, calib_label=calib,
                        on_step=lambda s: step.update(description=s))

    from compress.quantization import advisor_report as fr
    if plot:
        fr.plot_formats(report, plot)
        report["plot"] = str(plot)
    if output:
        with atomic_path(output) as tmp:
            rel = os.path.relpath(Path(plot).absolute(), Path(output).absolute().parent) if plot else None  # as the .md sees it
            tmp.write_text(fr.markdown(report, plot=rel))
        report["markdown"] = str(output)
    if console.report_json(json_out, report):
        return
    out = console.out_console
    out.print(fr.rich_table(report))
    for line in fr.device_lines(report) + fr.notes(report):
        out.print(line, markup=False)
    out.print(fr.recommendation_line(report), markup=False, style="bold")
    for what, p in (("plot", plot), ("report", output), ("json", json_out)):
        if p:
            out.print(f"wrote {what} {p}", markup=False)
