"""sweep.md and sweep.png: one row per cell of a `compress sweep`, and every cell's final model on one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.core import atomic_path, first_line, warn
from compress.report import code, fmt_ms, fmt_speedup, table, write_png
from compress.tuning.trials import fidelity_value


def _fid(f: Any) -> str:
    y = fidelity_value(f or {})
    return "-" if y is None else f"{y:.4f}"


def render_sweep(s: dict[str, Any], plot: str | None) -> str:
    rows = s["cells"]
    done = sum(1 for r in rows if r["status"] == "done")
    out = [f"# compress sweep: {code(Path(s['sweep']).name)}", "",
           f"{len(rows)} cells, {done} finished, {len(rows) - done} not; tolerance {s['tolerance']:g}; "
           f"{s['seconds']:.0f} s on " + (f"the Ray cluster at {s['ray']['address']}" if s["ray"].get("address")
                                          else "an embedded Ray started for this command") + ".", ""]
    if plot:
        out += [f"![speedup over fp32 vs fidelity of each cell's final model]({plot})", ""]
    out += ["Each cell is one `compress run`; 'recommended' is what that run recommends (fp32 when nothing else "
            "pays), 'final' is the cell's most compressed model.", ""]
    cells = []
    for r in rows:
        if r["status"] != "done":
            cells.append([code(r["id"]), r["model"], r["device"], r["settings"], f"{r['status']}: {r.get('error') or ''}",
                          "-", "-", "-", "-", "-"])
            continue
        f = r["final"]
        cells.append([code(r["id"]), r["model"], r["device"], r["settings"], code(r["recommended"]),
                      fmt_ms(r.get("p50_ms")), fmt_speedup(r.get("speedup_vs_fp32")), _fid(r.get("fidelity")),
                      f"{f['name']}: {fmt_speedup(f.get('speedup_vs_fp32'))}", _fid(f.get("fidelity"))])
    out += table(["cell", "model", "device", "settings", "recommended", "p50 ms", "speedup", "fidelity",
                   "final: speedup", "final fidelity"], cells) + [""]
    if s.get("command"):
        out += ["## Reproduce", "", "```", s["command"], "```", ""]
    return "\n".join(out)


def render_png(s: dict[str, Any]) -> bytes:
    """Speedup (x) vs fidelity (y) of each finished cell's final model; colour per model, marker per device."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    models = sorted({r["model"] for r in s["cells"]})
    devices = sorted({r["device"] for r in s["cells"]})
    markers = "os^Dv<>pX*"
    for r in s["cells"]:
        if r["status"] != "done" or not r["final"].get("speedup_vs_fp32"):
            continue
        y = fidelity_value(r["final"].get("fidelity") or {})
        if y is None:
            continue
        x = r["final"]["speedup_vs_fp32"]
        ax.scatter([x], [y], color=f"C{models.index(r['model']) % 10}",
                   marker=markers[devices.index(r["device"]) % len(markers)], s=40, zorder=3)
        ax.annotate(r["settings"], (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points")
    for i, m in enumerate(models):
        ax.scatter([], [], color=f"C{i % 10}", label=m)
    for i, d in enumerate(devices):
        ax.scatter([], [], color="grey", marker=markers[i % len(markers)], label=d)
    ax.axhline(1.0 - s["tolerance"], color="grey", ls="--", lw=0.8)
    ax.axvline(1.0, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("speedup over fp32 (device, interleaved A/B)")
    ax.set_ylabel("fidelity to fp32 (top-1 agreement, else worst cosine)")
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_sweep_readable(s: dict[str, Any], outdir: Path) -> None:
    plot = None
    try:
        write_png(render_png(s), outdir / "sweep.png")
        plot = "sweep.png"
    except Exception as e:
        warn(f"sweep plot not written: {first_line(e)}")
    with atomic_path(outdir / "sweep.md") as tmp:
        tmp.write_text(render_sweep(s, plot))
