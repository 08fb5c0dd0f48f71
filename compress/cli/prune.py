"""`compress prune`: structural pruning (and/or sparsity masks) with recovery, exported and measured."""

from __future__ import annotations

from typing import Any

import click

from compress.cli.options import (
    allocation_option,
    data_options,
    ignore_option,
    max_calib_option,
    model_input_options,
    prune_first_conv_option,
)
from compress.core import check_json_output, console
from compress.pruning import PruneOptions

EPILOG = """\b
Examples:
  compress prune compress.zoo:resnet_demo --input-shape 1,3,224,224 --ratio 0.5 -o pruned.onnx
  compress prune model.py:build --weights w.safetensors --calib calib.npz --ratio 0.4 --device rpi4-cortex-a72 -o p.onnx
  compress prune compress.zoo:encoder_demo --calib calib.npz --ratio 0.3 --ignore layers.0 --json - -o enc.onnx
  compress prune compress.zoo:resnet_demo --input-shape 1,3,224,224 --sparsity 0.5 --pattern 2:4 -o sparse.onnx
"""


@click.command("prune", epilog=EPILOG)
@click.argument("model")
@model_input_options
@max_calib_option
@data_options
@click.option("--ratio", type=float, help="Fraction of channels/heads/neurons to remove (0-1).")
@click.option("--importance", default=PruneOptions.default("importance"), show_default=True, help="Channel importance criterion (see --importance list).")
@allocation_option
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels across layers instead of the same ratio per layer.")
@ignore_option
@prune_first_conv_option
@click.option("--round-to", type=int, help="Round channel counts to this multiple (default: the device's channel multiple).")
@click.option("--device", default="host", show_default=True, help="Device profile (name or YAML): channel multiple, and where speed is measured.")
@click.option("--sparsity", type=float, help="Also (or instead) zero this fraction of weights as masks.")
@click.option("--pattern", type=click.Choice(["unstructured", "2:4"]), default=PruneOptions.default("pattern"), show_default=True)
@click.option("--no-recover", is_flag=True, help="Skip the distillation from the unpruned model.")
@click.option("--recover-steps", type=click.IntRange(1, 100000), default=PruneOptions.default("recover_steps"), show_default=True)
@click.option("--recover-seconds", type=click.FloatRange(min=1), default=PruneOptions.default("recover_seconds"), show_default=True, help="Time budget for recovery.")
@click.option("--finetune", metavar="FILE.py:FN", help="Your own fine-tune fn(model, batches) -> model, run instead of distillation.")
@click.option("--no-measure", is_flag=True, help="Skip the side-by-side latency measurement.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Write the report as JSON to FILE ('-' for stdout).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx path (the pruned model).")
def prune(model: str, weights: str | None, input_shapes: tuple[str, ...], calib: str | None, max_calib: int | None,
          ratio: float | None,
          importance: str, allocation: str, global_pruning: bool, ignore: tuple[str, ...], prune_first_conv: bool, round_to: int | None, device: str,
          sparsity: float | None, pattern: str, no_recover: bool, recover_steps: int, recover_seconds: float,
          finetune: str | None, no_measure: bool, json_out: str | None, output: str, **data_flags: Any) -> None:
    """Prune MODEL structurally so it is really faster, recover it, export it, and measure it.

    Channels, attention heads and neurons are removed on Torch-Pruning's dependency graph (residuals,
    concats, grouped convs and heads stay consistent; outputs and --ignore'd layers are kept), widths are
    rounded to the device's SIMD multiple, and the pruned model is distilled from the original on the
    calibration inputs. Reports params, MACs, fidelity to the original and measured latency side by side.
    """
    from compress.api import prune as prune_api

    check_json_output(json_out, output, [model, weights, calib, device, finetune])
    with console.progress("starting") as step:
        result = prune_api(model, output=output, weights=weights, input_shape=input_shapes, calib=calib,
                           max_calib=max_calib, ratio=ratio, importance=importance, allocation=allocation,
                           global_pruning=global_pruning, ignore=ignore, prune_first_conv=prune_first_conv,
                           round_to=round_to, device=device, sparsity=sparsity, pattern=pattern, no_recover=no_recover,
                           recover_steps=recover_steps, recover_seconds=recover_seconds, finetune=finetune,
                           no_measure=no_measure, on_stage=lambda s: step.update(description=s), **data_flags)
    report = result.to_json()
    if console.report_json(json_out, report):
        return
    _print_summary(report)


def _print_summary(r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("pruned", justify="right")
    t.add_column("ratio", justify="right")
    s = r.get("structural")
    if s:
        t.add_row("params", f"{s['params_before'] / 1e6:.2f} M", f"{s['params_after'] / 1e6:.2f} M", f"{s['params_before'] / s['params_after']:.2f}x")
        t.add_row("MACs", f"{s['macs_before'] / 1e9:.3f} G", f"{s['macs_after'] / 1e9:.3f} G", f"{s['macs_before'] / s['macs_after']:.2f}x")
    m = r.get("measured") or {}
    if "zipped_bytes" in m:
        z = m["zipped_bytes"]
        t.add_row("zipped ONNX", f"{z['original'] / 1e6:.2f} MB", f"{z['pruned'] / 1e6:.2f} MB", f"{z['original'] / z['pruned']:.2f}x")
    if "latency" in m:
        lat = m["latency"]
        t.add_row(f"latency p50 ({lat['threads']} thr, interleaved)", f"{lat['wall_ms']['original']:.2f} ms",
                  f"{lat['wall_ms']['pruned']:.2f} ms", f"{lat['speedup_wall']['pruned']:.2f}x")
    console.out_console.print(t)
    fb, fa = r["fidelity_before_recovery"], r["fidelity"]
    rec = r.get("recovery") or {}
    line = f"fidelity to the original ({r['calibration']['source']}): cosine mean {fb['cosine_mean']:.4f} -> {fa['cosine_mean']:.4f}"
    if fa.get("top1_agreement") is not None:
        line += f", top-1 agreement {fb['top1_agreement']:.1%} -> {fa['top1_agreement']:.1%}"
    if rec:
        line += f" (after {rec.get('method')}{', %d steps' % rec['steps'] if 'steps' in rec else ''})"
    console.out_console.print(line)
    if "note" in m:
        console.out_console.print(m["note"])
    console.out_console.print(f"wrote {r['onnx']['path']} ({r['onnx']['size_bytes'] / 1e6:.1f} MB, parity max rel err {r['onnx']['parity']['max_rel_err']:.1e})")
