"""Weight-only INT4 with salience-driven mixed precision against uniform 4-bit and 8-bit: size, speed, fidelity.

    .venv/bin/python bench/quant_int4.py [--rounds 30] [--skip-gpt2] [--skip-text]

Variants (all from compress.quantization.int4, MatMulNBits with accuracy_level 4, block 32, except the last):
fp32; uniform INT4; uniform 8-bit weight-only; ours mixed at --avg-bits 6 (nominal weight bits, as in the "avg
bits" column: scales and zero points not counted); ours mixed under a --budget-mb halfway between the uniform
INT4 and uniform 8-bit files; and for reference our dynamic INT8 (compress.quantization.int8.quantize_int8, host
profile), which quantizes activations too.
(a) all-MiniLM-L6-v2, real weights, built and exported exactly as bench/quant_int8.py's bench_text does (seq 128);
    salience on 16 of its calibration sentences, per-sentence cosine to fp32 on the 32 held-out ones.
(b) a tiny byte-level GPT-2 with trained weights (transformers GPT2LMHeadModel, n_layer 4, n_embd 256, n_head 4,
    vocab 256 = raw UTF-8 bytes, tied LM head), trained on the Python standard library's own .py sources by
    bench/train_tiny_gpt2.py, which writes bench/weights/tiny_gpt2_stdlib.safetensors (val loss in bits per byte
    in its metadata, printed in the table title); input_ids 1x64, logits out. Trained weights have the outliers
    that make layers differ in salience, which random ones lack. Data: 48 windows of 64 bytes at seeded offsets
    of the corpus's validation part (the last 5%, never trained on): 16 for salience, 32 held out.
Latency: runtime.abtest.interleaved_latency, all variants of a model interleaved in one process: 1-thread
medians of the calling thread's CPU time, and wall-clock medians at the host profile's threads.
Goals: uniform INT4 4-7x smaller than fp32 on the MatMul weights; mixed at the same or smaller size than its
budget with per-sample cosine min above uniform INT4's; INT4 not slower than fp32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compress.core.onnxgraph import save_model
from compress.evaluate.compare import fidelity, onnx_outputs
from compress.quantization.int4 import MB, average_bits, model_bytes, quantizable_layers, quantize_int4, weight_only
from compress.quantization.int8 import quantize_int8
from devices.host import describe_host
from devices.loader import load_profile
from export.onnx_export import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import SENTENCES, SEQ, MiniLM, minilm_folder  # noqa: E402
from quant_int8 import CALIB_SAMPLES, per_sample, time_all  # noqa: E402
from train_tiny_gpt2 import WEIGHTS, byte_windows, load_tiny_gpt2, stdlib_split  # noqa: E402

SALIENCE_FEEDS = 16
BLOCK = 32
AVG_BITS = 6.0
GPT2_SEQ = 64  # bytes per GPT-2 sample
GPT2_HELD = 32
GPT2_SEED = 0  # the offsets of the GPT-2 samples in the validation part


def variants(work: Path, fp32: Path, calib: list[dict[str, np.ndarray]], held: list[dict[str, np.ndarray]],
             int8_calib: Any) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Build every variant of `fp32`; returns their paths and, per variant, size/avg-bits/what was chosen."""
    proto = onnx.load(str(fp32))
    layers = [l for l in quantizable_layers(proto) if not l.shared_with]
    paths: dict[str, Path] = {"fp32": fp32}
    info: dict[str, dict[str, Any]] = {"fp32": {"avg_bits": 32.0}}
    for bits in (4, 8):
        name = f"uniform int{bits} (weight-only)"
        paths[name] = work / f"{fp32.stem}_u{bits}.onnx"
        if bits == 4:
            rep = quantize_int4(fp32, paths[name], calib, held, block_size=BLOCK)
            info[name] = {"avg_bits": rep["avg_bits"], "upgrades": ""}
        else:
            save_model(weight_only(proto, {l.node: 8 for l in layers}, BLOCK), paths[name])
            info[name] = {"avg_bits": average_bits(layers, {l.node: 8 for l in layers})}
    budget = (model_bytes(paths["uniform int4 (weight-only)"]) + model_bytes(paths["uniform int8 (weight-only)"])) / 2 / MB
    for name, kw in ((f"ours mixed --avg-bits {AVG_BITS:g}", {"avg_bits": AVG_BITS}),
                     (f"ours mixed --budget-mb {budget:.2f}", {"budget_mb": budget}),
                     (f"ours mixed --budget-mb {budget:.2f} --salience proxy", {"budget_mb": budget, "salience_from": "proxy"})):
        paths[name] = work / f"{fp32.stem}_{'avg' if 'avg_bits' in kw else 'mb'}_{kw.get('salience_from', 'measured')}.onnx"
        rep = quantize_int4(fp32, paths[name], calib[:SALIENCE_FEEDS], held, block_size=BLOCK, **kw)
        info[name] = {"avg_bits": rep["avg_bits"], "counts": rep["counts"], "seconds": rep["seconds"],
                      "above4": [(r["node"], r["bits"]) for r in rep["layers"] if r["bits"] != 4]}
    paths["int8 dynamic (ours, reference)"] = work / f"{fp32.stem}_int8.onnx"
    quantize_int8(fp32, paths["int8 dynamic (ours, reference)"], load_profile("host"), int8_calib)
    info["int8 dynamic (ours, reference)"] = {"avg_bits": None}
    fp32_w = sum(l.nbytes(32, BLOCK) for l in layers)
    info["_matmul_ratio"] = fp32_w / sum(l.nbytes(4, BLOCK) for l in layers)
    return paths, info


