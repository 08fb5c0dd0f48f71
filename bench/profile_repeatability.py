"""Do two default profiles of one model agree on p50? Profiles the same model back to back, as a user would.

    python bench/profile_repeatability.py [MODEL.onnx] [--device host] [--repeats 5] [--threads N ...]

Without MODEL it exports the shipped ResNet-18-style demo (1x3x224x224) and the MiniLM-sized encoder
(1x128) to a temp folder. For each thread count it runs the profiler `--repeats` times with its defaults
(adaptive run count) and prints each p50 and the largest pairwise disagreement, max/min - 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from compress.models.inputs import example_inputs, parse_input_shape
from compress.models.loading import load_model
from devices.loader import load_profile
from export.onnx_export import export_onnx
from runtime.profiler import profile_model

DEMOS = [("compress.zoo:resnet_demo", ["1,3,224,224"]), ("compress.zoo:encoder_demo", ["input_ids=1,128", "attention_mask=1,128"])]


def _export_demos(folder: Path) -> list[Path]:
    paths = []
    for spec, shapes in DEMOS:
        lm = load_model(spec)
        path = folder / (spec.split(":")[1] + ".onnx")
        export_onnx(lm.module, example_inputs(lm, [parse_input_shape(s) for s in shapes]), path, source=spec)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--device", default="host")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts to try (default: the profile's, and 1)")
    args = ap.parse_args()
    profile = load_profile(args.device)
    threads = args.threads or sorted({profile.threads, 1}, reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or _export_demos(Path(tmp))
        print(f"device {profile.name}, {args.repeats} back-to-back default profiles per row")
        print(f"{'model':<22} {'threads':>7}  {'p50 ms per profile':<48} {'runs':<22} {'max/min-1':>9}")
        worst = 0.0
        for model in models:
            for t in threads:
                results = [profile_model(model, profile, threads=t).to_json() for _ in range(args.repeats)]
                p50s = [r["latency_ms"]["p50"] for r in results]
                spread = max(p50s) / min(p50s) - 1
                worst = max(worst, spread)
                print(f"{model.stem:<22} {t:>7}  {' '.join(f'{p:7.3f}' for p in p50s):<48} "
                      f"{' '.join(str(r['runs']) for r in results):<22} {spread:>8.1%}")
        print(f"largest disagreement: {worst:.1%} ({'within' if worst <= 0.05 else 'OVER'} the 5% goal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
