"""`compress export`: a PyTorch model to a verified ONNX file."""

from __future__ import annotations

from typing import Any

import click

from compress.cli.options import data_options, model_input_options
from compress.core import check_json_output, console
from export import DEFAULT_NEW_TOKENS

EPILOG = """\b
Examples:
  compress export compress.zoo:resnet_demo --input-shape 1,3,224,224 -o resnet.onnx
  compress export my_model.py:build --weights best.safetensors --calib calib.npz --dynamic-batch -o model.onnx
  compress export compress.zoo:encoder_tiny --input-shape input_ids=1,64 --input-shape attention_mask=1,64 -o enc.onnx
  compress export ./bert-folder --input-shape input_ids=1,128 --json - -o bert.onnx
  compress export ./gpt2-folder --input-shape input_ids=1,16 --with-past -o decoder.onnx
"""


@click.command("export", epilog=EPILOG)
@click.argument("model")
@model_input_options
@data_options
@click.option("--device", default=None, help="Device profile (name or YAML) whose opset to use.")
@click.option("--opset", type=click.IntRange(7, 23), default=None,
              help="ONNX opset (default: the device profile's, else 18; --with-past: its generation_opset, else 23).")
@click.option("--dynamic-batch", is_flag=True, help="Make the first axis of every input symbolic.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True, help="auto: dynamo, falling back to TorchScript.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True, help="Parity: absolute tolerance.")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-3, show_default=True, help="Parity: tolerance relative to the output's largest value.")
@click.option("--with-past", is_flag=True, help="A decoder for generation: its KV cache as inputs and outputs (prefill "
              "and decode steps in one graph), checked by greedy generation against torch token for token.")
@click.option("--new-tokens", type=click.IntRange(1, 1024), default=DEFAULT_NEW_TOKENS, show_default=True,
              help="--with-past: tokens generated from the example prompt for the check.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), help="Write the export summary as JSON to FILE ('-' for stdout).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
def export(model: str, weights: str | None, input_shapes: tuple[str, ...], calib: str | None, device: str | None,
           opset: int | None, dynamic_batch: bool, exporter: str, atol: float, rtol: float, with_past: bool,
           new_tokens: int, json_out: str | None,
           output: str, **data_flags: Any) -> None:
    """Export MODEL to ONNX and verify it against torch.

    MODEL is path/to/file.py:factory, package.module:factory (a callable returning an nn.Module), or a
    Hugging Face model folder (config.json + safetensors). Nothing is written unless onnxruntime's outputs
    match torch's within tolerance.
    """
    from compress.api import export as export_api

    check_json_output(json_out, output, [model, weights, calib, device])
    with console.progress("starting") as step:
        result = export_api(model, output=output, weights=weights, input_shape=input_shapes, calib=calib, device=device,
                            opset=opset, dynamic_batch=dynamic_batch, exporter=exporter, atol=atol, rtol=rtol,
                            with_past=with_past, new_tokens=new_tokens,
                            on_stage=lambda s: step.update(description=s), **data_flags)
    summary = result.to_json()
    if console.report_json(json_out, summary):
        return
    if with_past:
        g = result.generation
        console.out_console.print(
            f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset}): {result.decoder} with its KV "
            f"cache, {result.layers} layers x {result.kv_heads} KV heads x {result.head_dim}"
            + (f"; {result.attention_with_past} Attention nodes take the cache themselves" if result.attention_with_past
               else "")
            + (f"; {result.joined_matmuls} MatMuls of shared inputs joined" if result.joined_matmuls else "") + "\n"
            f"greedy generation of {g.new_tokens} tokens from a {g.prompt_tokens}-token prompt matches torch token for "
            f"token (max next-token logit abs err {g.max_logit_abs_err:.1e})", markup=False)
        return
    p = result.parity
    console.out_console.print(
        f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset}, {result.exporter} exporter)\n"
        f"parity vs torch over {p['cases']} input set(s): max abs err {p['max_abs_err']:.2e}, max rel err {p['max_rel_err']:.2e}"
    )
    for a in result.attempts:
        if a["error"]:
            console.warn(f"{a['exporter']} exporter not used: {a['error']}")
