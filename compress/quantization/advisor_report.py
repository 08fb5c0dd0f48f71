"""The evidence of `compress formats`, for people: a rich table, a Markdown report and a per-layer plot.

Everything is drawn from advise()'s JSON report alone, so a saved --json can be turned into the same table and
plot later, and what the picture shows is what the JSON says.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional

from compress.quantization.advisor import FORMATS
from compress.report import write_png

_SHORT = {"int8_per_tensor": "int8 tensor", "int8_per_channel": "int8 channel", "fp8_e4m3fn": "fp8 e4m3",
          "fp8_e5m2": "fp8 e5m2"}
_COLORS = {"int8_per_tensor": "#c62828", "int8_per_channel": "#ef6c00", "fp8_e4m3fn": "#1565c0",
           "fp8_e5m2": "#2e7d32"}


def _g(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


def metric_label(report: dict[str, Any]) -> str:
    return "1 - top-1 agreement" if report.get("metric") == "top1" else "1 - cosine_min"


def rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the whole model first (its tolerance metric), then each swept layer (1 - cosine mean
    when that layer alone is quantized), with the outlier evidence; the worst layer per format is marked *."""
    header = ["layer", "op"] + [_SHORT[f] for f in FORMATS] + ["act max/std", "act kurt", "w max/std", "w ch-spread"]
    whole = report["whole_model"]
    out = [["WHOLE MODEL", metric_label(report)] + [_g(whole[f]["error"]) for f in FORMATS] + ["", "", "", ""]]
    worst = report.get("worst_layer", {})
    for r in report["layers"]:
        if not r.get("swept"):
            continue
        cells = []
        for f in FORMATS:
            e = r["errors"].get(f, {})
            v = e.get("one_minus_cos_mean")
            cells.append(("failed" if "error" in e else _g(v)) + (" *" if worst.get(f) == r["node"] else ""))
        a, w = r.get("activation") or {}, r.get("weight") or {}
        out.append([r["node"], r["op_type"]] + cells + [_g(a.get("max_over_std")), _g(a.get("kurtosis")),
                                                          _g(w.get("max_over_std")), _g(w.get("channel_spread"))])
    return header, out


def device_lines(report: dict[str, Any]) -> list[str]:
    d = report["device"]
    lines = [f"device {d['name']} ({d['arch']}; providers {', '.join(d['providers'])}; INT8 activations "
             f"{d['int8_activations']})"]
    for f in FORMATS:
        c = d["formats"][f]
        lines.append(f"  {f}: {'fast' if c['fast'] else 'not fast'} ({c['why']})")
    return lines


def recommendation_line(report: dict[str, Any]) -> str:
    rec = report["recommendation"]
    keep = f", keeping {', '.join(rec['keep_float'])} in float" if rec.get("keep_float") else ""
    return f"recommended: {rec['format']}{keep}. {rec['reason']}."


def rich_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    header, body = rows(report)
    t = Table(title=f"{Path(report['model']).name}: error per format (per layer: 1 - cosine mean, that layer alone)",
              title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    for i, r in enumerate(body):
        t.add_row(*r, style="bold" if i == 0 else None, end_section=i == 0)
    return t


def notes(report: dict[str, Any]) -> list[str]:
    out = [f"method: {report['method']}; tolerance {report['tolerance']:g} on {metric_label(report)}; "
           f"{report['calibration']['samples']} calibration sample(s) ({report['calibration']['source']})"]
    if report.get("sweep_note"):
        out.append(report["sweep_note"])
    if report.get("skipped"):
        out.append("not quantizable (non-float inputs): " + ", ".join(s["node"] for s in report["skipped"]))
    return out


def markdown(report: dict[str, Any], plot: Optional[str] = None) -> str:
    header, body = rows(report)
    lines = [f"# Format advice: {Path(report['model']).name} on {report['device']['name']}", "",
             f"**{recommendation_line(report)}**", "", "## Device", ""]
    lines += [f"- {ln.strip()}" for ln in device_lines(report)]
    lines += ["", "## Measurements", "",
              "Whole model: every layer quantized, error in the tolerance metric. Per layer: only that layer "
              "quantized, 1 - cosine mean of the outputs; * marks each format's worst layer.", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("*", "\\*") for c in r) + " |" for r in body]
    lines += [""] + [f"- {n}" for n in notes(report)]
    if plot:
        lines += ["", f"![per-layer error per format]({plot})"]
    return "\n".join(lines) + "\n"


def build_figure(report: dict[str, Any]) -> Any:
    """Per-layer error (1 - cosine mean, log scale) per format in graph order, with each format's whole-model
    error as a dashed line of the same colour."""
    from matplotlib.figure import Figure

    layers = [r for r in report["layers"] if r.get("swept")]
    fig = Figure(figsize=(max(9.0, 0.35 * len(layers) + 5), 4.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(layers)))
    floor = 1e-9  # log scale: an exact zero still shows, at the bottom
    for f in FORMATS:
        ys = [max((r["errors"].get(f) or {}).get("one_minus_cos_mean") or floor, floor) for r in layers]
        ax.plot(xs, ys, marker="o", ms=4, lw=1.2, color=_COLORS[f], label=f"{_SHORT[f]} (layer alone)")
        ax.axhline(max(report["whole_model"][f]["error"], floor), color=_COLORS[f], ls="--", lw=1,
                   label=f"{_SHORT[f]} whole model ({metric_label(report)})")
    ax.axhline(report["tolerance"], color="#757575", ls=":", lw=1, label=f"tolerance {report['tolerance']:g}")
    ax.set_yscale("log")
    ax.set_xticks(xs, [r["node"] for r in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("error (log)")
    rec = report["recommendation"]["format"]
    ax.set_title(f"{Path(report['model']).name} on {report['device']['name']}: recommended {rec}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the points
    return fig


def plot_formats(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the per-layer plot as PNG, atomically (nothing is written unless the whole plot was drawn)."""
    buf = io.BytesIO()
    build_figure(report).savefig(buf, format="png")
    return write_png(buf.getvalue(), path)
