"""`compress search` and `compress sweep`: many `compress run`s on Ray Tune, locally or on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from compress.cli.options import (
    command_line,
    data_options,
    eval_options,
    format_choice,
    max_calib_option,
    model_input_options,
)
from compress.core import EdgeError, console
from compress.tuning import SearchSettings

SEARCH_EPILOG = """\b
Examples:
  compress search compress.zoo:shapes_resnet --calib calib.npz --device host --latency-budget 2.5 \\
      --min-fidelity 0.97 --trials 16 -o search-out/
  compress search model.py:build --weights w.safetensors --calib calib.npz --device rpi4-cortex-a72 \\
      --latency-budget 40 --address ray://head:10001 -o search-out/
  compress search compress.zoo:shapes_resnet --calib calib.npz --latency-budget 2.5 -o search-out/ --resume
"""


@click.command("search", epilog=SEARCH_EPILOG)
@click.argument("model")
@model_input_options
@max_calib_option
@data_options
@click.option("--device", default=SearchSettings.default("device"), show_default=True, help="Device profile (name or YAML) to build for and time on.")
@click.option("--latency-budget", "latency_budget", type=float, help="Largest acceptable p50 latency on the device, in ms.")
@click.option("--min-fidelity", type=float,
              help="Floor on fidelity to fp32: top-1 agreement (classifiers) or worst per-sample cosine [default: 0.99].")
@eval_options
@click.option("--max-accuracy-drop", type=float, help="With --eval: how far below fp32's score a model may be [default: 0.01].")
@click.option("--objective", type=click.Choice(["fidelity", "speed"]),
              help="What the pick maximises: fidelity within --latency-budget, or speed above the floor "
                   "[default: fidelity with a budget, speed without].")
@click.option("--trials", type=int, default=SearchSettings.default("trials"), show_default=True, help="Configurations to try (the first is compress run's default).")
@click.option("--seed", type=int, default=SearchSettings.default("seed"), show_default=True, help="Seeds the search algorithm and each trial.")
@click.option("--prune-max", type=float, default=SearchSettings.default("prune_max"), show_default=True, help="Largest prune ratio searched.")
@click.option("--quant", "quants", multiple=True, type=format_choice(none="first"),
              help="Quantization choices searched (repeat) [default: none, int8, and fp8 on FP8 hardware].")
@click.option("--runs", type=click.IntRange(min=1), help="Timed runs per variant (default: adaptive).")
@click.option("--address", help="Ray cluster (ray://HOST:10001 or HOST:6379). Default: an embedded Ray for this command.")
@click.option("--concurrency", type=click.IntRange(min=1), default=SearchSettings.default("concurrency"), show_default=True,
              help="Trials at once. Profiling is one at a time per device anyway; on the host, 1 keeps compression "
                   "work off the cores being timed.")
@click.option("--resume", is_flag=True, help="Continue the search saved in -o (Ray Tune's experiment state).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Also write search.json to FILE ('-' for stdout).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder: trials, search.md/.json/.png, best/.")
def search(model: str, weights: str | None, input_shapes: tuple[str, ...], calib: str | None, max_calib: int | None,
           device: str, latency_budget: float | None, min_fidelity: float | None, eval_spec: str | None,
           metric_spec: str | None, max_accuracy_drop: float | None, objective: str | None, trials: int, seed: int, prune_max: float,
           quants: tuple[str, ...], runs: int | None, address: str | None, concurrency: int, resume: bool,
           json_out: str | None, output: str, **data_flags: Any) -> None:
    """Search prune ratio, importance criterion and quantization (format, calibration, float fallback) with Ray
    Tune for the most faithful model of MODEL within --latency-budget on the device. MODEL may be ONNX (then
    nothing is pruned); --calib/--eval data that is not an .npz is read once into OUTDIR/data.

    Each trial is one `compress run` (same stages, same report); profiling goes one model at a time per device.
    Writes OUTDIR/search.md (Pareto set, every trial, crashed ones with their error), search.json, search.png
    and best/ (the recommended trial's run report and models). Exits 1 when no model meets the budget and floor.
    """
    from compress.api import search as search_api
    from compress.core import check_json_output

    check_json_output(json_out, output, [model, weights, calib, device, eval_spec, metric_spec])
    with console.progress("searching", total=trials) as step:
        result = search_api(model, output=output, weights=weights, input_shape=input_shapes, calib=calib,
                            max_calib=max_calib, device=device, latency_budget=latency_budget, min_fidelity=min_fidelity,
                            eval=eval_spec, metric=metric_spec, max_accuracy_drop=max_accuracy_drop, objective=objective,
                            trials=trials, seed=seed, prune_max=prune_max, quant=quants, runs=runs, address=address,
                            concurrency=concurrency, resume=resume, command=command_line(),
                            on_stage=lambda s: step.update(description=s),
                            on_trial=lambda n: step.update(completed=n), **data_flags)
    summary = result.to_json()
    if not console.report_json(json_out, summary):
        _print_summary(summary, Path(output))
    if result.recommended is None:
        raise _NoModel(result.reason)


class _NoModel(EdgeError):
    """No model met the budget: exit 1, after the summary was written and printed."""


def _print_summary(s: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"{s['device']}: Pareto set of {len(s['candidates'])} measured variants", header_style="bold")
    for col in ("variant", "settings", "p50 ms", "speedup", "fidelity"):
        t.add_column(col, justify="left" if col in ("variant", "settings") else "right")
    for c in sorted((c for c in s["candidates"] if c["pareto"]), key=lambda c: c["p50_ms"]):
        f = c.get("accuracy")
        if f is None:
            from compress.tuning import fidelity_value

            f = fidelity_value(c.get("fidelity") or {})
        mark = "*" if c["name"] == s["recommended"] else ""
        t.add_row(c["name"] + mark, c["settings"] if c["name"] != "fp32" else "-", f"{c['p50_ms']:.3f}",
                  f"{c['speedup_vs_fp32']:.2f}x" if c.get("speedup_vs_fp32") else "-", "-" if f is None else f"{f:.4f}")
    console.out_console.print(t)
    bad = [tr for tr in s["trials"] if tr["status"] != "done"]
    for tr in bad:
        console.out_console.print(f"trial {tr['id']} ({tr['label']}): {tr['status']}"
                                  + (f": {tr.get('error') or tr.get('why')}" if tr.get("error") or tr.get("why") else ""))
    console.out_console.print(("recommended: " + s["recommended"] + " — " if s["recommended"] else "no recommendation — ")
                              + s["reason"])
    console.out_console.print(f"report: {out / 'search.md'} ({out / 'search.json'} for machines"
                              + (f"; the pick's run report: {out / 'best' / 'report.md'})" if s["recommended"] else ")"))


SWEEP_EPILOG = """\b
Examples:
  compress sweep sweep.yaml -o sweep-out/
  compress sweep sweep.yaml --address ray://head:10001 --concurrency 4 -o sweep-out/
  compress sweep sweep.yaml -o sweep-out/ --resume
\b
sweep.yaml:
  models:
    - model: compress.zoo:resnet_tiny
      input_shape: ["1,3,32,32"]
  devices: [host]
  grid: {prune: [0.0, 0.5], quant: [none, int8]}
"""


@click.command("sweep", epilog=SWEEP_EPILOG)
@click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(dir_okay=False))
@click.option("--address", help="Ray cluster (ray://HOST:10001 or HOST:6379). Default: an embedded Ray for this command.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells at once (profiling is one at a time per device anyway).")
@click.option("--resume", is_flag=True, help="Continue the sweep saved in -o.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Also write sweep.json to FILE ('-' for stdout).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder: cells/, sweep.md/.json/.png.")
def sweep(sweep_file: str, address: str | None, concurrency: int, resume: bool, json_out: str | None, output: str) -> None:
    """Run a grid of models x devices x options from SWEEP.yaml (see compress.tuning.sweep for every key), each cell one
    `compress run` as a Ray Tune trial, and gather them into OUTDIR/sweep.md, sweep.json and sweep.png.

    A cell that crashes is reported in the table with its error; the others go on. Exits 1 if every cell failed.
    """
    from compress.api import sweep as sweep_api
    from compress.api import sweep_cells
    from compress.core import check_json_output

    check_json_output(json_out, output, [sweep_file])
    out = Path(output)
    with console.progress("sweeping", total=sweep_cells(sweep_file)) as step:
        summary = sweep_api(sweep_file, output=output, address=address, concurrency=concurrency, resume=resume,
                            command=command_line(), on_stage=lambda s: step.update(description=s),
                            on_trial=lambda k: step.update(completed=k)).to_json()
    if not console.report_json(json_out, summary):
        done = sum(1 for c in summary["cells"] if c["status"] == "done")
        for c in summary["cells"]:
            if c["status"] != "done":
                console.out_console.print(f"cell {c['id']} ({c['model']}, {c['device']}, {c['settings']}): "
                                          f"{c['status']}: {c.get('error') or ''}")
        console.out_console.print(f"{done} of {len(summary['cells'])} cells finished; report: {out / 'sweep.md'} "
                                  f"({out / 'sweep.json'} for machines)")
    if not any(c["status"] == "done" for c in summary["cells"]):
        raise _NoModel("every cell of the sweep failed: see sweep.md")
