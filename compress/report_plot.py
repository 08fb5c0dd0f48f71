"""The trade-off plot of a `compress run` report: speedup vs fp32 against fidelity to fp32, one point per variant.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch), imported only
when a plot is asked for, and written atomically: a failed plot leaves the previous PNG as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compress.report_md import (_d, _num, fidelity_metric, fmt_speedup, model_name, variant_label, variants_of)

_OK, _BAD, _SIM, _REC = "#2e7d32", "#c62828", "#757575", "#f9a825"


def plot_tradeoff(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of speedup vs fidelity for every variant of `report` to `path`; return the path.

    x: speedup vs fp32 (interleaved wall-clock medians, what the recommendation uses); y: top-1 agreement
    with fp32 for classifiers, else the worst per-sample cosine. Green: within tolerance; red: outside; the
    recommended variant is ringed and starred; the dashed line is 1 - tolerance. Variants without a speedup
    (simulated FP8: no hardware here) go in a narrow panel on the right, on the same fidelity axis.
    """
    from matplotlib.figure import Figure

    from compress.atomic import atomic_path

    path = Path(path)
    r = report if isinstance(report, dict) else {}
    metric = fidelity_metric(r)
    ylabel = "top-1 agreement with fp32" if metric == "top1_agreement" else "min cosine similarity to fp32"
    tol = _num(r.get("tolerance"))
    rec = r.get("recommended")

    timed, untimed = [], []
    for i, v in enumerate(variants_of(r)):
        y = _num(_d(v.get("fidelity")).get(metric))
        if y is None and metric == "top1_agreement":
            y = _num(_d(v.get("fidelity")).get("cosine_min"))
        x = _num(v.get("speedup_vs_fp32"))
        point = (variant_label(v, i), x, y, v)
        (timed if x is not None else untimed).append(point)

    fig = Figure(figsize=(8, 4.8), dpi=110, layout="constrained")
    if untimed:
        gs = fig.add_gridspec(1, 2, width_ratios=[4, max(1.0, 0.75 * len(untimed))])
        ax = fig.add_subplot(gs[0, 0])
        side = fig.add_subplot(gs[0, 1], sharey=ax)
    else:
        ax, side = fig.add_subplot(1, 1, 1), None

    ys = [p[2] for p in timed + untimed if p[2] is not None]
    lo = min(ys + ([1.0 - tol] if tol is not None else []), default=0.0)
    hi = max(ys + [1.0], default=1.0)
    pad = max((hi - lo) * 0.12, 1e-4)
    ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")

    def draw(axis: Any, name: str, x: float, y: float | None, v: dict[str, Any], sim: bool) -> None:
        if y is None:  # no fidelity either: say so where the point would be
            axis.annotate(f"{name}: no fidelity", (x, lo - pad * 0.5), fontsize=8, color=_SIM, ha="center")
            return
        ok = v.get("within_tolerance")
        color = _SIM if sim else (_OK if ok else _BAD if ok is False else _SIM)
        edge = "black" if not sim else (_OK if ok else _BAD if ok is False else "black")  # simulated: verdict on the rim
        if name == rec:
            axis.scatter([x], [y], s=420, marker="*", color=_REC, edgecolors="black", linewidths=0.8, zorder=3)
        axis.scatter([x], [y], s=70, marker="D" if sim else "o", color=color, edgecolors=edge,
                     linewidths=1.6 if sim else 0.6, zorder=4)
        if sim:
            axis.annotate(name, (x, y), xytext=(0, 9), textcoords="offset points", fontsize=8, ha="center", zorder=5)
            return
        label = name + (" (recommended)" if name == rec else "") + f"\n{fmt_speedup(x)}"
        axis.annotate(label, (x, y), xytext=(8, 6), textcoords="offset points", fontsize=8, zorder=5)

    for name, x, y, v in timed:
        draw(ax, name, x, y, v, bool(v.get("simulated")))
    xs = [p[1] for p in timed]
    ax.axvline(1.0, color="#9e9e9e", lw=0.8, ls=":", zorder=1)
    xlo, xhi = min(xs + [1.0]), max(xs + [1.0])
    xpad = max((xhi - xlo) * 0.25, 0.1)
    ax.set_xlim(xlo - xpad, xhi + xpad * 1.6)  # room on the right for the labels
    if tol is not None:
        ax.axhline(1.0 - tol, color=_BAD, lw=1, ls="--", zorder=2)
        ax.annotate(f"tolerance {tol:g} (≥ {1.0 - tol:g})", (0.01, 1.0 - tol), xycoords=("axes fraction", "data"),
                    xytext=(0, -11), textcoords="offset points", fontsize=8, color=_BAD)
    ax.set_xlabel("speedup vs fp32 (interleaved wall-clock medians; > 1 is faster)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=_OK, mec="black", label="within tolerance"),
               Line2D([], [], ls="", marker="o", color=_BAD, mec="black", label="outside tolerance"),
               Line2D([], [], ls="", marker="*", ms=13, color=_REC, mec="black", label="recommended")]
    if untimed:
        handles.append(Line2D([], [], ls="", marker="D", color=_SIM, mec="black", label="simulated (rim: verdict)"))
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    if not timed:
        ax.text(0.5, 0.5, "no timed variants", transform=ax.transAxes, ha="center", color=_SIM)

    if side is not None:
        for k, (name, _x, y, v) in enumerate(untimed):
            draw(side, name, float(k), y, v, True)
        side.set_xlim(-0.7, len(untimed) - 0.3)
        side.set_xticks([])
        side.set_xlabel("simulated:\nno latency")
        if tol is not None:
            side.axhline(1.0 - tol, color=_BAD, lw=1, ls="--", zorder=2)
        side.tick_params(axis="y", labelleft=False)
        side.grid(True, axis="y", alpha=0.3)

    dev = _d(r.get("device")).get("name")
    model = model_name(r)
    title = "speedup vs fidelity" + (f": {model}" if model else "") + (f" on {dev}" if dev else "")
    fig.suptitle(title, fontsize=11)

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
