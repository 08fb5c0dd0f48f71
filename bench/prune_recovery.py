"""Does label-free recovery hold accuracy after pruning? fp32 vs Torch-Pruning's default recipe vs our earlier
recipe vs ours, side by side in one run, on the shipped trained demo (compress.zoo:shapes_resnet).

    .venv/bin/python bench/prune_recovery.py [--ratios 0.25,0.5] [--n-calib 256] [--seconds 60]

- anchor:  Torch-Pruning's default (MetaPruner, L2 group magnitude, classifier ignored); its recovery is a
           labelled fine-tune, which a label-free user cannot run, so none.
- before:  ours until issue 17: BatchNorm re-estimated on the calibration samples, then 200 Adam steps (lr 1e-4)
           of output distillation on the same samples.
- ours:    `compress run --prune R` today (compress.pruning.prune_stage defaults): BatchNorm re-estimation, then
           distillation on augmented views with cosine decay and early stopping on an eighth it never trains on,
           within --seconds.
- measured: ours with `--allocation measured`: per-block ratios that save the time the uniform cut saves,
           where each block's measured loss is lowest (compress.pruning.allocate); its probing is in `seconds`.
Every recipe's model is exported and timed against fp32 (onnxruntime, one intra-op thread, interleaved, medians of
thread CPU time): "x fp32" is its speedup, the figure the allocation trades accuracy against.
Held-out accuracy is on labelled images none of the recipes saw (labels are used only to score). Widths are
rounded to the host profile's channel multiple for every recipe but the anchor. Prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp

from compress.models import load_model, prepare_inputs
from compress.pruning import PruneOptions, prune_stage
from compress.pruning.allocate import time_modules
from compress.pruning.recover import distill, recalibrate_batchnorm
from compress.pruning.structural import prune_model
from devices.host import describe_host
from devices.loader import load_profile


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean(np.concatenate([model(x[i:i + 256]).argmax(1).numpy() for i in range(0, len(x), 256)]) == y))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=PruneOptions.default("recover_seconds"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "compress.zoo.shapes", "data", "--calib", str(tmp / "calib.npz"), "--eval",
                    str(tmp / "eval.npz"), "--n-calib", str(args.n_calib)], check=True, capture_output=True)
    loaded = load_model("compress.zoo:shapes_resnet")
    prep = prepare_inputs(loaded, (), str(tmp / "calib.npz"))
    ev = np.load(tmp / "eval.npz")
    x, y = torch.from_numpy(ev["image"]), ev["y"]
    model = loaded.module
    host = load_profile("host")
    multiple = host.pruning.channel_multiple
    fp32 = accuracy(model, x, y)
    cpu = describe_host()
    print(f"shapes_resnet, {args.n_calib} unlabelled calibration samples, {len(y)} labelled held-out images, "
          f"2 torch threads, widths rounded to {multiple}; CPU: {cpu.get('cpu')} ({', '.join(cpu.get('isa', []))})")
    print(f"{'ratio':>5} {'recipe':<8} {'accuracy':>8} {'drop pt':>7} {'seconds':>7} {'x fp32':>7}")
    print(f"{'-':>5} {'fp32':<8} {fp32:>8.4f} {0:>7.2f} {0:>7.1f} {1:>7.2f}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        rows: list = []
        t0 = time.perf_counter()
        anchor = copy.deepcopy(model)
        tp.pruner.MetaPruner(anchor, prep.example["image"], importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=ratio, ignored_layers=[anchor.fc]).step()
        rows.append(("anchor", accuracy(anchor, x, y), time.perf_counter() - t0, anchor))
        t0 = time.perf_counter()
        before = prune_model(model, prep.example, ratio=ratio, importance="l2", round_to=multiple, prune_first_conv=True).module
        recalibrate_batchnorm(before, prep.train)
        distill(before, model, prep.train, steps=200, lr=1e-4)
        rows.append(("before", accuracy(before, x, y), time.perf_counter() - t0, before))
        t0 = time.perf_counter()
        ours, _ = prune_stage(model, prep, PruneOptions(ratio=ratio, round_to=multiple, recover_seconds=args.seconds))
        rows.append(("ours", accuracy(ours, x, y), time.perf_counter() - t0, ours))
        t0 = time.perf_counter()
        measured, how = prune_stage(model, prep, PruneOptions(ratio=ratio, round_to=multiple, recover_seconds=args.seconds,
                                                              allocation="measured"))
        chosen = how.structural["allocation"]["ratios"]
        rows.append(("measured", accuracy(measured, x, y), time.perf_counter() - t0, measured))
        ms = time_modules({"fp32": model, **{name: m for name, _, _, m in rows}}, prep.example, rounds=400)
        speed = {name: ms["fp32"] / v for name, v in ms.items()}
        for name, acc, secs, _ in rows:
            print(f"{ratio:>5.2f} {name:<8} {acc:>8.4f} {100 * (fp32 - acc):>7.2f} {secs:>7.1f} {speed[name]:>7.2f}")
        print(f"      measured cut: {', '.join(f'{k} {v:.0%}' for k, v in chosen.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
