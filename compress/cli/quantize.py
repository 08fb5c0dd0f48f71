"""`compress quantize`: INT8 or FP8 for a device, with fidelity, fallback and the measured speedup."""

from __future__ import annotations

from typing import Any

import click

from compress.cli.options import (
    CALIB_HELP,
    backend_option,
    data_options,
    eval_options,
    format_choice,
    int4_options,
    max_calib_option,
)
from compress.core import console
from compress.quantization import CALIBRATION_METHODS, QuantOptions
from compress.report import box_f1

EPILOG = """\b
Examples:
  compress quantize model.onnx --to int8 --device host --calib calib.npz -o model.int8.onnx
  compress quantize model.onnx --to int8 --device rpi4-cortex-a72 --calib calib.npz --tolerance 0.01 -o m.int8.onnx
  compress quantize model.onnx --calib calib.npz --eval labelled.npz --tolerance 0.005 -o m.int8.onnx
  compress quantize model.onnx --calib calib.npz --eval my_eval.py:mean_ap --tolerance 0.01 -o m.int8.onnx
  compress quantize model.onnx --to fp8 --device nvidia-h100-trt-fp8 --calib calib.npz -o model.fp8.onnx
  compress quantize model.onnx --to fp8 --device host --simulate --calib calib.npz --json - -o model.fp8.onnx
  compress quantize model.onnx --to int4 --device host -o model.int4.onnx
  compress quantize model.onnx --to int4 --avg-bits 6 --calib calib.npz -o model.mixed.onnx
  compress quantize model.onnx --to int4 --block-size 128 --budget-mb 12 --calib calib.npz -o model.mixed.onnx
"""


@click.command("quantize", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=format_choice(), default=QuantOptions.default("to"), show_default=True)
@click.option("--device", default="host", show_default=True, help="Device profile (name or YAML): presets, and where speed is measured.")
@click.option("--calib", metavar="DATA", help=CALIB_HELP + " Without it, synthetic data (warned).")
@click.option("--method", type=click.Choice(list(CALIBRATION_METHODS)), default=QuantOptions.default("method"), show_default=True,
              help="INT8 activation calibration. With --backend ort, entropy is onnxruntime's as quantize_static runs it "
                   "(128 bins for 128 levels): it keeps the whole range, the scales of minmax.")
@click.option("--tolerance", type=float, help="Keep the most sensitive layers in float until 1 - top-1 agreement (classifiers), the relative "
              "perplexity increase on --calib text or 1 - next-token agreement (decoders with their KV cache), or 1 - "
              "min cosine (or the drop of the --eval score) is within this.")
