"""The trade-off plot of a `compress run` report: p50 latency against fidelity (or --eval accuracy), one point
per variant, with the Pareto front.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch), imported only
when a plot is asked for, and written atomically: a failed plot leaves the previous PNG as it was.
`tradeoff_data` is the plot without matplotlib (which y, which points, which are on the front), so that what
the picture shows can be checked, and reused, without drawing it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

from compress.core import atomic_path
from compress.report.text import (
    as_dict,
    box_f1,
    fidelity_metric,
    fmt_ms,
    fmt_speedup,
    model_name,
    num,
    variant_label,
    variants_of,
)

_OK, _BAD, _SIM, _REC, _FRONT = "#2e7d32", "#c62828", "#757575", "#f9a825", "#1565c0"


class Point(NamedTuple):
    name: str
    x: Optional[float]  # p50 latency in ms; None: not timed (simulated, or no latency recorded)
    y: Optional[float]  # accuracy or fidelity, as the plot's y says
    variant: dict[str, Any]


def pareto_front(points: list[Point]) -> list[Point]:
    """The timed points no other point dominates (as fast or faster and as good or better, strictly better in
    one), sorted by latency. Points without x or y take no part; equal points are all on the front."""
    pts = [p for p in points if p.x is not None and p.y is not None]

    def dominated(p: Point) -> bool:
        return any(q.x <= p.x and q.y >= p.y and (q.x < p.x or q.y > p.y) for q in pts)

    return sorted((p for p in pts if not dominated(p)), key=lambda p: (p.x, -p.y))


def tradeoff_data(report: dict[str, Any]) -> dict[str, Any]:
    """What the plot shows: "y" ("accuracy", "top1_agreement" or "cosine_min"), "timed" and "untimed" Points,
    "front" (the Pareto front of the timed ones) and "threshold" (the tolerance line on y, or None).

    y is the --eval accuracy when every non-simulated variant has one, else fidelity to fp32 (top-1 agreement for
    classifiers, else the worst per-sample cosine). Simulated variants (no hardware here) are never timed.
    """
    r = report if isinstance(report, dict) else {}
    variants = variants_of(r)
    real = [v for v in variants if not v.get("simulated")]
    scored = bool(real) and all(num(v.get("accuracy")) is not None for v in real)
    metric = "accuracy" if scored else fidelity_metric(r)
    timed, untimed = [], []
    for i, v in enumerate(variants):
        if scored:
            y = num(v.get("accuracy"))
        else:
            fid = as_dict(v.get("fidelity"))
            y = box_f1(fid) if metric == "boxes" else num(fid.get(metric))
            if y is None and metric == "top1_agreement":
                y = num(fid.get("cosine_min"))
        x = None if v.get("simulated") else num(as_dict(v.get("latency_ms")).get("p50"))
        p = Point(variant_label(v, i), x, y, v)
        (timed if x is not None else untimed).append(p)
    tol = num(r.get("tolerance"))
    threshold = None
    if tol is not None and scored:  # --eval: a variant may score at most `tolerance` below fp32
        base = next((v for v in variants if v.get("name") == "fp32"), variants[0] if variants else {})
        base_acc = num(base.get("accuracy"))
        threshold = None if base_acc is None else base_acc - tol
    elif tol is not None and not any(num(as_dict(v.get("fidelity")).get("perplexity_increase")) is not None
                                     for v in variants):  # judged on perplexity, which is not this axis
        threshold = 1.0 - tol
    return {"y": metric, "timed": timed, "untimed": untimed, "front": pareto_front(timed), "threshold": threshold}


def _ylabel(report: dict[str, Any], metric: str) -> str:
    if metric == "accuracy":
        ev = report.get("eval")
        ev = ev if isinstance(ev, str) and ev else ""
        if len(ev) > 48:
            ev = "…" + ev[-47:]
        return "--eval score (higher is better)" + (f"\n{ev}" if ev else "")
    if metric == "boxes":
        return "F1 of matched boxes vs fp32"
    if metric == "next_token_agreement":
        return "next-token agreement with fp32"
    return "top-1 agreement with fp32" if metric == "top1_agreement" else "min cosine similarity to fp32"


def build_figure(report: dict[str, Any]) -> Any:
    """The matplotlib Figure of `tradeoff_data(report)`: x is the p50 latency (each variant profiled alone;
    left is faster), y the accuracy or fidelity. Green: within tolerance; red: outside; the recommended
    variant is starred; the blue step line is the Pareto front; the dashed line the tolerance. Variants
    without a latency (simulated FP8: no hardware here) go in a narrow panel on the right, on the same y axis.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    r = report if isinstance(report, dict) else {}
    data = tradeoff_data(r)
    timed, untimed, front, thr = data["timed"], data["untimed"], data["front"], data["threshold"]
    metric, tol, rec = data["y"], num(r.get("tolerance")), r.get("recommended")

    fig = Figure(figsize=(8, 4.8), dpi=110, layout="constrained")
    if untimed:
        gs = fig.add_gridspec(1, 2, width_ratios=[4, max(1.0, 0.75 * len(untimed))])
        ax = fig.add_subplot(gs[0, 0])
        side = fig.add_subplot(gs[0, 1], sharey=ax)
    else:
        ax, side = fig.add_subplot(1, 1, 1), None

    ys = [p.y for p in timed + untimed if p.y is not None]
    lo = min(ys + ([thr] if thr is not None else []), default=0.0)
    hi = max(ys + ([] if metric == "accuracy" else [1.0]), default=1.0)
    pad = max((hi - lo) * 0.12, abs(hi) * 0.01, 1e-4)
    ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    missing = "no accuracy" if metric == "accuracy" else "no fidelity"

    def draw(axis: Any, p: Point, x: float, sim: bool) -> None:
        if p.y is None:  # nothing to put on y: say so where the point would be
            axis.annotate(f"{p.name}: {missing}", (x, lo - pad * 0.5), fontsize=8, color=_SIM, ha="center", parse_math=False)
            return
        ok = p.variant.get("within_tolerance")
        verdict = _OK if ok else _BAD if ok is False else None
        color, edge = (_SIM, verdict or "black") if sim else (verdict or _SIM, "black")  # simulated: verdict on the rim
        if p.name == rec:
            axis.scatter([x], [p.y], s=420, marker="*", color=_REC, edgecolors="black", linewidths=0.8, zorder=3)
        axis.scatter([x], [p.y], s=70, marker="D" if sim else "o", color=color, edgecolors=edge,
                     linewidths=1.6 if sim else 0.6, zorder=4)
        if sim:
            axis.annotate(p.name, (x, p.y), xytext=(0, 9), textcoords="offset points", fontsize=8, ha="center", zorder=5,
                          parse_math=False)
            return
        speed = fmt_speedup(p.variant.get("speedup_vs_fp32"))
        label = p.name + (" (recommended)" if p.name == rec else "") + f"\n{fmt_ms(x)} ms" + (
            f" · {speed}" if num(p.variant.get("speedup_vs_fp32")) is not None else "")
        dx, dy = _label_offset(axis, x, p.y, placed)
        axis.annotate(label, (x, p.y), xytext=(dx, dy), textcoords="offset points", fontsize=8, zorder=5,
                      ha="left" if dx > 0 else "right", parse_math=False)  # a "$" in a name is not TeX

    xs = [p.x for p in timed]
    xlo, xhi = min(xs, default=0.0), max(xs, default=1.0)
    xpad = max((xhi - xlo) * 0.25, abs(xhi) * 0.15, 1e-3)
    ax.set_xlim(max(0.0, xlo - xpad), xhi + xpad * 1.6)  # room on the right for the labels
    placed: list[tuple[float, float]] = []
    for p in sorted(timed, key=lambda p: (p.x, p.y if p.y is not None else 0.0)):
        draw(ax, p, p.x, False)
    if front:  # the best y reachable within a latency budget: a step up at each front point, flat to the right edge
        fx, fy = [p.x for p in front], [p.y for p in front]
        ax.plot(fx + [ax.get_xlim()[1]], fy + fy[-1:], drawstyle="steps-post", color=_FRONT, lw=1.4, alpha=0.8,
                zorder=2, label="Pareto front")
    base = next((p for p in timed if p.name == "fp32"), None)
    if base is not None:
        ax.axvline(base.x, color="#9e9e9e", lw=0.8, ls=":", zorder=1)
    if thr is not None:
        ax.axhline(thr, color=_BAD, lw=1, ls="--", zorder=2)
        what = f"fp32 − {tol:g}" if metric == "accuracy" else f"1 − {tol:g}"
        ax.annotate(f"tolerance {tol:g} (≥ {thr:.4g} = {what})", (0.01, thr), xycoords=("axes fraction", "data"),
                    xytext=(0, -11), textcoords="offset points", fontsize=8, color=_BAD)
    ax.set_xlabel("p50 latency, ms (each variant profiled alone; lower is better)")
    ax.set_ylabel(_ylabel(r, metric), parse_math=False)
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", color=_OK, mec="black", label="within tolerance"),
               Line2D([], [], ls="", marker="o", color=_BAD, mec="black", label="outside tolerance"),
               Line2D([], [], ls="", marker="*", ms=13, color=_REC, mec="black", label="recommended"),
               Line2D([], [], color=_FRONT, lw=1.4, label="Pareto front")]
    if untimed:
        handles.append(Line2D([], [], ls="", marker="D", color=_SIM, mec="black", label="simulated (rim: verdict)"))
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    if not timed:
        ax.text(0.5, 0.5, "no timed variants", transform=ax.transAxes, ha="center", color=_SIM)

    if side is not None:
        for k, p in enumerate(untimed):
            draw(side, p, float(k), bool(p.variant.get("simulated")))
        side.set_xlim(-0.7, len(untimed) - 0.3)
        side.set_xticks([])
        side.set_xlabel("simulated:\nno latency" if all(p.variant.get("simulated") for p in untimed) else "no latency")
        if thr is not None:
            side.axhline(thr, color=_BAD, lw=1, ls="--", zorder=2)
        side.tick_params(axis="y", labelleft=False)
        side.grid(True, axis="y", alpha=0.3)

    dev = as_dict(r.get("device")).get("name")
    model = model_name(r)
    what = "accuracy" if metric == "accuracy" else "fidelity"
    fig.suptitle(f"latency vs {what}" + (f": {model}" if model else "") + (f" on {dev}" if dev else ""), fontsize=11, parse_math=False)
    return fig


