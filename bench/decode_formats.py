"""Which format pays for generation: a decoder's prefill and per-token decode latency in fp32, dynamic INT8 and
INT4 weight-only, side by side in one interleaved run, with onnxruntime-genai's model builder as the anchor, and
what each format costs in next-token agreement and bits per byte.

    .venv/bin/python bench/decode_formats.py [--threads 1] [--prompt-len 64] [--context-len 192] [--rounds 30]
        [--genai-site DIR]   (onnxruntime-genai installed with `pip install --no-deps --target DIR
                              onnxruntime-genai`; without it the anchor rows say why they are missing)

Models (no hub: both are built here):
(a) latency: a Llama-architecture decoder from its config (random seeded weights): hidden 512, 8 layers, 8 heads
    with 2 KV heads (GQA), MLP 1408, vocab 8000, 2048 positions; 31 M parameters, 124 MB in fp32: large enough
    that a decode step streams its weights from memory, as on a board. Variants: fp32 and INT8/INT4 of our
    export (compress export --with-past: export.generation, opset 23, whose Attention, RotaryEmbedding and
    RMSNormalization onnxruntime runs fused, each Attention taking its KV cache itself: export.attention_past,
    the MatMuls of one activation joined: export.sibling_matmuls; the same at opset 18 beside it), INT8 = onnxruntime's
    quantize_dynamic (the anchor recipe for dynamic INT8), INT4 = compress.quantization.int4.weight_only
    (MatMulNBits, 4 bits, block 32, every MatMul), INT4 mixed = compress.quantize --to int4 --avg-bits 5 (the
    layers whose 4 bits cost most kept at 8, measured on random token ids: the weights are random too), and
    onnxruntime-genai's builder (`-p int4` and `-p fp32`, CPU) on the same weights, which fuses attention with
    the cache (GroupQueryAttention). Every model takes the same feeds, the runner's (runtime/runner.py
    generation_feeds): a prompt of --prompt-len tokens with an empty past (prefill), and one token after
    --context-len tokens of past (decode).
(b) quality: the trained byte-level GPT-2 of bench/train_tiny_gpt2.py (stock config, 4 layers, n_embd 256),
    exported the same way; its INT8 and INT4 variants (the mixed one calibrated on 32 training windows) scored on
    48 held-out windows of 128 bytes of the stdlib's source: bits per byte, and next-token agreement with fp32
    (argmax equal). onnxruntime-genai has no GPT-2.
Latency is the median of interleaved warm bursts (runtime.abtest.interleaved_latency, as compress run times
variants), wall clock and the calling thread's CPU time, one intra-op thread by default.

Run of 2026-12-05 (AMD EPYC, 2 cores, AVX-512 VNNI, onnxruntime 1.32.0, onnxruntime-genai 0.18.0, 78 s):
decode per token vs fp32 (3.75 ms): INT8 2.48x, INT4 3.43x, INT4 mixed 3.14x, INT4 at opset 18 1.80x (fp32 at
opset 18 0.86x), genai int4 3.56x, genai fp32 1.10x; prefill of 64 tokens (17.7 ms): INT8 2.85x, INT4 1.19x,
INT4 mixed 1.22x, genai int4 1.19x. Tiny GPT-2: 2.2370 / 2.2367 / 2.2402 / 2.2385 bits per byte (fp32 / INT8 /
INT4 / INT4 mixed), next-token agreement 99.10% / 97.18% / 98.34%. README "Generation" has the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compress.core import sessions  # noqa: E402
from devices.host import describe_host  # noqa: E402
from runtime.runner import generation_feeds  # noqa: E402

LLAMA = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)


def quantized(fp32: Path, work: Path, calib: np.ndarray, mixed: bool = True) -> dict[str, Path]:
    """INT8 (onnxruntime quantize_dynamic), INT4 (ours: MatMulNBits, block 32, every MatMul) and INT4 mixed by
    salience (compress.quantize --to int4 --avg-bits 5: the layers whose 4 bits cost most kept at 8, measured on
    `calib`, token ids each fed as a prefill) of one exported decoder."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import compress
    from compress.quantization.int4 import quantizable_layers, weight_only

    int8 = work / f"{fp32.stem}.int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    proto = onnx.load(str(fp32))
    int4 = work / f"{fp32.stem}.int4.onnx"
    onnx.save_model(weight_only(proto, {layer.node: 4 for layer in quantizable_layers(proto)}, block_size=32), str(int4))
    if not mixed:
        return {"int8-dynamic": int8, "int4": int4}
    np.savez(work / f"{fp32.stem}.calib.npz", input_ids=calib)
    mixed = work / f"{fp32.stem}.int4-mixed.onnx"
    compress.quantize(fp32, to="int4", avg_bits=5.0, calib=str(work / f"{fp32.stem}.calib.npz"), output=mixed,
                      no_measure=True)
    return {"int8-dynamic": int8, "int4": int4, "int4-mixed": mixed}


def genai(folder: Path, work: Path, site: str | None) -> tuple[dict[str, Path], str]:
    """onnxruntime-genai's builder on the same weights: {variant: model.onnx}, or {} and why not."""
    if not site:
        return {}, "no --genai-site: onnxruntime-genai not installed for this run"
    import os

    out: dict[str, Path] = {}
    for precision in ("int4", "fp32"):
        dst = work / f"genai-{precision}"
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(dst),
                            "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": site}, timeout=1800)
        if r.returncode != 0:
            return out, f"onnxruntime-genai builder -p {precision} failed: {r.stderr.strip().splitlines()[-1:]}"
        out[f"genai-{precision}"] = dst / "model.onnx"
    return out, ""


