"""`compress run`: load -> (prune) -> export -> profile every variant on the device -> report.json.

Each variant is profiled with the device profile, its speedup over fp32 is measured interleaved (so both
numbers see the same machine), and its fidelity to the fp32 model is measured on held-out inputs. The
recommended variant is the fastest one within tolerance, which may honestly be fp32.

The whole output folder is built beside OUTDIR and swapped in at the end: a failed or interrupted run
leaves OUTDIR as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Optional

import onnx
import torch
from torch import nn

from compress.core import default_mode, first_line, swap_in, warn, write_json
from compress.evaluate import LabelledMetric, Metric, fidelity, onnx_outputs, torch_outputs
from compress.pipeline.options import RunOptions
from compress.pipeline.stage_cache import StageCache, key_of
from compress.prune import count_macs, prune_stage
from compress.quantize import Backend, QuantOptions, backend_for, quant_stage
from compress.report import SCHEMA, check_report, plot_tradeoff, write_markdown
from devices import DeviceProfile, describe_host
from export import export_onnx
from runtime import interleaved_latency, profile_model, resolve_providers


def _params(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return int(sum(int(_numel(t.dims)) for t in model.graph.initializer))


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def within_tolerance(fid: dict[str, Any], tolerance: float) -> bool:
    """Classifiers are judged on top-1 agreement with fp32, everything else on the worst per-sample cosine."""
    if fid.get("top1_agreement") is not None:
        return fid["top1_agreement"] >= 1.0 - tolerance
    return fid.get("cosine_min") is not None and fid["cosine_min"] >= 1.0 - tolerance


def recommend(variants: list[dict[str, Any]], tolerance: float) -> tuple[str, str]:
    ok = [v for v in variants if v["name"] == "fp32" or (v["within_tolerance"] and not v["simulated"])]
    best = max(ok, key=lambda v: (v["speedup_vs_fp32"] or 0.0, v["name"] == "fp32"))
    others = [v for v in variants if v["name"] != "fp32"]
    if best["name"] != "fp32":
        return best["name"], (f"{best['name']} is {best['speedup_vs_fp32']:.2f}x faster than fp32 on this device "
                              f"and within tolerance {tolerance:g}")
    if not others:
        return "fp32", "only fp32 was built"
    why = []
    for v in others:
        if v["simulated"]:
            why.append(f"{v['name']} is simulated (no such hardware on this device)")
        elif not v["within_tolerance"]:
            why.append(f"{v['name']} is outside tolerance {tolerance:g}")
        else:
            smaller = variants[0]["size_bytes"] / max(1, v["size_bytes"])
            why.append(f"{v['name']} is not faster ({v['speedup_vs_fp32']:.2f}x)"
                       + (f", though {smaller:.2f}x smaller: take it if size is what you need" if smaller >= 1.1 else ""))
    return "fp32", "; ".join(why) + ": keeping fp32"


def run_pipeline(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    train: list[dict[str, torch.Tensor]],
    held_out: list[dict[str, torch.Tensor]],
    profile: DeviceProfile,
    outdir: Path,
    opts: RunOptions,
    on_stage: Callable[[str], None] = lambda s: None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    quantizer = backend_for(opts.quant, opts.backend) if opts.quant != "none" else None
    outdir = Path(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-", dir=outdir.parent))
    os.chmod(work, default_mode(0o777))
    try:
        cache = opts.cache or StageCache(enabled=False)
        stages: dict[str, Any] = {}
        base_key = [example, profile.opset, opts.source]

        def export_variant(name: str, module: nn.Module) -> dict[str, Any]:
            on_stage(f"exporting {name}")
            path = work / f"{name}.onnx"
            res = export_onnx(module, example, path, opset=profile.opset, dynamic_batch=True, source=opts.source,
                              extra_meta={"variant": name})
            macs, _ = count_macs(module, example)
            return {"name": name, "onnx": path.name, "size_bytes": res.size_bytes, "params": _params(path),
                    "macs": int(macs), "parity": res.parity, "simulated": False, "excluded_layers": []}

        variants = [cache.run("export", key_of("export", base_key, [model]), [work / "fp32.onnx"],
                              lambda: export_variant("fp32", model))]
        modules = {"fp32": model}
        if opts.prune is not None:
            def prune_and_export() -> dict[str, Any]:
                modules["pruned"], report = prune_stage(model, example, train, held_out, opts.prune, on_stage)
                return {"stage": report, "variant": export_variant("pruned", modules["pruned"])}

            parts = [*base_key, train, held_out, asdict(opts.prune), _function_file(opts.prune.finetune)]
            # a torch backend (INC) quantizes the torch module, which a cache hit does not bring back (only its ONNX)
            prune_cache = StageCache(enabled=False) if quantizer is not None and quantizer.takes == "torch" else cache
            got = prune_cache.run("prune", key_of("prune", parts, [model]), [work / "pruned.onnx"], prune_and_export)
            cache.events["prune"] = prune_cache.events["prune"]
            stages["prune"] = got["stage"]
            variants.append(got["variant"])
        reference = torch_outputs(model, held_out)
        if quantizer is not None:
            base = variants[-1]  # the pruned model when there is one: the final variant is pruned and quantized
            stages["quantize"], variant = _quantize(quantizer, base, modules[base["name"]], example, train, work,
                                                    profile, opts, cache, on_stage)
            variants.append(variant)
        if opts.on_result is not None and "prune" in stages:
            opts.on_result("prune", stages["prune"])
        on_stage(f"profiling on {profile.name}")
        timer = opts.timer or time_variants
        timed = timer({v["name"]: work / v["onnx"] for v in variants if not v["simulated"]}, profile,
                      {k: t.numpy() for k, t in example.items()}, opts.runs, opts.max_seconds, opts.ab_rounds)
        measured, speedup_measure = timed["measured"], timed["speedup_measure"]
        _judge(variants, timed, reference, held_out, work, opts, quantizer, on_stage)
        name, reason = recommend(variants, opts.tolerance)
        report = {
            "schema": SCHEMA,
            "device": {**profile.model_dump(mode="json", exclude={"remote"}), "source": str(profile.source) if profile.source else None},
            "host": measured["host"] if measured else timed.get("host") or describe_host(),
            "remote": measured["remote"] if measured else None,
            "variants": variants,
            "recommended": name,
            "reason": reason,
            "tolerance": opts.tolerance,
            "tolerance_on": f"drop of --eval {opts.evaluate.spec}" if opts.evaluate else "fidelity to fp32",
            "eval": opts.evaluate.spec if opts.evaluate else None,
            "speedup_measure": speedup_measure,
            **({"profiled_on": timed["profiled_on"]} if timed.get("profiled_on") else {}),
            "stages": stages,
            "command": opts.command,
            "model": opts.source,
            "cache": {"stages": dict(cache.events), "root": str(cache.root) if cache.enabled else None},
            **(extra or {}),
        }
        write_json(work / "report.json", check_report(report))
        _write_readable(report, work)
        swap_in(work, outdir)
        return report
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _quantize(quantizer: Backend, base: dict[str, Any], module: nn.Module, example: dict[str, torch.Tensor],
              train: list[dict[str, torch.Tensor]], work: Path, profile: DeviceProfile, opts: RunOptions,
              cache: StageCache, on_stage: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The quantize stage on the last variant (`base`, from `module`), through the stage cache: its report and
    the new variant."""
    # a format steered by its own budget (weight-only INT4) takes neither the tolerance nor --eval
    steered = quantizer.tolerance
    qtol = opts.tolerance if opts.quant_tolerance is None else opts.quant_tolerance
    qopts = QuantOptions(to=opts.quant, method=opts.quant_method, simulate=opts.simulate,
                         tolerance=qtol if steered and opts.quant_fallback else None, measure=False,
                         select_ops=opts.select_ops, evaluate=opts.evaluate if steered else None,
                         backend=opts.backend, max_calib=opts.max_calib, **opts.int4)
    source = (module, example, train) if quantizer.takes == "torch" else None
    path = work / f"{opts.quant}.onnx"
    parts = [work / base["onnx"], Path(opts.calib) if opts.calib else None,
             {f.name: getattr(qopts, f.name) for f in fields(qopts) if f.name != "evaluate"}, _metric_parts(opts.evaluate),
             profile.model_dump(mode="json", exclude={"source"})]
    judge = work / "fp32.onnx" if base["name"] != "fp32" else None  # tolerance is on the whole chain
    parts.append(judge)
    q = cache.run("quantize", key_of("quantize", parts), [path],
                  lambda: quant_stage(work / base["onnx"], path, profile, opts.calib, qopts, on_stage,
                                      reference_model=judge, torch_source=source))
    variant = {"name": opts.quant, "onnx": path.name, "size_bytes": path.stat().st_size, "params": _params(path),
               "macs": base["macs"], "parity": None, "simulated": q["simulated"],
               "excluded_layers": q["excluded_layers"], "from": base["name"]}
    return {k: v for k, v in q.items() if k != "onnx"}, variant


