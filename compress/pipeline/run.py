"""`compress run`: load -> (prune) -> export -> profile every variant on the device -> report.json.

Each variant is profiled with the device profile (at the intra-op thread count it runs fastest with, fp32 too),
its speedup over fp32 is measured interleaved (so both numbers see the same machine), and its fidelity to the
fp32 model is measured on held-out inputs. The recommended variant is the fastest one within tolerance, which
may honestly be fp32.

The whole output folder is built beside OUTDIR and swapped in at the end: a failed or interrupted run
leaves OUTDIR as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import onnx
import torch
from torch import nn

from compress.core import (
    ModelError,
    Result,
    StageClock,
    UsageError,
    default_mode,
    first_line,
    foreign_files,
    graph_macs,
    missing_extra,
    move_aside,
    partial_dir,
    save_model,
    swap_in,
    warn,
    write_json,
    write_manifest,
)
from compress.evaluate import LabelledMetric, Metric, fidelity, onnx_outputs, torch_outputs
from compress.models import Prepared
from compress.pipeline.options import RunOptions
from compress.pipeline.stage_cache import StageCache, key_of
from compress.pipeline.timing import Timings, time_variants
from compress.pruning import count_macs, prune_stage
from compress.quantization import Backend, QuantOptions, backend_for, quant_stage
from compress.report import (
    SCHEMA,
    Built,
    Fidelity,
    PruneResult,
    QuantResult,
    RunReport,
    Stages,
    ThreadTuning,
    Variant,
    plot_tradeoff,
    write_markdown,
)
from devices import DeviceProfile, describe_host
from export import (
    PAST_PREFIX,
    export_onnx,
    export_with_past,
    get_metadata,
    input_specs,
    prefill_feeds,
    set_metadata,
)
from runtime import decode_step_feeds


def _params(path: Path) -> int:
    return _param_count(onnx.load(str(path), load_external_data=False))


def _param_count(model: onnx.ModelProto) -> int:
    return int(sum(int(_numel(t.dims)) for t in model.graph.initializer))


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def recommend(variants: list[Variant], tolerance: float, tuning: Optional[ThreadTuning] = None) -> tuple[str, str]:
    """The fastest variant within tolerance (fp32 when none is faster) and why; with `tuning`, at the thread count
    each was fastest with, which the reason names because the speed holds for that setting."""
    ok = [v for v in variants if v.name == "fp32" or (v.within_tolerance and not v.simulated)]
    best = max(ok, key=lambda v: (v.speedup_vs_fp32 or 0.0, v.name == "fp32"))
    others = [v for v in variants if v.name != "fp32"]
    if best.name != "fp32":
        threads = ""
        if tuning is not None:
            t, base = tuning.chosen[best.name], tuning.chosen["fp32"]
            threads = (f" with {_threads(t)} (onnxruntime's intra_op_num_threads; fp32 at its fastest, "
                       f"{_threads(base)})")
        return best.name, (f"{best.name} is {best.speedup_vs_fp32:.2f}x faster than fp32 on this device{threads} "
                           f"and within tolerance {tolerance:g}")
    if not others:
        return "fp32", "only fp32 was built"
    why = []
    for v in others:
        if v.simulated:
            why.append(f"{v.name} is simulated (no such hardware on this device)")
        elif v.fidelity.nonfinite_samples:
            why.append(f"{v.name} gives NaN or Inf outputs on {v.fidelity.nonfinite_samples} of "
                       f"{v.fidelity.samples} held-out samples")
        elif not v.within_tolerance:
            why.append(f"{v.name} is outside tolerance {tolerance:g}")
        else:
            smaller = variants[0].size_bytes / max(1, v.size_bytes)
            why.append(f"{v.name} is not faster ({v.speedup_vs_fp32:.2f}x)"
                       + (f", though {smaller:.2f}x smaller: take it if size is what you need" if smaller >= 1.1 else ""))
    kept = f" ({_threads(tuning.chosen['fp32'])}: its fastest)" if tuning is not None else ""
    return "fp32", "; ".join(why) + f": keeping fp32{kept}"


def _threads(n: int) -> str:
    return f"{n} intra-op thread" + ("s" if n != 1 else "")


def _prune_hint(variants: list[Variant], prune: Optional[PruneResult]) -> str:
    """When the pruned model missed the tolerance, what would have fit: --prune auto's probes, or a pointer to it."""
    pruned = next((v for v in variants if v.name == "pruned"), None)
    if prune is None or pruned is None or pruned.within_tolerance:
        return ""
    auto = prune.auto or {}
    if not auto:
        return "; the pruned model missed the tolerance: `--prune auto` finds the largest cut within it"
    fits = [p["ratio"] for p in auto.get("probes", []) if p.get("within")]
    if fits:  # a probe fitted on the prune stage's held-out fidelity, and the judged variant still missed
        return f"; --prune auto's {max(fits):.0%} fitted in the prune stage but not as the built model"
    least = min((p["ratio"] for p in auto.get("probes", [])), default=None)
    return f"; --prune auto: no ratio down to {least:.0%} kept the pruned model within the tolerance" if least else ""


