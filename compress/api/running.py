"""`compress.run`: the whole pipeline (load, prune, export, quantize, profile every variant, recommend, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from compress.core import UsageError, check_output_path
from compress.data import DataOptions, data_opts_of, is_data, user_data
from compress.evaluate import load_metric
from compress.models import load_run_model, model_inputs, prepare_inputs, require_one_input_source, shape_args
from compress.pipeline import RunOptions, StageCache, run_pipeline
from compress.pruning import PruneOptions, get_importance
from compress.quantization import QuantOptions, check_format
from devices import load_profile


def run(model: Union[str, Path], *, output: Union[str, Path], weights: Optional[str] = None,
        input_shape: Union[str, Sequence[str]] = (), calib: Optional[str] = None, max_calib: Optional[int] = None,
        device: str = "host", prune: Union[float, str, None] = None,
        importance: str = PruneOptions.default("importance"), allocation: str = PruneOptions.default("allocation"),
        ignore: Sequence[str] = (), prune_first_conv: bool = PruneOptions.default("prune_first_conv"),
        no_recover: bool = False, recover_seconds: float = PruneOptions.default("recover_seconds"),
        no_backoff: bool = False, quant: str = RunOptions.default("quant"),
        block_size: int = QuantOptions.default("block_size"), budget_mb: Optional[float] = None,
        avg_bits: Optional[float] = None, salience: str = QuantOptions.default("salience"), simulate: bool = False,
        no_op_select: bool = False, tolerance: float = RunOptions.default("tolerance"), eval: Optional[str] = None,
        metric: Optional[str] = None, backend: str = QuantOptions.default("backend"), runs: Optional[int] = None,
        tune_threads: bool = RunOptions.default("tune_threads"), overwrite: bool = False, force: bool = False,
        generate: bool = False,
        image_size: Optional[str] = None, crop_pct: Optional[float] = None, mean: Optional[str] = None,
        std: Optional[str] = None, interpolation: Optional[str] = None, seq_len: Optional[int] = None,
        tokenizer: Optional[str] = None, column: Optional[str] = None,
        label_column: str = DataOptions.default("label_column"), skip_bad: bool = False,
        on_stage: Optional[Callable[[str], None]] = None, command: str = "",
        recipe: Optional[dict[str, Any]] = None) -> Any:
    """Build every variant of MODEL for DEVICE, profile each there, recommend one, and write OUTPUT (report.json,
    report.md, tradeoff.png, one .onnx per variant); the compress.report.RunReport.

    MODEL: a PyTorch model (FILE.py:factory, package.module:factory, a Hugging Face folder) or an ONNX file.
    Keyword arguments are `compress run`'s options (`no_recover=True` for --no-recover, `eval=` for --eval,
    `input_shape` one string or a list), with its defaults. `on_stage(text)` hears what the run is doing; None:
    nothing is reported. Bad options raise UsageError, bad inputs InputError, each with the CLI's one line.
    `generate=True`: the model generates text; every variant is exported with its KV cache, timed per token
    (prefill and decode) and compared and recommended on the decode step.

        >>> import compress
        >>> report = compress.run("compress.zoo:resnet_tiny", input_shape="1,3,32,32", quant="int8", output="out")
        >>> report.recommended, [(v.name, v.speedup_vs_fp32) for v in report.variants]
    """
    say = on_stage or (lambda s: None)
    shapes = shape_args(input_shape)
    model = str(model)
    require_one_input_source(shapes, calib)
    onnx_in = model.lower().endswith(".onnx")
    if onnx_in and prune is not None:
        raise UsageError(f"{model} is ONNX: pruning needs the PyTorch model (a factory or a Hugging Face folder); "
                         "drop --prune to quantize, profile and compare the ONNX file as it is")
    if tolerance > 1 and not eval:
        raise UsageError(f"--tolerance {tolerance}: a loss of fidelity is at most 1 (larger values only make sense with --eval)")
    inputs = [model, weights, calib, device, eval, metric]
    outdir = check_output_path(str(output), inputs, folder=True, overwrite=overwrite)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {output} is a file; give a folder")
    profile = load_profile(device)
    prune_opts = None
    pruning_only = {"--ignore": bool(ignore), "--allocation": allocation != PruneOptions.default("allocation"),
                    "--prune-first-conv": prune_first_conv}
    if any(pruning_only.values()) and prune is None:
        raise UsageError(f"{next(k for k, v in pruning_only.items() if v)} is about pruning: give --prune too")
    if prune is not None:
        auto = prune == "auto"
        if not auto and not isinstance(prune, (int, float)):
            raise UsageError(f"--prune {prune!r}: a fraction of channels in [0, 1), or 'auto'")
        if auto and no_recover:
            raise UsageError("--prune auto judges each probe after its recovery: it does not take --no-recover")
        prune_opts = PruneOptions(ratio=PruneOptions.default("max_ratio") if auto else float(prune),
                                  importance=importance, allocation=allocation, ignore=list(ignore),
                                  prune_first_conv=prune_first_conv, recover=not no_recover,
                                  recover_seconds=recover_seconds, round_to=profile.pruning.channel_multiple,
                                  real_data=calib is not None,
                                  # a fixed ratio does not depend on --tolerance (nor does its stage cache key)
                                  **({"auto": True, "tolerance": tolerance} if auto else {}))
        prune_opts.check("--prune")
        get_importance(importance)
    int4 = {"block_size": block_size, "budget_mb": budget_mb, "avg_bits": avg_bits, "salience": salience}
    if quant != "none":
        check_format(profile, QuantOptions(to=quant, simulate=simulate, backend=backend, **int4))
    elif budget_mb is not None or avg_bits is not None:
        raise UsageError("--budget-mb/--avg-bits allocate bits per layer for --quant int4, not --quant none")
    dopts = data_opts_of(locals())
    if eval and not is_data(eval):
        load_metric(eval, metric)  # a FILE.py:FN fails here, before the model is loaded
    say("loading model")
    loaded = load_run_model(model, weights)
    if onnx_in and not generate and loaded.generates:  # a decoder with its cache is timed as it generates
        generate = True
        loaded.notes.append("a decoder with its KV cache (past_key_values.* inputs): run as with --generate, each "
                            "variant timed per token and judged on its prefill's logits")
    if generate and onnx_in and not loaded.generates:
        raise UsageError(f"--generate times a decoder with its KV cache, and {model} has no past_key_values inputs: "
                         "export the PyTorch model with `compress export --with-past`, or pass the model itself")
    with user_data(model_inputs(loaded, shapes), dopts, Path(outdir).absolute().parent, calib, eval,
                   max_calib) as data:
        opts = RunOptions(prune=prune_opts, quant=quant, int4=int4, calib=data.calib, calib_name=calib,
                          max_calib=max_calib, simulate=simulate, tolerance=tolerance, runs=runs, source=model,
                          select_ops=not no_op_select, evaluate=load_metric(data.eval, metric), backend=backend,
                          cache=StageCache(force=force), overwrite=overwrite, backoff=not no_backoff,
                          tune_threads=tune_threads, command=command, generate=generate)
        say("preparing inputs")
        prep = prepare_inputs(loaded, shapes, data.calib, max_samples=max_calib)
        data.describe(prep.info)
        return run_pipeline(Path(model) if onnx_in else loaded.module, prep, profile, Path(outdir), opts,
                            on_stage=say, extra={"calibration": prep.info, **({"model_notes": loaded.notes} if loaded.notes else {}),
                                   **({"recipe": recipe} if recipe else {})})