def _judge(variants: list[dict[str, Any]], timed: dict[str, Any], reference: Any, held_out: list[dict[str, torch.Tensor]],
           work: Path, opts: RunOptions, quantizer: Optional[Backend], on_stage: Callable[[str], None]) -> None:
    """Each variant's device figures, fidelity to the torch model on the held-out batches, --eval score and
    whether it is within the tolerance; simulated ones are run the way their backend runs them, untimed."""
    for v in variants:
        runner, session_options = onnx_outputs, None
        if v["simulated"] and quantizer is not None:  # no kernels for the format here: fidelity only
            runner, session_options = quantizer.outputs()
            v["latency_ms"], v["profile"], v["speedup_vs_fp32"] = None, None, None
        else:
            v.update(timed["variants"][v["name"]])
        v["fidelity"] = fidelity(reference, runner(work / v["onnx"], held_out))
        v["within_tolerance"] = within_tolerance(v["fidelity"], opts.tolerance)
        if opts.evaluate is not None:
            on_stage(f"scoring {v['name']} with --eval")
            v["accuracy"] = opts.evaluate(work / v["onnx"], session_options=session_options)
            v["within_tolerance"] = variants[0]["accuracy"] - v["accuracy"] <= opts.tolerance


def time_variants(paths: dict[str, Path], profile: DeviceProfile, feeds: dict[str, Any], runs: Optional[int] = None,
                  max_seconds: Optional[float] = None, ab_rounds: int = 30) -> dict[str, Any]:
    """Profile each model on the device and its speedup over paths["fp32"]: files in, plain data out, so that
    `compress search` can run it where the device is (a Ray task holding the device's resource), one at a time.

    Locally the speedup is the interleaved A/B's median wall-clock ratio (both sides see the same machine); for
    a remote device, the ratio of p50s measured there in turn."""
    out: dict[str, dict[str, Any]] = {}
    measured = None
    for name, path in paths.items():
        prof = profile_model(path, profile, runs=runs, max_seconds=max_seconds)
        measured = prof if prof.get("measured_on") == "remote" else None  # where the figures come from
        out[name] = {"latency_ms": {k: prof["latency_ms"][k] for k in ("p50", "p90", "p99", "mean", "std")},
                     "profile": {k: prof.get(k) for k in ("runs", "spread", "providers", "threads", "fallback",
                                                          "load_ms", "peak_rss_mb")}}
    if profile.remote is None:
        providers, _ = resolve_providers(profile)
        ab = interleaved_latency(paths, feeds=feeds, providers=[(p, dict(o)) for p, o in providers],
                                 threads=profile.threads, session_config=dict(profile.session_config), rounds=ab_rounds,
                                 min_seconds=3.0, baseline="fp32")
        for name in paths:
            out[name]["speedup_vs_fp32"] = ab.speedup(name, "wall")
        how = f"median wall-clock of {ab.rounds} interleaved rounds, {ab.threads} threads"
    else:  # the interleaved A/B runs in this process, on this machine: for a remote device, ratios of its p50s
        base = out["fp32"]["latency_ms"]["p50"]
        for name in paths:
            out[name]["speedup_vs_fp32"] = base / out[name]["latency_ms"]["p50"]
        how = (f"ratio of p50s, each variant profiled in turn on {measured['remote']['target']} over SSH "
               "(not interleaved: the interleaved A/B would have timed this machine)")
    return {"variants": out, "speedup_measure": how,
            "measured": {"host": measured["host"], "remote": measured["remote"]} if measured else None}


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
        warn(f"trade-off plot not written: {first_line(e)}")
    write_markdown(report, work / "report.md", plot=plot)
