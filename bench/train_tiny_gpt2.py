"""A tiny byte-level GPT-2 trained on the Python standard library's own source, for the INT4 benchmarks.

    .venv/bin/python bench/train_tiny_gpt2.py [--steps N] [--threads 1] [--seed 0]

Why: bench/quant_int4.py and bench/int4_inc.py rank layers by salience and compare INT4 methods; a GPT-2 with
random weights says little about that, since trained weights grow the outliers that make layers (and rounding
methods) differ. No model hub is reachable from here, so this trains one small enough for a 2-core CPU:
transformers GPT2LMHeadModel, n_layer 4, n_embd 256, n_head 4, n_positions 128, vocab 256 (input = raw UTF-8
bytes, byte 0 separates files), dropout 0, tied LM head.
Corpus: every .py file under sysconfig.get_paths()['stdlib'] except site-packages (third-party, differs per
machine), sorted by path and concatenated; the last 5% of bytes are the validation part (stdlib_split()).
Training: seeded (torch.manual_seed, numpy default_rng), batches of 32 x 128 bytes at random offsets of the
training part, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup then cosine to 10% of the
peak learning rate, gradient clipping at 1.0; one intra-op thread by default (the machine is shared).
Output: bench/weights/tiny_gpt2_stdlib.safetensors, fp16 tensors (lm_head.weight left out: it is tied to
transformer.wte.weight, load_tiny_gpt2() puts it back) with the GPT2Config as JSON, the validation loss in bits
per byte and the run's settings as safetensors metadata; written to a temporary file, then os.replace.

Run of 2026-11-27 with the defaults (`.venv/bin/python bench/train_tiny_gpt2.py`: 500 steps, seed 0, peak lr 2e-3,
one thread) on the shared 2-core AMD EPYC: 15 min 52 s wall (946 s inside the script, 706 s of CPU: the job got 75%
of a core next to a colleague's tests and this session's own benchmark runs; unloaded it measured ~1.45 s per step,
~13 min in all). Corpus: 1790 files of Python 3.11.7, 31,527,013 bytes (29,950,663 train, 1,576,350 validation).
Validation loss (16 fixed batches of 32x128 from the validation part), bits per byte: 7.15 after step 1, 3.38 at
100, 2.91 at 200, 2.57 at 300, 2.36 at 400, 2.227 at 500 (1.5435 nats; train 2.29 over the last 100 steps) -- still
falling, so more steps would help, but the model is for quantization benchmarks, not for text. The file is 6.52 MB:
3,257,856 parameters at 2 bytes (this architecture cannot be much smaller in fp16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny_gpt2_stdlib.safetensors"
SEQ = 128
BATCH = 32
VAL_FRACTION = 0.05
SEPARATOR = b"\x00"  # between files; byte 0 does not occur in the stdlib's sources
EVAL_BATCHES = 16  # fixed validation batches: 16 x 32 x 128 = 65536 bytes
DEFAULT_STEPS = 500  # ~1.45 s per step on one thread of this AMD EPYC, plus ~6 s per evaluation: ~13-14 min
CONFIG = dict(n_layer=4, n_embd=256, n_head=4, n_positions=SEQ, vocab_size=256, bos_token_id=0, eos_token_id=0,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted: the same list on every run of the same Python install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file())


def stdlib_split() -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) uint8 arrays: the sorted files' bytes joined by byte 0, the last 5% held out."""
    data = np.frombuffer(SEPARATOR.join(p.read_bytes() for p in stdlib_files()), dtype=np.uint8)
    n_val = int(len(data) * VAL_FRACTION)
    return data[:-n_val], data[-n_val:]


def byte_windows(data: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """n windows of `length` bytes at distinct seeded offsets of `data`, as int64 [n, length] token ids."""
    offsets = np.random.default_rng(seed).choice(len(data) - length, size=n, replace=False)
    return np.stack([data[o:o + length] for o in offsets]).astype(np.int64)


def load_tiny_gpt2(path: Path = WEIGHTS) -> tuple[Any, dict[str, str]]:
    """The trained model in fp32 (eval mode) and the file's metadata; SystemExit saying how to make it if absent."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    if not path.exists():
        raise SystemExit(f"{path} is missing: train it first with `.venv/bin/python bench/train_tiny_gpt2.py` "
                         f"(about 15 minutes on one thread)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "config" not in meta:
        raise SystemExit(f"{path}: no GPT2Config in its metadata; retrain it with bench/train_tiny_gpt2.py")
    model = GPT2LMHeadModel(GPT2Config.from_dict(json.loads(meta["config"])))
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    if "lm_head.weight" not in state and model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: saved once
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine down to 10% of it at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model: Any, batches: np.ndarray) -> float:
    """Mean next-byte cross-entropy (nats) over fixed validation batches [B, BATCH, SEQ]."""
    model.eval()
    losses = [float(model(input_ids=torch.from_numpy(b), labels=torch.from_numpy(b), use_cache=False).loss)
              for b in batches]
    model.train()
    return float(np.mean(losses))


def save(model: Any, path: Path, meta: dict[str, str]) -> None:
    """fp16 tensors plus metadata, atomically: a crash never leaves a half-written weights file behind."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; it is a repository file like any other
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    train, val = stdlib_split()
    print(f"corpus: {len(stdlib_files())} files, {len(train) + len(val):,} bytes; train {len(train):,}, "
          f"validation {len(val):,} (last {VAL_FRACTION:.0%})", flush=True)
    val_batches = byte_windows(val, EVAL_BATCHES * BATCH, SEQ, seed=12345).reshape(EVAL_BATCHES, BATCH, SEQ)
    config = GPT2Config(**CONFIG)
    model = GPT2LMHeadModel(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, min(100, args.steps // 10))
    print(f"{n_params:,} parameters; {args.steps} steps of {BATCH}x{SEQ}, peak lr {args.lr:g}, warmup {warmup}, "
          f"{args.threads} thread(s)", flush=True)
    running, t_train = [], time.perf_counter()
    val_loss = float("nan")
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup)
        offsets = rng.integers(0, len(train) - SEQ, size=BATCH)
        x = torch.from_numpy(np.stack([train[o:o + SEQ] for o in offsets]).astype(np.int64))
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last or step + 1 in (1, 10):
            val_loss = evaluate(model, val_batches)
            el = time.perf_counter() - t_train
            print(f"step {step + 1:5d}  train {np.mean(running):.4f} nats ({np.mean(running) / math.log(2):.3f} bpb)  "
                  f"val {val_loss:.4f} nats ({val_loss / math.log(2):.3f} bpb)  {el:.0f} s ({el / (step + 1):.2f} s/step)",
                  flush=True)
            running = []
    bpb = val_loss / math.log(2)
    seconds = time.perf_counter() - t0
    meta = {"config": config.to_json_string(use_diff=False), "val_bits_per_byte": f"{bpb:.4f}",
            "val_loss_nats": f"{val_loss:.4f}", "steps": str(args.steps), "seed": str(args.seed),
            "batch": f"{BATCH}x{SEQ}", "peak_lr": f"{args.lr:g}", "train_seconds": f"{seconds:.0f}",
            "corpus": f"sorted .py files of the Python {sys.version.split()[0]} stdlib (no site-packages), "
                      f"joined by byte 0, last {VAL_FRACTION:.0%} = validation"}
    save(model, args.out, meta)
    print(f"val {bpb:.4f} bits per byte after {args.steps} steps, {seconds:.0f} s in all; wrote {args.out} "
          f"({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
