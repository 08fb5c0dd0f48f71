"""The format advisor on a real model: all-MiniLM-L6-v2 (real weights) against a CPU and an FP8 GPU profile.

    make bench-deps; .venv/bin/python bench/formats_minilm.py [--max-layers 8] [--out DIR]

Exports MiniLM as bench/quant_int8.py does (sequence 128), calibrates on its first 32 sentences, and runs
`compress formats` logic (compress.quantization.advisor.advise) for `host` and for `nvidia-h100-trt-fp8`: whole-model error
per format, the per-layer sweep (the --max-layers layers with the largest outliers), and each recommendation.
Prints the Markdown reports; with --out, writes their JSON and plots there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import SENTENCES, MiniLM, minilm_folder, tokenize  # noqa: E402

from compress.quantization.advisor import advise  # noqa: E402
from compress.quantization.advisor_report import markdown, plot_formats  # noqa: E402
from devices.loader import load_profile  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402

CALIB_SAMPLES = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-layers", type=int, default=8)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = tokenize(SENTENCES[:CALIB_SAMPLES])
        fp32 = work / "minilm_fp32.onnx"
        export_onnx(MiniLM(minilm_folder()).eval(), {k: torch.from_numpy(v[:1]) for k, v in calib.items()}, fp32)
        npz = work / "minilm_calib.npz"
        np.savez(npz, **calib)
        for device in ("host", "nvidia-h100-trt-fp8"):
            t0 = time.perf_counter()
            rep = advise(fp32, load_profile(device), npz, max_layers=a.max_layers, calib_label="minilm_calib.npz")
            print(f"\n## {device} ({time.perf_counter() - t0:.0f} s)\n")
            print(markdown(rep))
            if a.out:
                import json

                a.out.mkdir(parents=True, exist_ok=True)
                (a.out / f"formats_{device}.json").write_text(json.dumps(rep, indent=2))
                plot_formats(rep, a.out / f"formats_{device}.png")


if __name__ == "__main__":
    main()
