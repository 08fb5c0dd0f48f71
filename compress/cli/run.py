"""`compress run`: the whole pipeline in one command, one recommended artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from compress.cli.options import (
    RatioOrAuto,
    allocation_option,
    backend_option,
    budget_options,
    command_line,
    data_options,
    eval_options,
    format_choice,
    ignore_option,
    int4_options,
    max_calib_option,
    model_input_options,
    prune_first_conv_option,
)
from compress.cli.recipe import config_option, resolved
from compress.core import console
from compress.pipeline import RunOptions
from compress.pruning import PruneOptions
from compress.report import fidelity_metric, fmt_fidelity, per_token_rows

EPILOG = """\b
Examples:
  compress run compress.zoo:resnet_demo --input-shape 1,3,224,224 --device host --prune 0.5 --quant none -o out/
  compress run model.onnx --calib photos/ --eval labelled/ --image-size 224 -o out/
  compress run bert.onnx --calib sentences.txt --tokenizer ./bert-folder --seq-len 128 -o out/
  compress run model.py:build --weights w.safetensors --calib calib.npz --device rpi4-cortex-a72 --prune 0.3 -o out/
  compress run compress.zoo:shapes_resnet --calib calib.npz --prune auto --tolerance 0.02 -o out/
  compress run compress.zoo:encoder_demo --calib calib.npz --json - -o out/
  compress run compress.zoo:shapes_resnet --calib calib.npz --backend inc -o out-inc/
  compress run model.py:build --calib calib.npz --eval labelled.npz --tolerance 0.005 -o out/
  compress run compress.zoo:resnet_demo --input-shape 1,3,224,224 --quant fp8 --simulate -o out-fp8/
  compress run compress.zoo:encoder_demo --calib calib.npz --quant int4 --avg-bits 4.5 -o out-int4/
  compress run ./gpt2-folder --input-shape input_ids=1,32 --generate --quant int4 -o out-gen/   (per token)
  compress run --config recipes/rpi4.yaml --runs 50              (a recipe file; flags override its keys)
  compress run model.py:build --calib calib.npz --device rpi4-cortex-a72 --min-speedup 1.5 --max-p50-ms 12 -o out/
                                                  (CI: exit 3 when the recommended variant misses a budget)