def _module_macs(name: str, module: nn.Module, example: dict[str, torch.Tensor], exported: Path) -> int:
    """MACs of the torch module, or, where no counter can run it, of its exported graph (shape inference): a
    figure for the report, which must not stop the run."""
    try:
        return count_macs(module, example)[0]
    except ModelError as e:
        warn(f"{name}: {first_line(e)}; MACs counted from the exported ONNX graph instead")
        return graph_macs(onnx.load(str(exported), load_external_data=False), {k: tuple(v.shape) for k, v in example.items()})


def _take_onnx(src: Path, dst: Path, example: dict[str, torch.Tensor]) -> Built:
    """The user's ONNX file as the fp32 variant: written into the run (weights beside it past 2 GB), its MACs
    counted from shape inference at the example's shapes. A file without our metadata gets the example's input
    specs in it, so that profiling and synthetic calibration use the shapes the run was given (a symbolic
    sequence length is otherwise 1) and the copy says where it came from."""
    proto = onnx.load(str(src), load_external_data=True)
    meta = get_metadata(proto) or {}
    if any(i.name.startswith(PAST_PREFIX) for i in proto.graph.input):  # a decoder with its cache: its prefill
        example = {k: torch.from_numpy(v) for k, v in prefill_feeds(example, proto.graph.input).items()}
    if not meta.get("inputs"):  # the example holds the graph's fed inputs only (compress.models.load_onnx_model)
        set_metadata(proto, {**meta, "source": str(src), "exporter": meta.get("exporter", "none: taken as ONNX"),
                             "inputs": [spec.to_json() for spec in input_specs(example)]})
    macs = graph_macs(proto, {k: tuple(v.shape) for k, v in example.items()})
    save_model(proto, dst)
    size = sum(p.stat().st_size for p in (dst, dst.parent / (dst.name + ".data")) if p.exists())
    return Built(name="fp32", onnx=dst.name, size_bytes=size, params=_param_count(proto), macs=macs, parity=None,
                 simulated=False, excluded_layers=[])


class _Pruned(Result):
    """The prune stage's result and the pruned model's export, cached together."""

    stage: PruneResult
    built: Built


