"""Options shared by several commands (export, prune, quantize, run), declared once."""

from __future__ import annotations

import shlex
import sys
from typing import Any, Callable

import click

from compress.data import DataOptions
from compress.pruning import ALLOCATIONS, PruneOptions
from compress.quantization import QuantOptions, backend_names, format_names

CALIB_HELP = ("Real samples: DATA.npz (keys = input names, first axis = samples), an image folder, a .txt/.jsonl/.csv "
              "of text, or hf:DATASET[:split][:column] (see --image-size, --seq-len).")


def model_input_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--weights, --input-shape (repeatable) and --calib, with one wording everywhere."""
    for opt in reversed([
        click.option("--weights", type=click.Path(dir_okay=False),
                     help="State dict: .safetensors, or .pt/.pth (loaded with weights_only=True)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="[NAME=]SHAPE[:DTYPE]",
                     help="Example input shape, e.g. 1,3,224,224 or input_ids=1,128:int64; repeat per input."),
        click.option("--calib", metavar="DATA", help=CALIB_HELP),
    ]):
        f = opt(f)
    return f


def data_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How --calib/--eval DATA that is not arrays becomes inputs (compress.data.DataOptions): image
    pre-processing and text tokenization; each defaults to the model's own config, then to timm's ImageNet
    evaluation (images) or a sequence length of 128 (text), and the report says which applied."""
    for opt in reversed([
        click.option("--image-size", metavar="H[,W]", help="Images: size after the center crop (default: the model's)."),
        click.option("--crop-pct", type=float, help="Images: resize to size / crop_pct, then center-crop (default 0.875)."),
        click.option("--mean", metavar="R,G,B", help="Images: per-channel mean of [0,1] pixels (default: ImageNet's)."),
        click.option("--std", metavar="R,G,B", help="Images: per-channel std (default: ImageNet's)."),
        click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), help="Images: resize filter."),
        click.option("--seq-len", type=click.IntRange(min=1), help="Text: tokens per sample (default: the model's, else 128)."),
        click.option("--tokenizer", metavar="FOLDER", help="Text: a Hugging Face tokenizer folder (default: the model's folder)."),
        click.option("--column", metavar="NAME", help="Text/datasets: the column holding the samples."),
        click.option("--label-column", default=DataOptions.default("label_column"), show_default=True,
                     help="--eval text/datasets: the column holding class indices."),
        click.option("--skip-bad", is_flag=True, help="Skip (and count) unreadable files in a data folder instead of stopping."),
    ]):
        f = opt(f)
    return f


def max_calib_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--max-calib, for every command that takes --calib (quantize, prune, run): the file is read lazily, and
    this caps how many of its samples are read at all (calibration sets reach 100+ GB)."""
    return click.option("--max-calib", type=click.IntRange(min=1), help="Use at most this many calibration samples.")(f)


def ignore_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--ignore for prune and run: layers kept at full width. The first 32-channel stage of the shapes demo is
    where a uniform 25% cut loses its accuracy (AVX2 host, multiple 8: held-out 0.963 cut, 0.9785 kept)."""
    return click.option("--ignore", multiple=True, metavar="NAME",
                        help="Module (qualified name or prefix) never to prune; repeatable.")(f)


def prune_first_conv_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--prune-first-conv for prune and run: the first convolution is kept whole unless asked (see
    compress.pruning.structural.prune_model for the measured reason)."""
    return click.option("--prune-first-conv", is_flag=True, default=PruneOptions.default("prune_first_conv"),
                        help="Also cut the first convolution's channels (kept by default, as NNCF does).")(f)


def allocation_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--allocation for prune and run (compress.pruning.allocate): one ratio everywhere, or per block from measured
    sensitivity and latency."""
    return click.option("--allocation", type=click.Choice(ALLOCATIONS), default=PruneOptions.default("allocation"),
                        show_default=True, help="uniform: the ratio in every block; measured: per-block ratios that save "
                        "the time the uniform cut saves (timed here) where a cut costs the least (each block probed alone).")(f)


