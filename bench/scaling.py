"""How each stage of `compress run --prune 0.3 --quant int8` grows with the number of layers (issue 19): the
residual CNN of bench/scaling_models.py at 2 to 64 blocks (5 to 131 layers), each through the whole command in
its own process, with the stage times from its report.json. Prints one row per depth and, per stage, the
exponent of a least-squares fit time ~ layers^k over the deeper half (k <= 1: at most linear), and draws
stage time against layers on log-log axes beside a linear reference.

    .venv/bin/python bench/scaling.py [--depths 2,4,8,16,32,64] [--plot bench/scaling.png] [-- OPTION ...]

Recovery is off by default (`--no-recover`: a fixed time budget, 60 s, whatever the depth); the rest are the
command's defaults. The CPU it ran on is printed and written on the plot.
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
    return {"blocks": blocks, "layers": 2 * blocks + 2, "seconds": round(seconds, 1),
            "stage_seconds": rep.get("stage_seconds") or {}}


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-3)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / max(sum((a - mx) ** 2 for a in lx), 1e-12)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = [r["layers"] for r in rows]
    for stage in [*STAGES, "total"]:
        ys = [r["seconds"] if stage == "total" else r["stage_seconds"].get(stage, 0.0) for r in rows]
        ax.plot(layers, ys, marker="o", label=stage, linewidth=2.5 if stage == "total" else 1.2)
    ref = rows[-1]["seconds"]
    ax.plot(layers, [ref * x / layers[-1] for x in layers], "k--", linewidth=0.8, label="linear in layers")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("layers (Conv + Gemm)")
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="2,4,8,16,32,64", help="blocks per model, comma-separated")
    ap.add_argument("--plot", type=Path, default=HERE / "scaling.png")
    ap.add_argument("extra", nargs="*", help="options for compress run, after -- (default: --no-recover)")
    args = ap.parse_args()
    host = describe_host()
    cpu = f"{host['cpu']} ({', '.join(host['isa'])}), {host['cores']} cores"
    extra = args.extra or ["--no-recover"]
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
    plot(rows, args.plot, f"compress run --prune 0.3 --quant int8 {' '.join(extra)}\n{cpu}, {dt.date.today()}")
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