def table(title: str, paths: dict[str, Path], info: dict[str, dict[str, Any]], held: list[dict[str, np.ndarray]],
          rounds: int) -> dict[str, dict[str, Any]]:
    ref = onnx_outputs(paths["fp32"], held)
    fid = {n: fidelity(ref, onnx_outputs(p, held)) for n, p in paths.items()}
    one, full = time_all(paths, held[0], rounds)
    threads = load_profile("host").threads
    print(f"\n{title}; {one.rounds} interleaved rounds")
    print(f"| variant | size MB | avg bits | 1-thr cpu ms | speedup | {threads}-thr wall ms | speedup | cos min | 1 - cos min | cos mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, p in paths.items():
        ab = info[n].get("avg_bits")
        print(f"| {n} | {model_bytes(p) / MB:.2f} | {'-' if ab is None else f'{ab:.2f}'} | {one.cpu_ms[n]:.2f} | "
              f"{one.speedup(n):.2f}x | {full.wall_ms[n]:.2f} | {full.speedup(n, 'wall'):.2f}x | "
              f"{fid[n]['cosine_min']:.4f} | {1 - fid[n]['cosine_min']:.2e} | {fid[n]['cosine_mean']:.4f} |")
    for n, i in info.items():
        if isinstance(i, dict) and "above4" in i:
            print(f"{n}: {i['counts']}, above 4 bits: {', '.join(f'{a} ({b})' for a, b in i['above4']) or 'none'}; "
                  f"{i['seconds']} s")
    return {n: {"fid": fid[n], "size": model_bytes(p), "speedup": one.speedup(n)} for n, p in paths.items()}


def goals(tag: str, res: dict[str, dict[str, Any]], info: dict[str, dict[str, Any]]) -> list[str]:
    u4 = res["uniform int4 (weight-only)"]
    out = [f"{tag} uniform INT4 MatMul weights {info['_matmul_ratio']:.2f}x smaller than fp32 (goal 4-7x): "
           f"{'ok' if 4 <= info['_matmul_ratio'] <= 7 else 'MISSED'}; whole file {res['fp32']['size'] / u4['size']:.2f}x",
           f"{tag} uniform INT4 1-thread speedup vs fp32 {u4['speedup']:.2f}x: {'ok' if u4['speedup'] >= 1 else 'MISSED'}"]
    for n, r in res.items():
        if n.startswith("ours mixed"):
            better = r["fid"]["cosine_min"] > u4["fid"]["cosine_min"]
            out.append(f"{tag} {n}: 1 - cosine min {1 - r['fid']['cosine_min']:.2e} vs uniform INT4 "
                       f"{1 - u4['fid']['cosine_min']:.2e} "
                       f"({'ok' if better else 'MISSED'}), {r['size'] / MB:.2f} MB")
    return out


def bench_minilm(work: Path, rounds: int) -> list[str]:
    from transformers import AutoTokenizer

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tok(SENTENCES, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    enc = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    calib = {k: v[:CALIB_SAMPLES] for k, v in enc.items()}
    held = per_sample({k: v[CALIB_SAMPLES:] for k, v in enc.items()})
    fp32 = work / "minilm_fp32.onnx"
    export_onnx(MiniLM(folder).eval(), {k: torch.from_numpy(v[:1]) for k, v in calib.items()}, fp32)
    npz = work / "minilm_calib.npz"
    np.savez(npz, **calib)
    paths, info = variants(work, fp32, per_sample(calib), held, npz)
    res = table(f"(a) all-MiniLM-L6-v2 (real weights) 1x{SEQ}: salience on {SALIENCE_FEEDS} calibration sentences, "
                f"per-sentence cosine to fp32 on {len(held)} held-out ones", paths, info, held, rounds)
    return goals("(a)", res, info)


class Logits(torch.nn.Module):
    """input_ids -> logits only (no KV cache): one output tensor, as export_onnx and the fidelity figures want."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False).logits


def gpt2_bench_data(weights: Path = WEIGHTS) -> tuple[Logits, np.ndarray, dict[str, str]]:
    """The trained tiny GPT-2 (fp32, eval) behind Logits, SALIENCE_FEEDS + GPT2_HELD byte windows [n, GPT2_SEQ] of
    the corpus's validation part (the first SALIENCE_FEEDS calibrate), and the weights file's metadata.
    Shared with bench/int4_inc.py so both benchmarks quantize and score the same model on the same bytes."""
    model, meta = load_tiny_gpt2(weights)
    _, val = stdlib_split()
    return Logits(model).eval(), byte_windows(val, SALIENCE_FEEDS + GPT2_HELD, GPT2_SEQ, GPT2_SEED), meta


def bench_gpt2(work: Path, rounds: int) -> list[str]:
    model, ids, meta = gpt2_bench_data()
    cfg = model.m.config
    fp32 = work / "gpt2_fp32.onnx"
    export_onnx(model, {"input_ids": torch.from_numpy(ids[:1])}, fp32)
    calib, held = per_sample({"input_ids": ids[:SALIENCE_FEEDS]}), per_sample({"input_ids": ids[SALIENCE_FEEDS:]})
    paths, info = variants(work, fp32, calib, held, {"input_ids": ids[:SALIENCE_FEEDS]})
    res = table(f"(b) tiny GPT-2, weights trained on stdlib source (n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, "
                f"byte vocab {cfg.vocab_size}, val {meta.get('val_bits_per_byte', '?')} bits/byte) 1x{GPT2_SEQ} -> "
                f"logits: salience on {SALIENCE_FEEDS} validation byte windows, per-sample cosine of the logits on "
                f"{len(held)} others", paths, info, held, rounds)
    return goals("(b)", res, info)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-gpt2", action="store_true")
    args = ap.parse_args()
    h = describe_host()
    print(f"{dt.date.today()}, {h['cpu']} ({h['cores']} cores), onnxruntime {h['onnxruntime']}, host profile "
          f"threads {load_profile('host').threads}; INT4 block {BLOCK}, MatMulNBits accuracy_level 4")
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-int4-") as tmp:
        if not args.skip_text:
            out += bench_minilm(Path(tmp), args.rounds)
        if not args.skip_gpt2:
            out += bench_gpt2(Path(tmp), args.rounds)
    print("\ngoals:")
    for g in out:
        print("  " + g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
