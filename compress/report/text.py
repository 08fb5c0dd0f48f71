"""Small formatters of report values, shared by the Markdown and HTML reports, the plot, and the search and
sweep reports: every value may be missing or of the wrong type in a hand-edited report.json, and each of these
prints n/a for it instead of failing."""

from __future__ import annotations

import functools
import math
import shlex
from typing import Any, Callable, Iterable, Optional

NA = "n/a"


def num(v: Any) -> Optional[float]:
    """A finite float, or None for anything else (null, strings, NaN, booleans)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _or_na(fmt: Callable[[float], str]) -> Callable[[Any], str]:
    """A formatter of finite numbers that prints n/a for anything else (null, strings, NaN, booleans)."""
    @functools.wraps(fmt)
    def text(v: Any) -> str:
        x = num(v)
        return NA if x is None else fmt(x)

    return text


@_or_na
def fmt_ms(x: float) -> str:
    """Milliseconds to three significant-ish digits: 0.176, 12.35, 250.4."""
    if x < 1:
        return f"{x:.3f}"
    if x < 100:
        return f"{x:.2f}"
    return f"{x:.1f}"


def fmt_stage_seconds(seconds: Any) -> str:
    """report.json's stage_seconds as one line, in run order: "export 2.8 s, prune 78.7 s, ..."; "" when absent."""
    spent = {k: num(v) for k, v in as_dict(seconds).items() if num(v) is not None}
    return ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in spent.items())


@_or_na
def fmt_count(x: float) -> str:
    """Parameters and MACs: 950, 78.6K, 11.69M, 1.82G."""
    for div, unit, digits in ((1e9, "G", 2), (1e6, "M", 2), (1e3, "K", 1)):
        if abs(x) >= div:
            return f"{x / div:.{digits}f}{unit}"
    return f"{x:.0f}"


@_or_na
def fmt_mb(x: float) -> str:
    """Bytes as MB (10^6, as `compress run` prints them)."""
    mb = x / 1e6
    return f"{mb:.2f}" if mb < 10 else f"{mb:.1f}"


@_or_na
def fmt_speedup(x: float) -> str:
    return f"{x:.2f}×"


@_or_na
def fmt_pct(x: float) -> str:
    return f"{x:.1%}"


@_or_na
def fmt_cos(x: float) -> str:
    return f"{x:.4f}" if x < 0.999 else f"{x:.6f}"  # near 1 the interesting digits are further right


def fidelity_metric(report: dict[str, Any]) -> str:
    """'boxes' when every variant that has fidelity reports matched boxes of a reference that keeps some (a
    detector), 'next_token_agreement' when every one reports it (a decoder judged as it generates),
    'top1_agreement' when every one reports it (a classifier), else 'cosine_min'.

    The same rule as compress.pipeline.run.within_tolerance, applied to the whole report so that one column
    (and one plot axis) compares like with like.
    """
    fids = [as_dict(v.get("fidelity")) for v in variants_of(report)]
    fids = [f for f in fids if f]
    if fids and all(box_f1(f) is not None for f in fids):
        return "boxes"
    if fids and all(num(f.get("next_token_agreement")) is not None for f in fids):
        return "next_token_agreement"
    if fids and all(num(f.get("top1_agreement")) is not None for f in fids):
        return "top1_agreement"
    return "cosine_min"


def box_f1(fid: Any) -> Optional[float]:
    """The F1 of matched boxes (compress.evaluate.detection) where the reference kept boxes to match, else None."""
    boxes = as_dict(as_dict(fid).get("boxes"))
    return num(boxes.get("f1")) if boxes.get("reference_boxes") else None


def fmt_fidelity(fid: Any, metric: str) -> str:
    f = as_dict(fid)
    if metric == "boxes" and box_f1(f) is not None:
        return f"boxes F1 {fmt_pct(box_f1(f))}"
    if metric == "next_token_agreement" and num(f.get("next_token_agreement")) is not None:
        ppl, up = num(f.get("perplexity")), num(f.get("perplexity_increase"))
        return (f"next token {fmt_pct(f['next_token_agreement'])}" + (f", ppl {ppl:.4g}" if ppl is not None else "")
                + (f" ({up:+.1%})" if up is not None else ""))
    if metric == "top1_agreement" and num(f.get("top1_agreement")) is not None:
        return f"top-1 {fmt_pct(f['top1_agreement'])}"
    if num(f.get("cosine_min")) is not None:
        return f"cos min {fmt_cos(f['cosine_min'])}"
    if num(f.get("top1_agreement")) is not None:
        return f"top-1 {fmt_pct(f['top1_agreement'])}"
    return NA


def variants_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in as_list(report.get("variants")) if isinstance(v, dict)]


def variant_label(v: dict[str, Any], i: int = 0) -> str:
    name = v.get("name")
    return str(name) if name not in (None, "") else f"variant {i + 1}"


def model_name(report: dict[str, Any]) -> Optional[str]:
    """The MODEL argument: a "model"/"source" field when the report has one, else read off the command line."""
    for key in ("model", "source"):
        if isinstance(report.get(key), str) and report[key]:
            return report[key]
    cmd = report.get("command")
    if not isinstance(cmd, str):
        return None
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if "run" in words:
        rest = words[words.index("run") + 1:]
        if rest and not rest[0].startswith("-"):  # the documented order: `compress run MODEL [options]`
            return rest[0]
    return None


# --- Markdown helpers -------------------------------------------------------------------------------------


def cell(v: Any) -> str:
    """Table cell text: pipes escaped, newlines folded."""
    return " ".join(str(v).split()).replace("|", "\\|")


def code(v: Any) -> str:
    s = str(v)
    fence = "``" if "`" in s else "`"
    return f"{fence}{s}{fence}" if fence == "`" else f"{fence} {s} {fence}"


def table(header: list[str], rows: Iterable[list[Any]], align: Optional[list[str]] = None) -> list[str]:
    align = align or ["l"] * len(header)
    sep = {"l": "---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(sep[a] for a in align) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def per_token_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """`compress run --generate`: each timed variant's prefill and per-token decode figures and the peak memory of
    the process that timed both (header, rows); no rows for a run that did not time generation."""
    rows, header = [], []
    for i, v in enumerate(variants_of(report)):
        g = as_dict(as_dict(v.get("profile")).get("generation"))
        if not g:
            continue
        pre, dec = as_dict(as_dict(g.get("prefill")).get("latency_ms")), as_dict(as_dict(g.get("decode")).get("latency_ms"))
        header = ["variant", f"prefill p50 ({g.get('prompt_len')} tokens)", "prefill p90",
                  f"decode p50 per token (after {g.get('context_len')})", "decode p90", "tokens/s", "peak RSS MB"]
        tps, rss = num(g.get("tokens_per_s")), num(as_dict(v.get("profile")).get("peak_rss_mb"))
        rows.append([variant_label(v, i), fmt_ms(num(pre.get("p50"))), fmt_ms(num(pre.get("p90"))),
                     fmt_ms(num(dec.get("p50"))), fmt_ms(num(dec.get("p90"))), "n/a" if tps is None else f"{tps:,.0f}",
                     "n/a" if rss is None else f"{rss:,.0f}"])
    return header, rows