def eval_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--eval and --metric: the user's score, for quantize and run (see compress.evaluate.user_metric)."""
    for opt in reversed([
        click.option("--eval", "eval_spec", metavar="DATA|FILE.py:FN",
                     help="Score each model: labelled DATA (an .npz with 'y', DIR/CLASS/ images, text or hf: with a "
                          "label column; top-1 accuracy, or --metric), or your FN(model_path) -> score. --tolerance "
                          "then bounds the drop of that score from fp32."),
        click.option("--metric", "metric_spec", metavar="FILE.py:FN",
                     help="With --eval DATA.npz: FN(outputs, y) -> score (higher is better) instead of top-1."),
    ]):
        f = opt(f)
    return f


def backend_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--backend for INT8, for quantize and run; the default follows bench/quant_inc.py (see
    compress/quantization/backends/int8_ort.py). The choices are the registry's."""
    return click.option("--backend", type=click.Choice(backend_names()), default=QuantOptions.default("backend"), show_default=True,
                        help="INT8 backend: onnxruntime's quantizer on the ONNX graph (faster on both benchmark models), "
                             "or Intel Neural Compressor's PT2E static INT8 in torch (needs the PyTorch model: run).")(f)


def int4_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--block-size, --budget-mb, --avg-bits and --salience: weight-only INT4, for quantize (--to int4) and run
    (--quant int4); compress.quantization.int4.check_options checks them."""
    for opt in reversed([
        click.option("--block-size", type=int, default=QuantOptions.default("block_size"), show_default=True, help="INT4: weights per scale (32, 64 or 128)."),
        click.option("--budget-mb", type=float,
                     help="INT4: total model size in MB (10^6 bytes); the most salient layers go 8-bit or float within it."),
        click.option("--avg-bits", type=float,
                     help="INT4: the budget as average bits per quantized weight (4-32), each layer 4, 8 or 32 (float); "
                          "scales and zero points not counted (--budget-mb counts every byte)."),
        click.option("--salience", type=click.Choice(["measured", "proxy"]), default=QuantOptions.default("salience"), show_default=True,
                     help="INT4 budget: rank layers by measured output error (one model per layer) or predict it from "
                          "weights and activations (one pass, much faster)."),
    ]):
        f = opt(f)
    return f


def format_choice(none: str = "") -> click.Choice:
    """The quantization formats the registry has (--to, --quant), with "none" ("first" or "last") for commands
    that may skip quantization."""
    names = list(format_names())
    return click.Choice(["none", *names] if none == "first" else [*names, "none"] if none == "last" else names)


class RatioOrAuto(click.ParamType):
    """--prune R (a fraction) or --prune auto (compress.pruning.stage.prune_auto finds it)."""

    name = "R|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a fraction (0.3) nor 'auto'", param, ctx)


def budget_options(run: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Budget gates (compress.report.budgets), judged once the figures are written: a miss exits 3 and says
    which budget, by how much. `run`: judged on the recommended variant, with the run-only budgets too."""
    whose = "the recommended variant's " if run else ""
    positive = click.FloatRange(min=0, min_open=True)
    opts = [
        click.option("--max-p50-ms", type=positive, help=f"Budget: exit 3 when {whose}p50 latency is above this (ms)."),
        click.option("--max-p99-ms", type=positive, help=f"Budget: exit 3 when {whose}p99 latency is above this (ms)."),
        click.option("--max-peak-rss-mb", type=positive, help=f"Budget: exit 3 when {whose}peak RSS is above this (MB)."),
    ]
    if run:
        opts += [
            click.option("--min-speedup", type=positive,
                         help="Budget: exit 3 when the recommended variant is less than this many times faster than fp32."),
            click.option("--max-accuracy-drop", type=click.FloatRange(min=0),
                         help="Budget: exit 3 when the recommended variant drops more than this from fp32, in the "
                              "units of --tolerance (the --eval score's drop, else the fidelity loss)."),
        ]

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return add


def command_line() -> str:
    """The command as the user typed it, quoted to be pasted again (what a report's `command` records)."""
    return "compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