def _label_offset(axis: Any, x: float, y: float, placed: list[tuple[float, float]]) -> tuple[int, int]:
    """An offset (points) for a point's two-line label that keeps clear of the labels already placed: right and
    above, else right and below, else the left side. Boxes are estimated in axes fractions, not measured."""
    (x0, x1), (y0, y1) = axis.get_xlim(), axis.get_ylim()
    fx, fy = (x - x0) / ((x1 - x0) or 1.0), (y - y0) / ((y1 - y0) or 1.0)
    px, py = 1 / 450, 1 / 250  # one point in axes fractions, about, on this figure
    w, h = 95 * px, 22 * py  # a label box: about 20 characters by two lines of 8 pt text
    options = [(dx, dy) for dx in (8, -8) for dy in (6, -26)]
    for offset in options:  # box corners: left side from the point for dx > 0, right side for dx < 0; bottom at dy
        bx, by = fx + offset[0] * px - (w if offset[0] < 0 else 0.0), fy + offset[1] * py
        if all(abs(bx - qx) >= w or abs(by - qy) >= h for qx, qy in placed):
            placed.append((bx, by))
            return offset
    placed.append((fx + 8 * px, fy + 6 * py))
    return options[0]


def render_png(report: dict[str, Any]) -> bytes:
    """The trade-off plot as PNG bytes (what `plot_tradeoff` writes and the HTML report embeds)."""
    buf = io.BytesIO()
    build_figure(report).savefig(buf, format="png")
    return buf.getvalue()


def write_png(png: bytes, path: str | os.PathLike) -> Path:
    """PNG bytes written atomically to `path`."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(png)
    return path


def plot_tradeoff(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the PNG of latency vs fidelity (or accuracy) for every variant of `report` to `path`; return it.
    Nothing is written unless the whole plot was drawn."""
    return write_png(render_png(report), path)
