"""Where does a cut cost accuracy, and where does it save time? One block of the shipped trained demo at a time.

    .venv/bin/python bench/prune_sensitivity.py [--ratio 0.25] [--rounds 400]
    sh bench/isa/avx2_only.sh .venv/bin/python bench/prune_sensitivity.py      # with AVX2 kernels and multiple 8

Per-layer pruning ratios need two numbers per block: what cutting it costs (accuracy, fidelity to the unpruned
model) and what it saves on the device. For compress.zoo:shapes_resnet, each top-level block (the stem, each
residual stage; the classifier is never cut) is pruned alone at --ratio with every other block --ignore'd,
widths rounded to the host profile's channel multiple, BatchNorm re-estimated on the 256 calibration samples
(no distillation: a one-forward-per-block probe is what an allocator can afford), then exported and timed
interleaved against fp32 (one intra-op thread, medians of the thread's CPU time). Labels score held-out
accuracy only. A last row cuts every block at once, as `--prune` does today. Prints the CPU it ran on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.evaluate import fidelity, torch_outputs
from compress.models import load_model, prepare_inputs
from compress.pruning.allocate import time_modules
from compress.pruning.recover import recalibrate_batchnorm
from compress.pruning.structural import prune_model
from devices.host import describe_host
from devices.loader import load_profile


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean(model(x).argmax(1).numpy() == y))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "compress.zoo.shapes", "data", "--calib", str(tmp / "calib.npz"), "--eval",
                    str(tmp / "eval.npz")], check=True, capture_output=True)
    loaded = load_model("compress.zoo:shapes_resnet")
    prep = prepare_inputs(loaded, (), str(tmp / "calib.npz"))
    ev = np.load(tmp / "eval.npz")
    x, y = torch.from_numpy(ev["image"]), ev["y"]
    model = loaded.module
    multiple = load_profile("host").pruning.channel_multiple
    blocks = ["stem", *(f"layers.{i}" for i in range(len(model.layers)))]
    reference = torch_outputs(model, prep.held_out)
    fp32 = accuracy(model, x, y)
    modules = {"fp32": model}
    rows = {}
    for name in [*blocks, "all"]:
        ignore = [] if name == "all" else [b for b in blocks if b != name]
        res = prune_model(model, prep.example, ratio=args.ratio, round_to=multiple, ignore=ignore + ["fc"], prune_first_conv=True)
        recalibrate_batchnorm(res.module, prep.train)
        fid = fidelity(reference, torch_outputs(res.module, prep.held_out))
        rows[name] = (accuracy(res.module, x, y), fid["top1_agreement"], res.macs_before / res.macs_after,
                      [f"{layer['before'][1]}->{layer['after'][1]}" for layer in res.layers if layer["name"].endswith("conv1")])
        modules[name] = res.module
    ms = time_modules(modules, prep.example, rounds=args.rounds)
    cpu = describe_host()
    print(f"shapes_resnet, --ratio {args.ratio} one block at a time (others kept), widths rounded to {multiple}, BatchNorm "
          f"re-estimated, no distillation; at least {args.rounds} interleaved rounds; CPU: {cpu['cpu']} ({', '.join(cpu['isa'])})")
    print(f"fp32 accuracy {fp32:.4f}, {ms['fp32']:.3f} ms (1-thr cpu)")
    print("| block cut | accuracy | drop pt | top-1 agree | MACs x | 1-thr ms | ms saved | drop pt per 0.01 ms saved | conv1 widths |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, (acc, agree, macs, widths) in rows.items():
        saved = ms["fp32"] - ms[name]
        drop = 100 * (fp32 - acc)
        per = f"{drop / (saved * 100):.2f}" if saved > 0.001 else "-"
        print(f"| {name} | {acc:.4f} | {drop:.2f} | {agree:.3f} | {macs:.2f} | {ms[name]:.3f} | {saved:.3f} | {per} | "
              f"{', '.join(widths)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