@eval_options
@backend_option
@click.option("--simulate", is_flag=True, help="FP8 on a device without FP8 hardware: measure fidelity only (marked simulated).")
@click.option("--fp8-format", type=click.Choice(["e4m3fn", "e5m2"]), default=QuantOptions.default("fp8_format"), show_default=True)
@int4_options
@max_calib_option
@data_options
@click.option("--no-measure", is_flag=True, help="Skip the fp32-vs-quantized timing.")
@click.option("--no-op-select", is_flag=True, help="Skip timing each op against fp32 (INT8: ops it does not speed up stay INT8) and "
              "what each layer the fallback may keep in float costs (it then keeps the most sensitive).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Write the report as JSON to FILE ('-' for stdout).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
def quantize(model: str, to: str, device: str, calib: str | None, method: str, tolerance: float | None,
             eval_spec: str | None, metric_spec: str | None, backend: str, simulate: bool,
             fp8_format: str, block_size: int, budget_mb: float | None, avg_bits: float | None, salience: str, max_calib: int | None, no_measure: bool, no_op_select: bool, json_out: str | None, output: str,
             **data_flags: Any) -> None:
    """Quantize an ONNX MODEL the way the device runs it fastest, and say what it cost.

    INT8 follows the device profile's preset (QDQ/QOperator, U8S8/S8S8, per-channel, reduce_range); where the
    guidance is ambiguous (ARM) both are built and the faster kept. Each INT8 op is then timed alone against
    its fp32 self, and ops INT8 does not speed up are kept in fp32 when that makes the whole model faster. FP8 (E4M3FN/E5M2) uses scales from amax
    and needs an FP8 profile, or --simulate. Fidelity to fp32 is measured on held-out inputs, and with
    --tolerance the most sensitive layers stay in float. INT4 is weight-only (MatMulNBits): uniform 4-bit, or
    with --budget-mb/--avg-bits the layers whose 4-bit rounding costs the most output fidelity go 8-bit or float.
    """
    from compress.api import quantize as quantize_api
    from compress.core import check_json_output

    check_json_output(json_out, output, [model, calib, device, eval_spec, metric_spec])
    with console.progress("starting") as step:
        result = quantize_api(model, output=output, to=to, device=device, calib=calib, method=method, tolerance=tolerance,
                              eval=eval_spec, metric=metric_spec, backend=backend, simulate=simulate,
                              fp8_format=fp8_format, block_size=block_size, budget_mb=budget_mb, avg_bits=avg_bits,
                              salience=salience, max_calib=max_calib, no_measure=no_measure, no_op_select=no_op_select,
                              on_stage=lambda s: step.update(description=s), **data_flags)
    report = result.to_json()
    if console.report_json(json_out, report):
        return
    for warning in (((report.get("quantizer") or {}).get("presets") or {}).get("warning"),
                    (report.get("op_selection") or {}).get("warning")):
        if warning:
            console.warn(warning)
    f = report["fidelity"]
    fid = f"cosine min {f['cosine_min']:.4f} / mean {f['cosine_mean']:.4f}" if f.get("cosine_min") is not None else "cosine n/a"
    if f.get("top1_agreement") is not None:
        fid += f", top-1 agreement {f['top1_agreement']:.1%}"
    if box_f1(f) is not None:
        fid += f", boxes F1 {box_f1(f):.1%} ({f['boxes']['reference_boxes']} reference boxes)"
    console.out_console.print(f"wrote {report['onnx']} ({to}{', simulated' if report['simulated'] else ''}; preset "
                              f"{(report.get('preset') or {}).get('name', '-')})")
    console.out_console.print(f"fidelity to fp32 on held-out inputs: {fid}")
    if report.get("avg_bits") is not None:  # weight-only with bits per layer (INT4)
        c = report["quantizer"]["counts"]
        console.out_console.print(f"size {report['size_mb']:.2f} MB (fp32 {report['fp32_size_mb']:.2f} MB), "
                                  f"{report['avg_bits']:.2f} bits per weight ({report['stored_bits']:.2f} stored with scales): "
                                  f"{c['int4']} layers 4-bit, "
                                  f"{c['int8']} 8-bit, {c['float']} float")
    if report.get("eval"):
        e = report["eval"]
        console.out_console.print(f"--eval {e['function']}: fp32 {e['fp32']:.4g}, {to} {e[to]:.4g} (drop {e['fp32'] - e[to]:.4g})")
    if report.get("op_selection"):
        console.out_console.print(f"op selection: {report['op_selection']['decision']}")
    tried = report["calibration"].get("tried") or []
    if len(tried) > 1:
        console.out_console.print("calibration: " + ", ".join(f"{t['method']} error {t['error']:.4g}" for t in tried)
                                  + f" (tolerance {report['fallback']['tolerance']:g}): kept {report['calibration']['method']}")
    if report["excluded_layers"]:
        if report.get("avg_bits") is not None:
            names = ", ".join(f"{e['node']} ({'float' if e['bits'] == 32 else '8-bit'}"
                              f"{', salience %.3g' % e['salience'] if e.get('salience') is not None else ''}"
                              f"{', shared weight' if 'also read by' in e['why'] else ''})"
                              for e in report["excluded_layers"])
            console.out_console.print(f"above 4 bits: {names}")
        else:
            names = ", ".join(f"{e['node']} ({'sensitive' if e.get('salience') is not None else 'not faster in INT8'})"
                              for e in report["excluded_layers"])
            console.out_console.print(f"kept in float: {names}")
    if "speedup_vs_fp32" in report:
        lat = report["latency"]
        console.out_console.print(f"latency ({lat['threads']} threads, interleaved medians): fp32 {lat['wall_ms']['fp32']:.2f} ms, "
                                  f"{to} {lat['wall_ms'][to]:.2f} ms: {report['speedup_vs_fp32']:.2f}x")
        if report["speedup_vs_fp32"] < 1.0:
            console.warn(f"{to} is slower than fp32 on {report['device']}: keep fp32 there")
    elif report["simulated"]:
        console.out_console.print("simulated FP8: no FP8 hardware on this device, so no latency is reported")
