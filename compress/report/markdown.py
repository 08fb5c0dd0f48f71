"""The human-readable side of `compress run`: report.json rendered as Markdown a user can paste into a PR.

Everything here reads the report defensively: a report with fewer variants, missing stages or null fields
(an older run, a hand-edited file) renders with "n/a" where a figure is missing, never a traceback.
`validate_report` is the one place that refuses a file, and it does so with an InputError of one line.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from compress import __version__
from compress.core import InputError, atomic_path
from compress.report.schema import REPORT_SCHEMA as SCHEMA  # reading a report must not import torch
from compress.report.text import (
    NA,
    as_dict,
    as_list,
    box_f1,
    code,
    fidelity_metric,
    fmt_cos,
    fmt_count,
    fmt_fidelity,
    fmt_mb,
    fmt_ms,
    fmt_pct,
    fmt_speedup,
    fmt_stage_seconds,
    model_name,
    num,
    per_token_rows,
    table,
    variant_label,
    variants_of,
)

SCHEMA_PREFIX = "edge-compress/report/"


# --- validation -------------------------------------------------------------------------------------------


def validate_report(obj: Any, source: Optional[str] = None) -> None:
    """Raise InputError (one line) unless `obj` looks like an edge-compress run report.

    Checks only what every renderer relies on: a JSON object whose "schema" is this version's and whose
    "variants" is a list of objects. `source` (a file name) is named in the message when given.
    """
    where = f"{source}: " if source else ""
    if not isinstance(obj, dict):
        raise InputError(f"{where}not an edge-compress report (expected a JSON object, found {_json_type(obj)})")
    schema = obj.get("schema")
    if schema is None:
        raise InputError(f'{where}not an edge-compress report (no "schema" field; expected "{SCHEMA}", '
                         "as `compress run` writes in OUTDIR/report.json)")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        raise InputError(f'{where}not an edge-compress report (schema {_short(schema)}, expected "{SCHEMA}")')
    if schema != SCHEMA:
        raise InputError(f'{where}report schema "{_short(schema, 60)}" is not supported by this version '
                         f'(it reads "{SCHEMA}"); use the edge-compress version that wrote it')
    variants = obj.get("variants")
    if not isinstance(variants, list):
        what = "no" if variants is None else f'a non-list ({_json_type(variants)})'
        raise InputError(f'{where}not a complete edge-compress report ({what} "variants" field)')
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            raise InputError(f'{where}variants[{i}] is {_json_type(v)}, expected an object')


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _short(v: Any, limit: int = 40) -> str:
    s = repr(v) if not isinstance(v, str) else f'"{v}"'
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --- the report -------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any], plot: Optional[str] = None) -> str:
    """The run report as Markdown: recommendation first, then the variants, layers kept in float, the stages,
    how the speedup was measured, and the command. `plot` (a path relative to where the Markdown will live)
    embeds the trade-off PNG under the table.
    """
    r = report if isinstance(report, dict) else {}
    variants = variants_of(r)
    dev, host = as_dict(r.get("device")), as_dict(r.get("host"))
    model = model_name(r)
    title = "edge-compress report"
    if model:
        title += f": {model}"
    if dev.get("name"):
        title += f" on {dev['name']}"
    lines = [f"# {title}", ""]
    lines += _device_lines(dev, host, variants)
    lines.append("")
    rec = r.get("recommended")
    reason = r.get("reason")
    if rec:
        lines.append(f"> **Recommended: {code(rec)}**" + (f" — {reason}" if reason else ""))
    else:
        lines.append("> **No recommendation in this report.**" + (f" {reason}" if reason else ""))
    lines.append("")
    lines += _warnings(r, variants)
    lines += _variants_section(r, variants, plot)
    lines += _excluded_section(variants)
    lines += _stages_section(r, variants)
    lines += _data_section(r)
    lines += _model_section(r)
    lines += _measure_section(r, variants)
    cmd = r.get("command")
    if isinstance(cmd, str) and cmd.strip():
        fence = "```"
        while fence in cmd:
            fence += "`"
        lines += ["## Command", "", f"{fence}sh", cmd.strip(), fence, ""]

    lines.append(f"<sub>edge-compress {__version__} · {r.get('schema', SCHEMA)}</sub>")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_markdown(report: dict[str, Any], path: str | os.PathLike, plot: Optional[str] = None) -> None:
    """render_markdown written atomically to `path` (the pipeline's OUTDIR/report.md)."""
    text = render_markdown(report, plot=plot)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _device_lines(dev: dict[str, Any], host: dict[str, Any], variants: list[dict[str, Any]]) -> list[str]:
    out = []
    if dev:
        bits = [code(dev.get("name") or "?")]
        if dev.get("description"):
            bits.append(str(dev["description"]))
        facts = [str(dev[k]) for k in ("arch",) if dev.get(k)]
        if num(dev.get("threads")) is not None:
            facts.append(f"{dev['threads']} threads")
        eps = [e.get("name") if isinstance(e, dict) else str(e) for e in as_list(dev.get("execution_providers"))]
        if any(eps):
            facts.append(", ".join(str(e) for e in eps if e))
        if dev.get("opset") is not None:
            facts.append(f"opset {dev['opset']}")
        if dev.get("fp8") is not None:
            facts.append("FP8 hardware" if dev["fp8"] else "no FP8 hardware")
        line = f"**Device:** {bits[0]}" + (f" ({', '.join(facts)})" if facts else "") + (f" — {bits[1]}" if len(bits) > 1 else "")
        out.append(line + "  ")  # two spaces: a Markdown line break
    if host:
        cpu = host.get("cpu") or host.get("arch") or "unknown CPU"
        hw = [str(host[k]) for k in ("arch",) if host.get(k) and host.get(k) != cpu]
        if host.get("cores") is not None:
            hw.append(f"{host['cores']} cores")
        sw = [str(host["os"])] if host.get("os") else []
        if host.get("python"):
            sw.append(f"Python {host['python']}")
        if host.get("onnxruntime"):
            sw.append(f"onnxruntime {host['onnxruntime']}")
        via = f" — remote, {host['remote']} over SSH" if host.get("remote") else ""
        out.append(f"**Measured on:** {cpu}" + (f" ({', '.join(hw)})" if hw else "") + (f"; {', '.join(sw)}" if sw else "") + via)
    if not out:
        out.append("**Device:** n/a")
    return out


def _warnings(r: dict[str, Any], variants: list[dict[str, Any]]) -> list[str]:
    """Things that change what a reader should trust, shown before any figure."""
    warns = []
    fallback = [variant_label(v, i) for i, v in enumerate(variants) if as_dict(v.get("profile")).get("fallback")]
    if fallback:
        warns.append(f"Timed on a **CPU fallback** ({', '.join(fallback)}): this onnxruntime lacks the device's "
                     "execution provider, so these latencies are not the device's.")
    calib = as_dict(r.get("calibration"))
    if calib.get("source") in ("random", "synthetic"):
        warns.append(f"Fidelity was measured on {calib['source']} inputs (no `--calib`): agreement on real data "
                     "may differ; rerun with `--calib DATA.npz`.")
    q = as_dict(as_dict(r.get("stages")).get("quantize"))
    if as_dict(q.get("calibration")).get("source") == "synthetic" and calib.get("source") not in ("random", "synthetic"):
        warns.append("Quantization scales came from synthetic inputs: pass `--calib DATA.npz` with real samples.")
    w = as_dict(as_dict(q.get("quantizer")).get("presets")).get("warning")
    if w:
        warns.append(str(w))
    return [f"> ⚠️ {w}" for w in warns] + ([""] if warns else [])


def _variants_section(r: dict[str, Any], variants: list[dict[str, Any]], plot: Optional[str]) -> list[str]:
    tol = num(r.get("tolerance"))
    metric = fidelity_metric(r)
    out = ["## Variants", ""]
    if not variants:
        return out + ["No variants in this report.", ""]
    scored = any(num(v.get("accuracy")) is not None for v in variants)
    tuned = as_dict(as_dict(r.get("threads_tuning")).get("chosen"))
    header = ["variant", "p50 ms", "p90 ms", "speedup vs fp32"] + (["threads"] if tuned else []) + [
              "size MB", "params", "MACs", "fidelity vs fp32"] + (["accuracy (--eval)"] if scored else []) + [
              "within tolerance" + (f" ({tol:g})" if tol is not None else "")]
    rows = []
    for i, v in enumerate(variants):
        name = variant_label(v, i)
        cell = f"**{name}** ★" if name == r.get("recommended") else name
        if v.get("from") and v.get("from") != name:
            cell += f" (from {v['from']})"
        simulated = bool(v.get("simulated"))
        if simulated:
            cell += " *(simulated)*"
        lat = as_dict(v.get("latency_ms"))
        if simulated and not lat:
            p50 = p90 = "— (simulated)"
        else:
            p50, p90 = fmt_ms(lat.get("p50")), fmt_ms(lat.get("p90"))
        speed = fmt_speedup(v.get("speedup_vs_fp32"))
        if name == "fp32" and speed != NA:
            speed += " (baseline)"
        elif simulated and speed == NA:
            speed = "— (simulated)"
        fid = "reference" if name == "fp32" else fmt_fidelity(v.get("fidelity"), metric)
        ok = v.get("within_tolerance")
        okc = "✓" if ok is True else "✗" if ok is False else NA
        if simulated and ok is not None:
            okc += " (fidelity only)"
        acc = [f"{num(v.get('accuracy')):.4g}" if num(v.get("accuracy")) is not None else NA] if scored else []
        threads = [str(tuned.get(v.get("name"), NA))] if tuned else []
        rows.append([cell, p50, p90, speed, *threads, fmt_mb(v.get("size_bytes")), fmt_count(v.get("params")),
                     fmt_count(v.get("macs")), fid, *acc, okc])
    out += table(header, rows, ["l", "r", "r", "r"] + (["r"] if tuned else []) + ["r", "r", "r", "r"]
                 + (["r"] if scored else []) + ["c"])
    out.append("")
    tok_header, tok_rows = per_token_rows(r)
    if tok_rows:  # --generate: p50/p90 and speedup above are the decode step's
        out += ["Per token (each variant exported with its KV cache; the table above times the decode step):", ""]
        out += table(tok_header, tok_rows, ["l"] + ["r"] * (len(tok_header) - 1)) + [""]
    notes = ["★ recommended."]
    if metric == "boxes":
        notes.append("Fidelity: the F1 of the boxes each model keeps after NMS, matched to fp32's (same class, IoU "
                     "≥ 0.5) on held-out inputs.")
    elif metric == "next_token_agreement":
        ref = next((num(as_dict(v.get("fidelity")).get("reference_perplexity")) for v in variants_of(r)), None)
        notes.append("Fidelity: the share of held-out positions whose next token (arg-max) is fp32's; ppl: the "
                     "perplexity on the held-out tokens" + (f" (the PyTorch model's: {ref:.4g})" if ref else "")
                     + ", and its relative increase over that where the tokens are your text (--calib).")
    elif metric == "top1_agreement":
        notes.append("Fidelity: top-1 agreement with fp32 on held-out inputs.")
    else:
        notes.append("Fidelity: the worst per-sample cosine similarity to fp32's outputs on held-out inputs.")
    if tol is not None and r.get("eval"):
        notes.append(f"Within tolerance: the --eval score ({r['eval']}) is at most {tol:g} below fp32's.")
    elif tol is not None:
        notes.append(f"Within tolerance: loss vs fp32 ≤ {tol:g} (1 − matched-box F1 for detectors; with --generate "
                     "the relative perplexity increase on your text, or 1 − next-token agreement on random tokens; "
                     "1 − top-1 agreement for classifiers; else 1 − min cosine).")
    if any(v.get("simulated") for v in variants):
        notes.append("Simulated variants have no hardware here: fidelity only, no latency, never recommended.")
    out += [" ".join(notes), ""]
    if plot:
        out += [f"![p50 latency vs fidelity or accuracy, with the Pareto front]({plot})", ""]
    return out


FLOAT_KEPT = ("Two reasons keep a layer in float. Sensitivity: each quantizable layer was quantized alone and ranked by "
              "how far it moved the output, and the fewest most sensitive ones were left in float until the model met "
              "the tolerance. Speed: each quantized op was timed alone in fp32 and INT8 on the device, and ops INT8 "
              "does not speed up were left in float when that made the whole model faster.")
ABOVE_4_BITS = ("Weight-only INT4 starts with every MatMul weight at 4 bits; each layer's salience is the output error "
                "when it alone is 4-bit, and the layers with the most error per extra byte went 8-bit, then float "
                "(32), until the size budget was spent.")


def _excluded_section(variants: list[dict[str, Any]]) -> list[str]:
    """Per variant, the layers not at its format: kept in float (INT8/FP8), or above 4 bits (INT4, which has a bits
    column)."""
    out: list[str] = []
    for int4 in (False, True):
        part: list[str] = []
        for i, v in enumerate(variants):
            layers = [e for e in as_list(v.get("excluded_layers")) if e is not None]
            if not layers or any(isinstance(e, dict) and "bits" in e for e in layers) != int4:
                continue
            if not part:
                part += ["## INT4 layers above 4 bits" if int4 else "## Layers kept in float", "",
                         ABOVE_4_BITS if int4 else FLOAT_KEPT, ""]
            part += [f"**{variant_label(v, i)}**: {len(layers)} layer{'s' if len(layers) != 1 else ''}", ""]
            rows = []
            for e in layers:
                if isinstance(e, dict):
                    why = e.get("why") or (f"salience {num(e.get('salience')):.4g}" if num(e.get("salience")) is not None else NA)
                    rows.append([code(e.get("node") or "?"), e.get("op_type") or NA]
                                + ([str(e.get("bits", NA))] if int4 else []) + [why])
                else:
                    rows.append([code(e), NA, NA])
            part += table(["layer", "op"] + (["bits"] if int4 else []) + ["why"], rows) + [""]
        out += part
    return out


def _stages_section(r: dict[str, Any], variants: list[dict[str, Any]]) -> list[str]:
    stages = as_dict(r.get("stages"))
    out: list[str] = []
    if stages.get("prune") is not None:
        out += ["### Prune", ""] + _prune_lines(as_dict(stages["prune"])) + [""]
    if stages.get("quantize_unpruned") is not None:
        out += ["### Quantize the unpruned model (the back-off)", ""]
        out += _quant_lines(as_dict(stages["quantize_unpruned"]), variants, "-unpruned") + [""]
    if stages.get("quantize") is not None:
        out += ["### Quantize", ""] + _quant_lines(as_dict(stages["quantize"]), variants) + [""]
    for name, st in stages.items():  # stages added later render as their raw keys rather than vanish
        if name not in ("prune", "quantize", "quantize_unpruned") and st is not None:
            out += [f"### {str(name).capitalize()}", ""] + _generic_lines(st) + [""]
    return (["## Stages", ""] + out) if out else []


def _fid_pair(f: Any) -> str:
    f = as_dict(f)
    parts = []
    if box_f1(f) is not None:
        parts.append(f"boxes F1 {fmt_pct(box_f1(f))}")
    if num(f.get("top1_agreement")) is not None:
        parts.append(f"top-1 {fmt_pct(f['top1_agreement'])}")
    if num(f.get("cosine_min")) is not None:
        parts.append(f"cos min {fmt_cos(f['cosine_min'])}")
    return ", ".join(parts) or NA


def _ms(x: Any) -> str:
    v = num(x)
    return NA if v is None else f"{fmt_ms(v)} ms"


def _ratio(before: Any, after: Any) -> str:
    b, a = num(before), num(after)
    return f" ({b / a:.2f}× fewer)" if b and a else ""


def _prune_lines(p: dict[str, Any]) -> list[str]:
    out = _auto_lines(as_dict(p.get("auto")))
    s = as_dict(p.get("structural"))
    if s:
        how = []
        if s.get("importance"):
            how.append(f"{code(s['importance'])} importance")
        how.append("global" if s.get("global_pruning") else "per layer")
        if s.get("round_to"):
            how.append(f"channels rounded to multiples of {s['round_to']}")
        ratio = num(s.get("ratio"))
        head = f"{ratio:.0%} of channels" if ratio is not None else "channels"
        out.append(f"- **Structural:** {head} ({', '.join(how)}): params {fmt_count(s.get('params_before'))} → "
                   f"{fmt_count(s.get('params_after'))}{_ratio(s.get('params_before'), s.get('params_after'))}, "
                   f"MACs {fmt_count(s.get('macs_before'))} → {fmt_count(s.get('macs_after'))}"
                   f"{_ratio(s.get('macs_before'), s.get('macs_after'))}; {len(as_list(s.get('layers')))} layers changed")
        alloc = as_dict(s.get("allocation"))
        if alloc:
            ratios = ", ".join(f"{code(k)} {num(v):.0%}" for k, v in as_dict(alloc.get("ratios")).items() if num(v) is not None)
            after = f" after {alloc['probe_recovery_steps']} recovery steps" if alloc.get("probe_recovery_steps") else ""
            out.append(f"- **Where to cut** (measured: each block's output loss when cut alone{after}, and its latency, "
                       f"{alloc.get('timed_on', NA)}): {ratios}; saves {_ms(alloc.get('ms_saved'))} of "
                       f"{_ms(alloc.get('baseline_ms'))}, the uniform cut {_ms(alloc.get('target_ms_saved'))} "
                       f"({alloc.get('seconds', NA)} s)")
        heads = as_dict(s.get("heads"))
        if heads:
            hs = ", ".join(f"{code(k)} {v[0]} → {v[1]}" if isinstance(v, list) and len(v) == 2 else f"{code(k)} {v}"
                           for k, v in heads.items())
            out.append(f"- **Attention heads:** {hs}")
        kept = [*(as_list(s.get("protected"))), *(as_list(s.get("ignored")))]
        if kept:
            out.append(f"- **Left at full width:** {', '.join(code(k) for k in kept)}")
        for n in as_list(s.get("notes")):
            out.append(f"- Note: {n}")
    sp = as_dict(p.get("sparsity"))
    if sp:
        ach = num(sp.get("sparsity"))
        out.append(f"- **Sparsity:** {sp.get('pattern', NA)} masks, target {fmt_pct(sp.get('ratio'))}"
                   + (f", achieved {ach:.1%}" if ach is not None else "")
                   + f" over {fmt_count(sp.get('covered_params'))} params in {len(as_list(sp.get('layers')))} layers"
                   + (f" ({len(as_list(sp.get('skipped')))} skipped)" if as_list(sp.get("skipped")) else ""))
        if sp.get("note"):
            out.append(f"  {sp['note']}")
    rec = p.get("recovery")
    if "recovery" in p or "structural" in p:
        out.append(f"- **Recovery:** {_recovery_text(rec)}")
    if p.get("fidelity") is not None:
        before = p.get("fidelity_before_recovery")
        txt = f"{_fid_pair(before)} → {_fid_pair(p['fidelity'])}" if before is not None and rec else _fid_pair(p["fidelity"])
        out.append(f"- **Fidelity vs fp32 (torch, held-out):** {txt}")
    if s and as_list(s.get("layers")):
        rows = []
        for layer in as_list(s.get("layers")):
            layer = as_dict(layer)
            rows.append([code(layer.get("name", "?")), layer.get("kind", NA), _shape(layer.get("before")),
                         _shape(layer.get("after"))])
        out += ["", "<details><summary>Pruned layers</summary>", ""]
        out += table(["layer", "kind", "before", "after"], rows)
        out += ["", "</details>"]
    return out or ["No details recorded."]


def _shape(v: Any) -> str:
    return " × ".join(str(x) for x in v) if isinstance(v, list) else (NA if v is None else str(v))


def _auto_lines(auto: dict[str, Any]) -> list[str]:
    """--prune auto: each probe's ratio and fidelity loss, and the pick."""
    if not auto:
        return []
    probes = [as_dict(x) for x in as_list(auto.get("probes"))]
    steps = ", ".join(f"{num(x.get('ratio')) or 0:.0%} " + (f"loss {x['loss']:.3g}" if num(x.get("loss")) is not None
                                                          else "not finite") + (" ✓" if x.get("within") else " ✗")
                      for x in probes)
    chosen = num(auto.get("chosen"))
    pick = f"kept {chosen:.0%}" if chosen is not None else "no probe fit, the smallest is shown"
    return [f"- **`--prune auto`** (fidelity loss ≤ {auto.get('tolerance')} on held-out inputs, up to "
            f"{num(auto.get('max_ratio')) or 0:.0%}): probes {steps}; {pick}"]


def _recovery_text(rec: Any) -> str:
    rec = as_dict(rec)
    if not rec:
        return "none (`--no-recover`)"
    if rec.get("method") == "finetune":
        return f"user fine-tuning {code(rec.get('fn', '?'))}"
    if rec.get("method") == "distillation":
        txt = f"distillation from the unpruned model, {rec.get('steps', NA)} steps"
        if num(rec.get("seconds")) is not None:
            txt += f" in {rec['seconds']:.1f} s"
        lb, la = num(rec.get("loss_before")), num(rec.get("loss_after"))
        if lb is not None and la is not None:
            txt += f", calibration loss {lb:.4g} → {la:.4g}"
        if rec.get("restored"):
            txt += " (did not help: the pre-recovery weights were kept)"
        if rec.get("augmented"):
            txt += "; on augmented views of the calibration samples"
        if rec.get("stopped"):
            txt += f"; stopped: {rec['stopped']}"
        ann = rec.get("annealed_from")
        if isinstance(ann, dict):
            txt += f" (no better on validation from step {ann.get('step', NA)}, {ann.get('seconds', NA)} s: the rate's decay ran out first)"
        curve = [c for c in as_list(rec.get("curve")) if isinstance(c, list) and len(c) == 3]
        if curve:
            txt += f"\n- **Recovery curve** (on {rec.get('validation_samples', NA)} validation samples it did not train on): "
            txt += _curve_text(curve)
        return txt
    return ", ".join(f"{k} {v}" for k, v in rec.items())


def _curve_text(curve: list[list[Any]], points: int = 6) -> str:
    """A handful of evenly spaced (seconds, loss, top-1 agreement) points, first and last included."""
    idx = sorted({round(i * (len(curve) - 1) / max(1, points - 1)) for i in range(points)})
    parts = []
    for i in idx:
        t, loss, agree = curve[i]
        parts.append(f"{t:.0f} s: loss {loss:.3g}" + (f", top-1 {fmt_pct(agree)}" if num(agree) is not None else ""))
    return " → ".join(parts)


def _quant_lines(q: dict[str, Any], variants: list[dict[str, Any]], suffix: str = "") -> list[str]:
    out = []
    qz = as_dict(q.get("quantizer"))
    fmt = str(q.get("format") or "?")
    preset = as_dict(q.get("preset")) or as_dict(qz.get("preset"))
    base = next((v.get("from") for v in variants if v.get("name") == fmt + suffix and v.get("from")), None)
    details = [fmt.upper()]
    if preset.get("name"):
        details.append(f"preset {code(preset['name'])}")
    if qz.get("fp8_format"):
        details.append(str(qz["fp8_format"]))
    if qz.get("activations"):
        details.append(str(qz["activations"]))
    elif qz.get("method"):
        details.append(f"{qz['method']} calibration")
    if q.get("simulated"):
        details.append("**simulated** (no FP8 hardware on this device)")
    if base:
        details.append(f"applied to {code(base)}")
    out.append("- **Format:** " + " · ".join(details))
    calib = as_dict(q.get("calibration"))
    if calib:
        src = calib.get("source", NA)
        n = calib.get("calibration_samples") or calib.get("samples") or as_dict(qz.get("calibration")).get("samples")
        out.append(f"- **Calibration:** {src}" + (f", {n} samples" if n else "")
                   + (" — scales fit synthetic inputs, not your data" if src == "synthetic" else ""))
        tried = as_list(calib.get("tried"))
        if len(tried) > 1:
            out.append("- **Calibration method:** " + ", ".join(
                f"{code(t.get('method'))} " + (f"failed ({t['failed']})" if t.get("failed") else
                                               f"error {num(t.get('error')) or 0:.4g}") for t in tried)
                       + f" (tolerance {num(as_dict(q.get('fallback')).get('tolerance')) or 0:g}); kept {code(calib.get('method'))}")
    presets = as_dict(qz.get("presets"))
    if presets.get("tried"):
        out.append(f"- **Preset choice:** tried {', '.join(code(t) for t in as_list(presets['tried']))}; chose "
                   f"{code(presets.get('chosen', '?'))}" + (f": {presets['why']}" if presets.get("why") else ""))
    graph = as_dict(qz.get("graph"))
    if graph.get("variant"):
        out.append(f"- **Graph:** {code(graph['variant'])}" + (" (chosen by timing the candidates)" if graph.get("tuned") else ""))
    if fmt == "int4" and as_dict(qz.get("counts")):
        c, budget = as_dict(qz["counts"]), as_dict(qz.get("budget"))
        limit = (f"`--budget-mb {budget['mb']:g}`" if budget.get("mb") is not None else
                 f"`--avg-bits {budget['avg_bits']:g}`" if budget.get("avg_bits") is not None else "none (all 4-bit)")
        out.append(f"- **Weight-only INT4:** block {qz.get('block_size', NA)}, budget {limit}; {c.get('int4', 0)} layers "
                   f"4-bit, {c.get('int8', 0)} 8-bit, {c.get('float', 0)} float; {num(q.get('avg_bits')) or 0:.2f} bits "
                   f"per weight ({num(q.get('stored_bits')) or 0:.2f} stored with scales), "
                   f"{num(q.get('size_mb')) or 0:.2f} MB against {num(q.get('fp32_size_mb')) or 0:.2f} MB in fp32"
                   + (f"; salience {qz['salience_from']}" if qz.get("salience_from") else ""))
    if as_list(qz.get("quantized")):
        out.append(f"- **Quantized nodes:** {len(qz['quantized'])}"
                   + (f"; skipped {len(as_list(qz.get('skipped')))}" if as_list(qz.get("skipped")) else ""))
    sel = as_dict(q.get("op_selection"))
    if sel.get("decision"):
        timed = len(as_list(sel.get("ops")))
        out.append(f"- **Op selection** ({timed} op{'s' if timed != 1 else ''} timed alone in fp32 and INT8"
                   + (f" on {sel['measured_on']}" if sel.get("measured_on") else "") + f"): {sel['decision']}"
                   + (f" — {sel['warning']}" if sel.get("warning") else ""))
    fid = q.get("fidelity")
    if fid is not None:
        n = as_dict(fid).get("samples")
        out.append(f"- **Fidelity vs {code(base) if base else 'its input model'}:** {_fid_pair(fid)}"
                   + (f" ({n} held-out samples)" if n else ""))
    fb = as_dict(q.get("fallback"))
    if fb:
        metric = {"top1": "top-1 error", "next_token": "next-token error", "perplexity": "perplexity increase", "cosine_min": "1 − min cosine"}.get(fb.get("metric"), fb.get("metric", "error"))
        eb, ea = num(fb.get("error_before")), num(fb.get("error"))
        txt = f"- **Fallback** (tolerance {fb.get('tolerance', NA)} on {metric}): "
        txt += f"error {eb:.4g} with every layer quantized" if eb is not None else "error n/a with every layer quantized"
        excl = as_list(fb.get("excluded")) or as_list(q.get("excluded_layers"))
        if "within_tolerance" not in fb:
            txt += ", within tolerance: nothing kept in float"
        elif fb.get("skipped"):
            txt += f"; not searched: {fb['skipped']}"
        elif fb.get("within_tolerance"):
            txt += f"; {len(excl)} layer{'s' if len(excl) != 1 else ''} kept in float" + (f" → error {ea:.4g}" if ea is not None else "")
            if fb.get("ranked_by"):
                txt += f" (chosen by {fb['ranked_by']})"
            total = _quantizable_count(qz, excl)
            if total and len(excl) >= total:
                txt += (f". **All {total} quantizable layers are in float: this variant is not quantized in effect**; "
                        "a looser `--tolerance` or real `--calib` data may let some layers be quantized")
        elif fb.get("max_excluded") is not None:
            txt += (f"; stopped at {fb['max_excluded']} layer(s) in float" + (f" (error {ea:.4g})" if ea is not None else "")
                    + ": keeping more would leave the model no faster than its input, so the fully quantized model "
                    "was kept")
        else:
            txt += "; keeping layers in float did not reach the tolerance, so the fully quantized model was kept"
        out.append(txt)
    if num(q.get("speedup_vs_fp32")) is not None:
        out.append(f"- **Stage speedup vs its input:** {fmt_speedup(q['speedup_vs_fp32'])}")
    steps = fmt_stage_seconds(q.get("step_seconds"))
    if steps:
        out.append(f"- **Where its time went:** {steps}")
    return out or ["No details recorded."]


def _quantizable_count(qz: dict[str, Any], excluded: list[Any]) -> Optional[int]:
    """How many layers the quantizer could have quantized: its own list (FP8), else the sensitivity ranking's
    "rank k of N" in the fallback's explanations (INT8)."""
    if as_list(qz.get("quantized")):
        return len(qz["quantized"])
    import re

    for e in excluded:
        m = re.search(r"rank \d+ of (\d+)", str(as_dict(e).get("why", "")))
        if m:
            return int(m.group(1))
    return None


def _generic_lines(st: Any) -> list[str]:
    if not isinstance(st, dict):
        return [f"- {st}"]
    out = []
    for k, v in st.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out.append(f"- **{k}:** {v}")
    return out or ["No details recorded."]


def _data_section(r: dict[str, Any]) -> list[str]:
    """How --calib/--eval data that was not an .npz became inputs (compress.data): the source, the samples read,
    and where each pre-processing setting came from."""
    read = as_dict(as_dict(r.get("calibration")).get("data"))
    out: list[str] = []
    for flag in ("calib", "eval"):
        d = as_dict(read.get(flag))
        if not d:
            continue
        n = d.get("samples")
        out.append(f"- **--{flag}** {code(d.get('source', NA))} ({d.get('kind', NA)}"
                   + (f", {n} samples read" if n is not None else "") + ")"
                   + "".join(f"; {note}" for note in as_list(d.get("notes"))))
    return (["## Data", ""] + out + [""]) if out else []


def _model_section(r: dict[str, Any]) -> list[str]:
    """What loading changed in the user's model before anything was built from it (a decoder's KV cache)."""
    notes = as_list(r.get("model_notes"))
    return (["## Model as loaded", ""] + [f"- {n}" for n in notes] + [""]) if notes else []


def _threads_lines(tuning: dict[str, Any]) -> list[str]:
    """The thread counts each variant was timed at, and the one it is reported (and recommended) with."""
    counts, chosen, ms = as_list(tuning.get("candidates")), as_dict(tuning.get("chosen")), as_dict(tuning.get("ms"))
    if not counts or not chosen:
        return []
    rows = []
    for name, best in chosen.items():
        by = as_dict(ms.get(name))
        cells = [(f"**{fmt_ms(by.get(str(t)))}**" if t == best else fmt_ms(by.get(str(t)))) for t in counts]
        rows.append([code(name), *cells, str(best)])
    return ["", f"Each variant was timed at {', '.join(map(str, counts))} intra-op threads "
                f"({tuning.get('measure', 'milliseconds')}) and is reported at its fastest (the fewest threads within "
                f"{fmt_pct(tuning.get('tie'))} of it): deploy it with that `intra_op_num_threads`.", "",
            *table(["variant", *(f"{t} thr ms" for t in counts), "chosen"], rows, ["l", *("r" for _ in counts), "r"])]


def _measure_section(r: dict[str, Any], variants: list[dict[str, Any]]) -> list[str]:
    out = ["## How the speedup was measured", ""]
    how = r.get("speedup_measure")
    out.append(f"Speedup vs fp32: {how}." if how else "Speedup vs fp32: not recorded.")
    if as_dict(r.get("remote")):
        out.append("The variants were profiled one after another on the remote device over SSH; the speedup is the "
                   "ratio of their p50s and is what the recommendation uses. Not interleaved, so a device whose speed "
                   "changed between two profiles (throttling, other load) shifts the ratio.")
    else:
        out.append("Every round runs each variant once in turn, so all of them see the same machine state; the "
                   "speedup is the ratio of medians and is what the recommendation uses. The p50/p90 columns come "
                   "from profiling each variant on its own, so their ratio can differ on a noisy machine.")
    runs, loose = [], []
    for i, v in enumerate(variants):
        prof = as_dict(v.get("profile"))
        if not prof:
            continue
        if prof.get("runs") is not None:
            runs.append(f"{variant_label(v, i)} {prof['runs']}")
        if as_dict(prof.get("spread")).get("converged") is False:
            loose.append(variant_label(v, i))
    if runs:
        out.append(f"Profiled runs per variant: {', '.join(runs)}.")
    out += _threads_lines(as_dict(r.get("threads_tuning")))
    spent = fmt_stage_seconds(r.get("stage_seconds"))
    if spent:
        total = sum(v for v in map(num, as_dict(r.get("stage_seconds")).values()) if v is not None)
        out += ["", f"Wall-clock per stage: {spent} (total {total:.1f} s)."]
    if loose:
        out.append(f"The p50's 95% confidence interval did not converge for {', '.join(loose)}: read those p50s as "
                   "rough (omit `--runs` for adaptive timing).")
    return out + [""]