def run_pipeline(model: nn.Module | Path, inputs: Prepared, profile: DeviceProfile, outdir: Path, opts: RunOptions,
                 on_stage: Callable[[str], None] = lambda s: None, extra: Optional[dict[str, Any]] = None) -> RunReport:
    """Build every variant of MODEL (fp32, pruned, quantized), time each on the device, judge each against the
    tolerance, recommend one, and write OUTDIR (report.json, report.md, tradeoff.png, the models) atomically.
    MODEL is a torch module, or an ONNX file (a Path) taken as the fp32 variant: no export, no pruning.
    `inputs`: the example, the batches stages tune on (train) and those variants are judged on (held_out)."""
    example, train, held_out = inputs.example, inputs.train, inputs.held_out
    quantizer = backend_for(opts.quant, opts.backend) if opts.quant != "none" else None
    outdir = Path(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    work = partial_dir(outdir.parent, outdir.name)
    os.chmod(work, default_mode(0o777))
    try:
        cache = opts.cache or StageCache(enabled=False)
        clock = StageClock()
        stages = Stages()
        # a decoder exported with its cache (--generate) is another file than its plain export: another key
        base_key = [example, profile.opset, opts.source, {"with_past": profile.generation_opset} if opts.generate else None]

        def export_variant(name: str, module: nn.Module) -> Built:
            on_stage(f"exporting {name}")
            path = work / f"{name}.onnx"
            if opts.generate:  # with its KV cache, checked by greedy generation against torch
                dec = export_with_past(module, example["input_ids"], path, opset=profile.generation_opset,
                                       source=opts.source, extra_meta={"variant": name}, on_stage=on_stage)
                check = dec.generation
                return Built(name=name, onnx=path.name, size_bytes=dec.size_bytes, params=_params(path),
                             macs=_module_macs(name, module, example, path), simulated=False, excluded_layers=[],
                             parity={"ok": True, "greedy_tokens_matched": check.matched,
                                     "max_logit_abs_err": check.max_logit_abs_err})
            res = export_onnx(module, example, path, opset=profile.opset, dynamic_batch=True, source=opts.source,
                              extra_meta={"variant": name})
            return Built(name=name, onnx=path.name, size_bytes=res.size_bytes, params=_params(path),
                         macs=_module_macs(name, module, example, path),
                         parity=res.parity, simulated=False, excluded_layers=[])

        if isinstance(model, Path):  # an ONNX file: it is the fp32 variant as it is, nothing to export or prune
            if opts.prune is not None:
                raise UsageError(f"{model.name} is ONNX: pruning needs the PyTorch model; drop --prune")
            with clock("export"):
                built = [_take_onnx(model, work / "fp32.onnx", example)]
            modules: dict[str, nn.Module] = {}
        else:
            with clock("export"):
                built = [cache.run("export", key_of("export", base_key, [model]), [work / "fp32.onnx"],
                                   lambda: export_variant("fp32", model), Built)]
            modules = {"fp32": model}
        if opts.prune is not None:
            def prune_and_export() -> _Pruned:
                modules["pruned"], report = prune_stage(model, inputs, opts.prune, on_stage)
                return _Pruned(stage=report, built=export_variant("pruned", modules["pruned"]))

            parts = [*base_key, train, held_out, opts.prune.model_dump(), _function_file(opts.prune.finetune)]
            # a torch backend (INC) quantizes the torch module, which a cache hit does not bring back (only its ONNX)
            prune_cache = StageCache(enabled=False) if quantizer is not None and quantizer.takes == "torch" else cache
            with clock("prune"):
                got = prune_cache.run("prune", key_of("prune", parts, [model]), [work / "pruned.onnx"],
                                      prune_and_export, _Pruned)
            cache.events["prune"] = prune_cache.events["prune"]
            stages.prune = got.stage
            built.append(got.built)
        if isinstance(model, Path):  # the ONNX file is the reference; a decoder with its cache, as a prefill
            reference = (_prefill_logits if opts.generate else onnx_outputs)(work / "fp32.onnx", held_out)
        else:
            reference = torch_outputs(model, held_out)
        if quantizer is not None:
            if opts.prune is not None and opts.backoff:  # the back-off: quantization alone, should the cut not pay
                with clock("quantize_unpruned"):
                    stages.quantize_unpruned, variant = _quantize(quantizer, built[0], model, example, train, work,
                                                                  profile, opts, cache, on_stage,
                                                                  f"{opts.quant}-unpruned")
                built.append(variant)
            base = built[1] if opts.prune is not None else built[0]  # the final variant is pruned and quantized
            # the torch module only a torch backend needs (a prune cache hit brings back the ONNX alone)
            with clock("quantize"):
                stages.quantize, variant = _quantize(quantizer, base, modules.get(base.name), example, train, work,
                                                     profile, opts, cache, on_stage, opts.quant)
            built.append(variant)
        if opts.on_result is not None and stages.prune is not None:
            opts.on_result("prune", stages.prune)
        on_stage(f"profiling on {profile.name}")
        timer = opts.timer or time_variants
        feeds, per_token = {k: t.numpy() for k, t in example.items()}, None
        if opts.generate:  # compared on the decode step, the figure generation repeats for every token
            feeds, per_token = _decode_feeds(work / "fp32.onnx")
        with clock("profile"):
            timed = timer({b.name: work / b.onnx for b in built if not b.simulated}, profile, feeds, opts.runs,
                          opts.max_seconds, opts.ab_rounds, opts.tune_threads)
        if per_token:
            timed.speedup_measure = f"{per_token}: {timed.speedup_measure}"
        with clock("judge"):
            variants = _judge(built, timed, reference, held_out, work, opts, quantizer, on_stage,
                              real_data=inputs.info.get("source") != "random")
        name, reason = recommend(variants, opts.tolerance, timed.threads_tuning)
        reason += _prune_hint(variants, stages.prune)
        report = RunReport(
            schema_=SCHEMA,
            device={**profile.model_dump(mode="json", exclude={"remote"}),
                    "source": str(profile.source) if profile.source else None},
            host=timed.host or describe_host(),
            remote=timed.remote,
            variants=variants,
            recommended=name,
            reason=reason,
            tolerance=opts.tolerance,
            tolerance_on=f"drop of --eval {opts.evaluate.spec}" if opts.evaluate else "fidelity to fp32",
            eval=opts.evaluate.spec if opts.evaluate else None,
            speedup_measure=timed.speedup_measure,
            stage_seconds=clock.seconds,
            **({"threads_tuning": timed.threads_tuning} if timed.threads_tuning else {}),
            **({"profiled_on": timed.profiled_on} if timed.profiled_on else {}),
            stages=stages,
            command=opts.command,
            model=opts.source,
            cache={"stages": dict(cache.events), "root": str(cache.root) if cache.enabled else None},
            **(extra or {}),
        )
        doc = report.to_json()
        write_json(work / "report.json", doc)
        _write_readable(doc, work)
        write_manifest(work)
        if opts.overwrite and foreign_files(outdir):
            warn(f"{outdir} held files no run wrote: moved it, whole, to {move_aside(outdir)}")
        swap_in(work, outdir)
        return report
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _quantize(quantizer: Backend, base: Built, module: Optional[nn.Module], example: dict[str, torch.Tensor],
              train: list[dict[str, torch.Tensor]], work: Path, profile: DeviceProfile, opts: RunOptions,
              cache: StageCache, on_stage: Callable[[str], None], name: str) -> tuple[QuantResult, Built]:
    """The quantize stage on the variant `base` (from `module`), through the stage cache: its result (without the
    file name, which the variant holds) and the new variant NAME."""
    # a format steered by its own budget (weight-only INT4) takes neither the tolerance nor --eval
    steered = quantizer.tolerance
    qtol = opts.tolerance if opts.quant_tolerance is None else opts.quant_tolerance
    qopts = QuantOptions(to=opts.quant, method=opts.quant_method, simulate=opts.simulate,
                         tolerance=qtol if steered and opts.quant_fallback else None, measure=False,
                         select_ops=opts.select_ops, evaluate=opts.evaluate if steered else None,
                         backend=opts.backend, max_calib=opts.max_calib, calib_name=opts.calib_name,
                         fallback_must_pay=True, **opts.int4)
    source = (module, example, train) if quantizer.takes == "torch" else None
    path = work / f"{name}.onnx"
    parts = [work / base.onnx, Path(opts.calib) if opts.calib else None,
             qopts.model_dump(exclude={"evaluate", "calib_name"}), _metric_parts(opts.evaluate),
             profile.model_dump(mode="json", exclude={"source"})]
    # tolerance is on the whole chain; --generate: against the base alone, whose KV cache a pruned model's (fewer
    # heads) no longer fits
    judge = work / "fp32.onnx" if base.name != "fp32" and not opts.generate else None
    parts.append(judge)
    stage = "quantize" if name == opts.quant else "quantize-unpruned"
    q = cache.run(stage, key_of("quantize", parts), [path],
                  lambda: quant_stage(work / base.onnx, path, profile, opts.calib, qopts, on_stage,
                                      reference_model=judge, torch_source=source), QuantResult)
    variant = Built(name=name, onnx=path.name, size_bytes=path.stat().st_size, params=_params(path),
                    macs=base.macs, parity=None, simulated=q.simulated, excluded_layers=q.excluded_layers,
                    from_=base.name)
    return QuantResult.from_json({k: v for k, v in q.to_json().items() if k != "onnx"}), variant


def _judge(built: list[Built], timed: Timings, reference: Any, held_out: list[dict[str, torch.Tensor]],
           work: Path, opts: RunOptions, quantizer: Optional[Backend], on_stage: Callable[[str], None],
           real_data: bool = False) -> list[Variant]:
    """Each built model with its device figures, fidelity to the torch model on the held-out batches, --eval
    score and whether it is within the tolerance; simulated ones are run the way their backend runs them,
    untimed. --generate: next-token agreement and perplexity too, judged on perplexity where the held-out
    tokens are the user's (`real_data`), not random."""
    variants: list[Variant] = []
    logits = _logits_index(work / built[0].onnx) if not opts.generate else 0  # with past: logits come first
    for b in built:
        runner, session_options = onnx_outputs, None
        if opts.generate:  # the with-past graph on the plain forward's tokens, as a prefill: its logits
            runner = _prefill_logits
        figures: dict[str, Any] = {}
        if b.simulated and quantizer is not None:  # no kernels for the format here: fidelity only
            runner, session_options = quantizer.outputs()
            figures = {"latency_ms": None, "profile": None, "speedup_vs_fp32": None}
        else:
            t = timed.variants[b.name]
            figures = {"latency_ms": t.latency_ms, "profile": t.profile, "speedup_vs_fp32": t.speedup_vs_fp32}
        ref, got = _logits_only(reference, runner(work / b.onnx, held_out), logits)
        fid = Fidelity.from_json(fidelity(ref, got, tokens=held_out if opts.generate else None, real_tokens=real_data))
        ok = fid.within(opts.tolerance)  # compress.evaluate.judged's rule; never with NaN/Inf outputs
        scored: dict[str, Any] = {}
        if opts.evaluate is not None:
            on_stage(f"scoring {b.name} with --eval")
            accuracy = opts.evaluate(work / b.onnx, session_options=session_options)
            base_accuracy = variants[0].accuracy if variants else accuracy
            ok = base_accuracy - accuracy <= opts.tolerance
            scored = {"accuracy": accuracy}
        variants.append(Variant(**b.model_dump(exclude_unset=True), **figures, fidelity=fid, within_tolerance=ok,
                                **scored))
    return variants


def _logits_index(fp32: Path) -> Optional[int]:
    """Where the exported model's outputs hold `logits` beside other tensors (a transformers model asked for its
    hidden states or attentions), the index of the logits: the output users judge a model by, and the one
    compared. None: every output is."""
    names = [o.name for o in onnx.load(str(fp32), load_external_data=False).graph.output]
    return names.index("logits") if "logits" in names and len(names) > 1 else None


def _logits_only(reference: list[list[Any]], candidate: list[list[Any]],
                 index: Optional[int]) -> tuple[list[list[Any]], list[list[Any]]]:
    """Both models' outputs per batch, narrowed to the logits where `index` says where they are (a prefill's
    candidate holds them alone already)."""
    def pick(outs: list[list[Any]]) -> list[list[Any]]:
        return outs if index is None else [o[index:index + 1] if len(o) > 1 else o for o in outs]

    return pick(reference), pick(candidate)


def _prefill_logits(path: Path, batches: list[dict[str, Any]], session_options: Any = None) -> list[list[Any]]:
    """onnx_outputs for a decoder exported with its KV cache: each held-out batch fed as a prefill (an empty
    past at the graph's own cache sizes), and only the logits kept, the output the plain forward's reference has."""
    inputs = onnx.load(str(path), load_external_data=False).graph.input
    return [o[:1] for o in onnx_outputs(path, [prefill_feeds(b, inputs) for b in batches], session_options)]


def _decode_feeds(fp32: Path) -> tuple[dict[str, Any], str]:
    """The decode step the variants are compared on, and how to say so."""
    feeds, lengths = decode_step_feeds(fp32)
    return feeds, (f"per token: the decode step after {lengths['context_len']} tokens of past (the prefill of "
                   f"{lengths['prompt_len']} tokens is in each variant's profile)")


def _function_file(spec: Optional[str]) -> Any:
    """A user function's source file, so that editing it invalidates what it produced."""
    if not spec:
        return None
    target = spec.rpartition(":")[0]
    return [spec, Path(target)] if target.endswith(".py") else spec


def _metric_parts(metric: Optional[Metric]) -> Any:
    if metric is None:
        return None
    if isinstance(metric, LabelledMetric):
        return [Path(metric.data_path), _function_file(metric.metric_spec)]
    return _function_file(metric.spec)


def _write_readable(report: dict[str, Any], work: Path) -> None:
    """report.md for people (and a PR), with the speed/fidelity plot when matplotlib can draw it: a plot that
    fails costs the picture, not the finished run."""
    plot = None
    try:
        plot_tradeoff(report, work / "tradeoff.png")
        plot = "tradeoff.png"
    except Exception as e:
        warn(f"trade-off plot not written: {missing_extra(e) or first_line(e)}")
    write_markdown(report, work / "report.md", plot=plot)
