"""search.md and search.png: what a person reads after `compress search` (search.json is for machines).

The plot is compress run's trade-off plot (compress.report.plot) drawn over every measured variant of every
trial, so the two read alike: latency across, fidelity up, the Pareto front, the floor, the pick starred.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.core import atomic_path, first_line, warn
from compress.report import code, fmt_ms, fmt_speedup, plot_tradeoff, table
from compress.tuning.trials import fidelity_value


def _fid(v: dict[str, Any], scored: bool) -> str:
    y = v.get("accuracy") if scored else fidelity_value(v.get("fidelity") or {})
    return "-" if y is None else f"{y:.4f}"


def render_search(summary: dict[str, Any], cands: list[dict[str, Any]], scored: bool, plot: str | None) -> str:
    s = summary
    budget = s.get("latency_budget_ms")
    out = [f"# compress search: {code(s['model'])} on {code(s['device'])}", ""]
    if s.get("recommended"):
        out += [f"> **Recommended: `{s['recommended']}`** — {s['reason']}. Its full `compress run` report: "
                "[best/report.md](best/report.md).", ""]
    else:
        out += [f"> **No recommendation** — {s['reason']}.", ""]
    done = sum(1 for t in s["trials"] if t["status"] == "done")
    stopped = sum(1 for t in s["trials"] if t["status"] == "stopped early")
    crashed = sum(1 for t in s["trials"] if t["status"] == "crashed")
    out += [f"- **Budget:** p50 ≤ {budget:g} ms on the device" if budget is not None else "- **Budget:** none",
            f"- **Floor:** {s['floor']:.4g} ({s['floor_on']})" if s.get("floor") is not None else "- **Floor:** none",
            f"- **Trials:** {len(s['trials'])} of {s['trials_requested']}: {done} finished, {stopped} stopped early, "
            f"{crashed} crashed; {s['seconds']:.0f} s",
            f"- **Search:** {s['algorithm']}; seed {s['seed']}",
            "- **Ray:** " + (f"cluster {s['ray']['address']}" if s["ray"].get("address") else "embedded, started for this command")
            + f", {s['ray'].get('cluster_cpus', 0):g} CPUs", ""]
    if plot:
        out += [f"![p50 latency vs fidelity of every measured variant, with the Pareto front]({plot})", ""]
    out += ["## Pareto set", "",
            "Measured variants no other one beats on both p50 latency and fidelity (each trial's fp32, pruned and "
            "quantized models all count).", ""]
    front = [v for v in cands if v["name"] in set(s["pareto"])]
    front.sort(key=lambda v: v["latency_ms"]["p50"])
    out += table(["variant", "settings", "p50 ms", "speedup", "size MB", "fidelity" if not scored else "score", "in budget"],
                  [[code(v["name"]), v["settings"] if v["name"] != "fp32" else "-", fmt_ms(v["latency_ms"]["p50"]),
                    fmt_speedup(v.get("speedup_vs_fp32")), f"{(v.get('size_bytes') or 0) / 1e6:.2f}", _fid(v, scored),
                    "yes" if budget is None or v["latency_ms"]["p50"] <= budget else "no"] for v in front]) + [""]
    out += ["## Trials", ""]
    rows = []
    for t in s["trials"]:
        status = t["status"] + (f": {t['error']}" if t.get("error") else f": {t['why']}" if t.get("why") else "")
        rows.append([code(t["id"]), t["label"], status, fmt_ms(t.get("p50_ms")),
                     "-" if t.get("fidelity") is None else f"{t['fidelity']:.4f}",
                     "-" if t.get("seconds") is None else f"{t['seconds']:.0f}"])
    out += table(["trial", "settings", "status", "final p50 ms", "final fidelity", "s"], rows) + [""]
    if s.get("command"):
        out += ["## Reproduce", "", "```", s["command"], "```", ""]
    return "\n".join(out)


def write_search_readable(summary: dict[str, Any], cands: list[dict[str, Any]], outdir: Path, scored: bool) -> None:
    """search.md, and search.png when matplotlib can draw it: a failed plot costs the picture, not the search."""
    plot = None
    as_report = {"variants": [{k: v for k, v in c.items() if k != "report"} for c in cands],
                 "recommended": summary.get("recommended"),
                 "tolerance": (1.0 - summary["floor"]) if summary.get("floor") is not None and not scored else None}
    try:
        plot_tradeoff(as_report, outdir / "search.png")
        plot = "search.png"
    except Exception as e:
        warn(f"search plot not written: {first_line(e)}")
    with atomic_path(outdir / "search.md") as tmp:
        tmp.write_text(render_search(summary, cands, scored, plot))