"""


@click.command("run", epilog=EPILOG)
@click.argument("model")
@model_input_options
@max_calib_option
@data_options
@click.option("--device", default="host", show_default=True, help="Device profile (name or YAML) to build for and profile on.")
@click.option("--prune", "prune_ratio", type=RatioOrAuto(), help="Prune this fraction of channels (adds the 'pruned' "
              "variant); 'auto': the largest fraction up to 0.75 whose pruned and recovered model stays within --tolerance "
              "of the unpruned one, found by bisection in 4 probes that share --recover-seconds.")
@click.option("--importance", default=PruneOptions.default("importance"), show_default=True, help="Channel importance criterion for --prune.")
@allocation_option
@ignore_option
@prune_first_conv_option
@click.option("--no-recover", is_flag=True, help="Skip distillation after pruning.")
@click.option("--recover-seconds", type=click.FloatRange(min=1), default=PruneOptions.default("recover_seconds"),
              show_default=True, help="Time budget for the distillation after pruning.")
@click.option("--no-backoff", is_flag=True, help="With --prune and --quant: do not also quantize the unpruned model "
              "(the '<quant>-unpruned' variant, kept when pruning costs too much accuracy).")
@click.option("--quant", type=format_choice(none="last"), default=RunOptions.default("quant"), show_default=True,
              help="Quantize the final model (kept only if it pays: see the recommendation). int4 is weight-only "
                   "(MatMul/Gemm weights), steered by --budget-mb/--avg-bits.")
@int4_options
@click.option("--simulate", is_flag=True, help="--quant fp8 on a device without FP8 hardware: fidelity only.")
@click.option("--no-op-select", is_flag=True, help="Skip timing each op against fp32 (INT8: keep every quantizable op INT8) and what each "
              "layer the fallback may keep in float costs (it then keeps the most sensitive).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=RunOptions.default("tolerance"), show_default=True,
              help="Allowed loss vs fp32: 1 - top-1 agreement (classifiers) or 1 - min cosine; with --eval, the drop of its score.")
@eval_options
@backend_option
@click.option("--runs", type=click.IntRange(min=1), help="Timed runs per variant (default: adaptive).")
@click.option("--tune-threads/--no-tune-threads", default=RunOptions.default("tune_threads"), show_default=True,
              help="Time each variant (fp32 too) at 1, 2, 4, ... up to the device's threads and keep its fastest; the "
                   "recommendation names that count. --no-tune-threads: the device profile's threads only.")
@click.option("--generate", is_flag=True, help="The model generates text (a decoder): every variant is exported with "
              "its KV cache, timed per token (prefill and decode) and compared and recommended on the decode step. "
              "An ONNX decoder that takes its cache (compress export --with-past) is always run so.")
@click.option("--overwrite", is_flag=True, help="An -o folder holding files no run wrote is moved aside whole "
              "(to DIR.old-N) instead of refused; nothing in it is deleted.")
@click.option("--force", is_flag=True, help="Redo every stage instead of reusing finished ones from the stage cache "
              "($EDGE_COMPRESS_CACHE, default ~/.cache/edge-compress); profiling always runs.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Also write report JSON to FILE ('-' for stdout).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder (replaced only when the run succeeds).")
@budget_options(run=True)
@config_option
def run(model: str, weights: str | None, input_shapes: tuple[str, ...], calib: str | None, max_calib: int | None, device: str,
        prune_ratio: float | str | None, importance: str, allocation: str, ignore: tuple[str, ...], prune_first_conv: bool, no_recover: bool, recover_seconds: float,
        no_backoff: bool,
        quant: str, simulate: bool, no_op_select: bool,
        block_size: int, budget_mb: float | None, avg_bits: float | None, salience: str,
        tolerance: float, eval_spec: str | None, metric_spec: str | None, backend: str, runs: int | None,
        tune_threads: bool, generate: bool, overwrite: bool, force: bool,
        json_out: str | None, output: str, max_p50_ms: float | None, max_p99_ms: float | None,
        max_peak_rss_mb: float | None, min_speedup: float | None, max_accuracy_drop: float | None,
        **data_flags: Any) -> None:
    """Build every variant of MODEL for a device, profile each there, and recommend one.

    MODEL is a PyTorch model (FILE.py:factory, package.module:factory, a Hugging Face folder) or an ONNX file,
    which is taken as the fp32 variant as it is (no export; no pruning).

    Variants: fp32 always; 'pruned' with --prune; 'int8', 'fp8' or 'int4' with --quant (the final model: pruned
    too when --prune is given, and then 'int8-unpruned' etc. as well, the back-off should the cut cost too
    much). Each is exported (verified against torch), profiled with the device profile, timed against fp32
    interleaved (each at the intra-op thread count it runs fastest with: see --tune-threads), and compared with
    fp32 on held-out inputs. The recommendation is the fastest variant within --tolerance, with its thread
    count, and fp32 when nothing else pays. Simulated FP8 is reported for its
    fidelity only. Writes OUTDIR/report.json, report.md, tradeoff.png and one .onnx per variant. A rerun with
    the same inputs and options reuses finished prune/export/quantize stages (--force redoes them); latency is
    measured again every time.

    Budgets (--max-p50-ms, --max-p99-ms, --max-peak-rss-mb, --min-speedup, --max-accuracy-drop) judge the
    recommended variant once the report is written: a miss exits with code 3 and one line naming each budget
    missed and by how much (a run that recommends fp32 is judged as fp32).

    --config RECIPE.yaml takes every option from a file (keys: the flag names without dashes; MODEL as model:,
    -o as output:; paths relative to the file); flags override it. report.json records the options the run
    resolved under "recipe": written back as YAML, that repeats the run.
    """
    from compress.api import run as run_api
    from compress.core import check_json_output
    from compress.report import Budgets, enforce, run_misses

    recipe = resolved(click.get_current_context())
    budgets = Budgets(max_p50_ms=max_p50_ms, max_p99_ms=max_p99_ms, max_peak_rss_mb=max_peak_rss_mb,
                      min_speedup=min_speedup, max_accuracy_drop=max_accuracy_drop)
    check_json_output(json_out, output, [model, weights, calib, device, eval_spec, metric_spec])
    with console.progress("starting") as step:
        report = run_api(model, output=output, weights=weights, input_shape=input_shapes, calib=calib,
                         max_calib=max_calib, device=device, prune=prune_ratio, importance=importance,
                         allocation=allocation, ignore=ignore, prune_first_conv=prune_first_conv, no_recover=no_recover,
                         recover_seconds=recover_seconds, no_backoff=no_backoff, quant=quant, block_size=block_size,
                         budget_mb=budget_mb, avg_bits=avg_bits, salience=salience, simulate=simulate,
                         no_op_select=no_op_select, tolerance=tolerance, eval=eval_spec, metric=metric_spec,
                         backend=backend, runs=runs, tune_threads=tune_threads, overwrite=overwrite, force=force,
                         generate=generate, on_stage=lambda s: step.update(description=s),
                         command=command_line(), recipe=recipe,
                         **data_flags).to_json()
    outdir = Path(output)
    if not console.report_json(json_out, report):
        _print_table(report, outdir)
    enforce(run_misses(report, budgets), f"the recommended variant {report['recommended']!r}")


def _print_table(r: dict[str, Any], outdir: Path) -> None:
    from rich.table import Table

    from compress.report import fmt_stage_seconds

    t = Table(title=f"{r['device']['name']}: variants", header_style="bold")
    scored = any(v.get("accuracy") is not None for v in r["variants"])
    tuned = (r.get("threads_tuning") or {}).get("chosen") or {}
    cols = ["variant", "p50 ms", "p90 ms", "speedup"] + (["threads"] if tuned else []) + ["size MB", "params M", "GMACs",
                                                                                       "fidelity"]
    for col in cols + (["accuracy"] if scored else []) + ["ok"]:
        t.add_column(col, justify="left" if col == "variant" else "right")
    metric = fidelity_metric(r)  # one column compares like with like, as report.md's does
    for v in r["variants"]:
        fid = fmt_fidelity(v["fidelity"], metric)
        mark = "*" if v["name"] == r["recommended"] else ""
        lat = v["latency_ms"]
        t.add_row(v["name"] + mark, f"{lat['p50']:.2f}" if lat else "simulated", f"{lat['p90']:.2f}" if lat else "-",
                  f"{v['speedup_vs_fp32']:.2f}x" if v["speedup_vs_fp32"] else "-",
                  *([str(tuned.get(v["name"], "-"))] if tuned else []),
                  f"{v['size_bytes'] / 1e6:.1f}", f"{v['params'] / 1e6:.2f}", f"{v['macs'] / 1e9:.3f}", fid,
                  *([f"{v['accuracy']:.4g}" if v.get("accuracy") is not None else "-"] if scored else []),
                  "yes" if v["name"] == "fp32" or v["within_tolerance"] else "no")
    console.out_console.print(t)
    tok_header, tok_rows = per_token_rows(r)
    if tok_rows:  # --generate: the table above is the decode step's
        per = Table(title="per token", header_style="bold")
        for i, col in enumerate(tok_header):
            per.add_column(col, justify="left" if i == 0 else "right")
        for row in tok_rows:
            per.add_row(*row)
        console.out_console.print(per)
    console.out_console.print(f"recommended: {r['recommended']} — {r['reason']}")
    spent = fmt_stage_seconds(r.get("stage_seconds"))
    if spent:
        console.out_console.print(f"stages: {spent}")
    console.out_console.print(f"report: {outdir / 'report.md'} ({outdir / 'report.json'} for machines)")
