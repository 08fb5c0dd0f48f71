"""The architectures users bring (issue 19): timm's edge families and ultralytics' YOLO, built from their own code
with random weights, each through `compress prune` (or `compress run`) in its own subprocess, with the time it
took, what was removed and which blocks were left whole. Prints the CPU it ran on.

    .venv/bin/python bench/arch_suite.py --site DIR [--run] [--only NAME,...] [--ratio 0.3] [--out DIR] [-- OPTION ...]

DIR holds timm, torchvision and (for YOLO) ultralytics, installed beside the project rather than in it:

    .venv/bin/python -m pip install --no-deps --target DIR timm==1.0.31 torchvision==0.28.0 \\
        ultralytics==8.4.190 ultralytics-thop opencv-python-headless polars

On these machines the only torchvision for torch 2.13 is a CUDA build whose C++ ops cannot load against the CPU
torch; its Python code imports once the two op schemas it registers fake kernels for are declared, which
bench/arch_models.py does (../shared/notes: timm-ultralytics-torchvision.md). Users with a matching torchvision
need none of this. `--run` runs `compress run --prune R --quant int8` instead of `compress prune --no-recover`
(minutes per model rather than seconds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from arch_list import SHAPES  # noqa: E402

from devices.host import describe_host  # noqa: E402


def run_one(name: str, site: Path, work: Path, ratio: float, full: bool, extra: list[str]) -> dict:
    shape = SHAPES[name]
    model = f"{HERE / 'arch_models.py'}:{name}"
    out = work / name
    if full:
        cmd = ["run", model, "--input-shape", shape, "--prune", str(ratio), "--quant", "int8", "-o", str(out),
               "--json", str(work / f"{name}.json")]
    else:
        cmd = ["prune", model, "--input-shape", shape, "--ratio", str(ratio), "--no-recover", "-o",
               str(out) + ".onnx", "--json", str(work / f"{name}.json")]
    cmd += extra
    env = {**os.environ, "EDGE_COMPRESS_ARCH_SITE": str(site), "EDGE_COMPRESS_CACHE": str(work / "cache")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "compress.cli", *cmd], capture_output=True, text=True, env=env,
                       timeout=1800)
    row = {"model": name, "rc": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode != 0:
        row["error"] = next((ln for ln in r.stderr.splitlines() if ln.startswith("error")), r.stderr[-200:])
        return row
    doc = json.loads((work / f"{name}.json").read_text())
    if full:
        s = (doc.get("stages") or {}).get("prune") or {}
        s = s.get("structural") or {}
        best = next(v for v in doc["variants"] if v["name"] == doc["recommended"])
        row.update(recommended=doc["recommended"], speedup=round(best.get("speedup_vs_fp32") or 1.0, 2),
                   stage_seconds=doc.get("stage_seconds"),
                   int8=round(next((v["speedup_vs_fp32"] for v in doc["variants"] if v["name"] == "int8"), 0.0), 2))
    else:
        s = doc.get("structural") or doc
    row.update(params_cut=round(1 - s.get("params_after", 0) / max(s.get("params_before", 1), 1), 3),
               left_whole=len(s.get("left_whole") or []))
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", type=Path, required=True, help="folder holding timm, torchvision, ultralytics")
    ap.add_argument("--run", action="store_true", help="compress run --prune R --quant int8 (default: compress prune)")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--out", type=Path, help="keep each model's output and report here (default: a temporary folder)")
    ap.add_argument("extra", nargs="*", help="more options for the compress command, after --")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SHAPES)
    host = describe_host()
    print(f"{dt.date.today()}, {host['cpu']} ({', '.join(host['isa'])}), {host['cores']} cores; "
          f"{'compress run --quant int8' if args.run else 'compress prune --no-recover'} --ratio {args.ratio}")
    with tempfile.TemporaryDirectory(prefix="arch-suite-") as tmp:
        work = args.out.resolve() if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            row = run_one(name, args.site.resolve(), work, args.ratio, args.run, args.extra)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
