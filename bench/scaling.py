"""How each stage of `compress run --prune 0.3 --quant int8` grows with the number of layers (issue 19): the
residual CNN of bench/scaling_models.py at 2 to 64 blocks (5 to 131 layers), each through the whole command in
its own process, with the stage times from its report.json. Prints one row per depth and, per stage, the
exponent of a least-squares fit time ~ layers^k over the deeper half (k <= 1: at most linear), and draws
stage time against layers on log-log axes beside a linear reference.

    .venv/bin/python bench/scaling.py [--depths 2,4,8,16,32,64] [--forced] [--plot bench/scaling.png] [-- OPTION ...]

Recovery is off by default (`--no-recover`: a fixed time budget, 60 s, whatever the depth); the rest are the
command's defaults. The CPU it ran on is printed and written on the plot.

`--forced` makes every depth go through the INT8 stage's float fallback in full (with random weights and the
fidelity metric it runs only when a top-1 happens to flip): `--eval bench/scaling_models.py:float_share
--tolerance 0.5`, a score that only keeping about half of the layers in float meets. The INT8 stage's own steps
(report.json's step_seconds: the check with every layer in float, the ranking, the float costs, the search) are
then fitted too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from devices.host import describe_host  # noqa: E402

STAGES = ("export", "prune", "quantize_unpruned", "quantize", "profile")
STEPS = ("quantize", "every_float", "ranking", "float_costs", "search")  # the INT8 stage's, of the unpruned model
FORCED = ["--eval", f"{HERE / 'scaling_models.py'}:float_share", "--tolerance", "0.5"]


def run(blocks: int, work: Path, extra: list[str]) -> dict:
    out, doc = work / f"b{blocks}", work / f"b{blocks}.json"
    cmd = [sys.executable, "-m", "compress.cli", "run", f"{HERE / 'scaling_models.py'}:blocks_{blocks}",
           "--input-shape", "1,3,32,32", "--prune", "0.3", "--quant", "int8", "-o", str(out), "--json", str(doc),
           *extra]
    env = {**os.environ, "EDGE_COMPRESS_CACHE": str(work / "cache")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"blocks_{blocks}: compress run exited {r.returncode}: {r.stderr.strip()[-400:]}")
    rep = json.loads(doc.read_text())
    quant = (rep.get("stages") or {}).get("quantize_unpruned") or {}
    return {"blocks": blocks, "layers": 2 * blocks + 2, "seconds": round(seconds, 1),
            "stage_seconds": rep.get("stage_seconds") or {}, "int8_steps": quant.get("step_seconds") or {},
            "excluded": len(quant.get("excluded_layers") or [])}


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-3)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / max(sum((a - mx) ** 2 for a in lx), 1e-12)


def plot(rows: list[dict], path: Path, title: str, steps: bool) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(12 if steps else 7, 4.5), squeeze=False)
    layers = [r["layers"] for r in rows]
    panels = [("stages of compress run", [*STAGES, "total"], lambda r, s: r["seconds"] if s == "total"
               else r["stage_seconds"].get(s, 0.0))]
    if steps:
        panels.append(("the INT8 stage of the unpruned model, by step", STEPS,
                       lambda r, s: r["int8_steps"].get(s, 0.0)))
    for ax, (name, keys, value) in zip(axes[0], panels):
        for key in keys:
            ys = [max(value(r, key), 1e-2) for r in rows]
            ax.plot(layers, ys, marker="o", label=key, linewidth=2.5 if key == "total" else 1.2)
        ref = max(max(value(r, k) for k in keys) for r in rows[-1:])
        ax.plot(layers, [ref * x / layers[-1] for x in layers], "k--", linewidth=0.8, label="linear in layers")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("layers (Conv + Gemm)")
        ax.set_ylabel("seconds")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="2,4,8,16,32,64", help="blocks per model, comma-separated")
    ap.add_argument("--plot", type=Path, default=HERE / "scaling.png")
    ap.add_argument("--forced", action="store_true", help="the float fallback in full at every depth (see above)")
    ap.add_argument("extra", nargs="*", help="options for compress run, after -- (default: --no-recover)")
    args = ap.parse_args()
    host = describe_host()
    cpu = f"{host['cpu']} ({', '.join(host['isa'])}), {host['cores']} cores"
    extra = (args.extra or ["--no-recover"]) + (FORCED if args.forced else [])
    print(f"{dt.date.today()}, {cpu}; compress run --prune 0.3 --quant int8 {' '.join(extra)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for blocks in [int(d) for d in args.depths.split(",")]:
            rows.append(run(blocks, Path(tmp), extra))
            print(json.dumps(rows[-1]), flush=True)
    deep = rows[len(rows) // 2 - 1:] if len(rows) >= 4 else rows
    xs = [r["layers"] for r in deep]
    fits = {s: round(exponent(xs, [r["stage_seconds"].get(s, 0.0) for r in deep]), 2) for s in STAGES}
    fits["total"] = round(exponent(xs, [r["seconds"] for r in deep]), 2)
    print(f"time ~ layers^k over {xs[0]}-{xs[-1]} layers: " + ", ".join(f"{s} {k}" for s, k in fits.items()))
    if args.forced:
        steps = {s: round(exponent(xs, [r["int8_steps"].get(s, 0.0) for r in deep]), 2) for s in STEPS}
        print("the INT8 stage's steps (unpruned): " + ", ".join(f"{s} {k}" for s, k in steps.items()))
    shown = " ".join(a if HERE.as_posix() not in a else a.replace(f"{HERE.parent}/", "") for a in extra)
    plot(rows, args.plot, f"compress run --prune 0.3 --quant int8 {shown}\n{cpu}, {dt.date.today()}", args.forced)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