def build_llama(work: Path) -> tuple[Any, Path]:
    """The Llama-architecture decoder as a Hugging Face folder, with a byte-level BPE tokenizer trained on the
    stdlib (onnxruntime-genai's builder wants one), and the loaded model."""
    import sysconfig

    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    folder = work / "llama-edge"
    model.save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    tok.train([str(f) for f in files], trainers.BpeTrainer(vocab_size=LLAMA["vocab_size"], special_tokens=["<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return model, folder


def latency_table(models: dict[str, Path], pre: dict[str, np.ndarray], dec: dict[str, np.ndarray], threads: int,
                  rounds: int, prompt_len: int) -> None:
    from runtime.abtest import WARM_BURST_MS, interleaved_latency

    sizes = {n: p.stat().st_size + sum(f.stat().st_size for f in p.parent.glob(p.name + ".data")) for n, p in models.items()}
    res = {phase: interleaved_latency({n: str(p) for n, p in models.items()}, feeds=f, threads=threads, rounds=rounds,
                                      min_seconds=2.0, warmup=3, baseline="fp32", burst_ms=WARM_BURST_MS)
           for phase, f in (("prefill", pre), ("decode", dec))}
    print(f"| variant | size MB | prefill ms ({prompt_len} tok) | vs fp32 | decode ms/token | vs fp32 | tokens/s | "
          f"decode cpu ms | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in models:
        p, d = res["prefill"], res["decode"]
        print(f"| {n} | {sizes[n] / 1e6:.1f} | {p.wall_ms[n]:.2f} | {p.speedup(n, 'wall'):.2f}x | {d.wall_ms[n]:.3f} | "
              f"{d.speedup(n, 'wall'):.2f}x | {1000 / d.wall_ms[n]:.0f} | {d.cpu_ms[n]:.3f} | {d.speedup(n, 'cpu'):.2f}x |")


def quality(models: dict[str, Path], windows: np.ndarray) -> None:
    """Bits per byte of each variant on held-out windows (one prefill each), and next-token agreement with fp32."""
    import onnxruntime as ort

    logits: dict[str, np.ndarray] = {}
    for n, p in models.items():
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        heads, dim = (s.get_inputs()[2].shape[1], s.get_inputs()[2].shape[3])
        empty = {i.name: np.zeros((1, heads, 0, dim), np.float32) for i in s.get_inputs()[2:]}
        logits[n] = np.stack([s.run(["logits"], {"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64),
                                                 **empty})[0][0] for w in windows])
    target = windows[:, 1:]
    print("| variant | bits per byte | next-token agreement with fp32 |")
    print("|---|---|---|")
    for n, lg in logits.items():
        z = lg[:, :-1].astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll = -np.take_along_axis(logp, target[..., None], axis=-1).mean()
        agree = (lg.argmax(-1) == logits["fp32"].argmax(-1)).mean()
        print(f"| {n} | {nll / np.log(2):.4f} | {agree:.2%} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--context-len", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--genai-site", help="a folder holding onnxruntime-genai (pip install --no-deps --target DIR)")
    args = ap.parse_args()
    import torch

    from export.generation import export_with_past

    h = describe_host()
    isa = [f for f in ("avx512", "vnni", "avx2", "dotprod") if f in (h.get("isa") or [])]
    print(f"{dt.date.today()}, {h['cpu']} ({h['cores']} cores; ISA {', '.join(isa) or '?'}), onnxruntime "
          f"{h['onnxruntime']}, {args.threads} intra-op thread(s)")
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        work = Path(tmp)
        model, folder = build_llama(work)
        ours = work / "fp32.onnx"
        r = export_with_past(model, torch.randint(0, LLAMA["vocab_size"], (1, 12)), ours, new_tokens=8)
        print(f"\n(a) llama-edge: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
              f"{r.layers} layers, {r.kv_heads} KV heads x {r.head_dim}; greedy tokens of our export match torch "
              f"({r.generation.matched}/{r.generation.new_tokens})")
        ids = np.random.default_rng(0).integers(0, LLAMA["vocab_size"], size=(16, 32))  # random weights: any text
        anchors, why = genai(folder, work, args.genai_site)
        # the same at opset 18 (the exporter's separate ops), to show what opset 23's fused Attention, RotaryEmbedding
        # and RMSNormalization buy
        old = work / "fp32-opset18.onnx"
        export_with_past(model, torch.randint(0, LLAMA["vocab_size"], (1, 12)), old, new_tokens=8, opset=18)
        variants = {"fp32": ours, **quantized(ours, work, ids), "fp32-opset18": old,
                    "int4-opset18": quantized(old, work, ids, mixed=False)["int4"], **anchors}
        # the feeds the runner times a decoder on (every variant takes the same inputs)
        pre, dec = generation_feeds(np, sessions.session(ours), args.prompt_len, args.context_len, seed=0)
        latency_table(variants, pre, dec, args.threads, args.rounds, args.prompt_len)
        if why:
            print(f"onnxruntime-genai rows missing: {why}")
        print("Optimum: not compared; optimum-onnx needs transformers < 5 (pip resolves 4.57.6 against the 5.25 "
              "this project runs), so its exporter cannot be installed beside it.")

        from train_tiny_gpt2 import byte_windows, load_tiny_gpt2, stdlib_split

        gpt2, _ = load_tiny_gpt2()
        tiny = work / "tiny.onnx"
        g = export_with_past(gpt2, torch.tensor([list(b"import os\ndef main(")]), tiny, new_tokens=16)
        print(f"\n(b) tiny GPT-2 (trained, stock config): greedy tokens of our export match torch "
              f"({g.generation.matched}/{g.generation.new_tokens}); 48 held-out windows of 128 bytes")
        train, held = stdlib_split()
        quality({"fp32": tiny, **quantized(tiny, work, byte_windows(train, 32, 128, seed=2))},
                byte_windows(held, 48, 128, seed=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
