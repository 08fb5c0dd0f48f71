"""`compress formats`: which 8-bit format (INT8 per-tensor/per-channel, FP8 E4M3/E5M2) for this model on this
device, from measurements on the user's data (see compress.quantization.advisor)."""

from __future__ import annotations

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
    from compress.api import formats as formats_api
    from compress.core import check_json_output
    from compress.quantization import advisor_report as fr

    check_json_output(json_out, output, [model, calib, device] + [p for p in (plot, output) if p])
    with console.progress("starting") as step:
        report = formats_api(model, device, calib=calib, max_calib=max_calib, tolerance=tolerance, max_layers=max_layers,
                             plot=plot, output=output, on_stage=lambda s: step.update(description=s),
                             **data_flags).to_json()
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
