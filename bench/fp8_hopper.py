"""FP8 on FP8 hardware: does E4M3FN with our scales pay on a Hopper GPU, and is it as accurate as simulated?

    make bench-deps; .venv/bin/python bench/fp8_hopper.py prepare            # here: writes .fp8kit/ (~46 MB)
    python3 bench/fp8_hopper.py measure --kit .fp8kit [--out DIR]           # on an H100/H200 (torch with CUDA)

The CPU can only simulate FP8 (onnxruntime runs our FP8 QDQ model with fp32 arithmetic), so its latency means
nothing there. This bench runs all-MiniLM-L6-v2 (real weights) on the GPU three ways, each captured in a CUDA
graph and timed interleaved (CUDA events, medians):
- fp32 (TF32 off): the reference for fidelity;
- bf16: what an FP8 engine has to beat;
- fp8: bf16 with every encoder Linear (36 of them: Q, K, V, output, MLP) as a real FP8 GEMM
  (`torch._scaled_mm`, E4M3FN operands, fp32 accumulation) using the scales `compress quantize --to fp8`
  writes into its QDQ model: `compress.quantization.fp8.fp8_scales` of amax, per output channel for weights, per
  tensor for activations from the same calibration sentences. Attention's own matmuls stay bf16 (SDPA).
Fidelity is per-sentence cosine to fp32 on the 32 held-out sentences, for the real FP8 GEMMs and for the same
quantization simulated in fp32 (dequantize, then matmul), so the CPU's simulated figures can be checked against
the hardware. `prepare` runs where the model package is installed; the GPU machine needs only torch,
transformers and safetensors (the kit carries config, fp16 weights, tokenized sentences).
The ResNet-style CNN is not covered: torch has no FP8 convolution outside TensorRT/cuDNN engines.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import SENTENCES, MiniLM  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BATCHES = (1, 32, 256)


def fp8_scales(amax: np.ndarray) -> np.ndarray:
    """The project's scale rule; imported from compress when it imports here, else the same rule restated
    (the GPU machine may lack the project's dependencies: pydantic, onnxruntime's quantizer...)."""
    try:
        from compress.quantization.fp8 import fp8_scales as ours
        return ours(amax, "e4m3fn")
    except ImportError:
        amax = np.asarray(amax, dtype=np.float64)
        return np.where(amax > 0, np.maximum(amax / FP8_MAX, np.finfo(np.float32).tiny), 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ prepare


def prepare(kit: Path) -> None:
    from minilm import minilm_folder, tokenize
    from safetensors.torch import load_file, save_file

    src = minilm_folder()
    kit.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", kit / "config.json")
    weights = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(kit / "model.safetensors"))
    calib, held = tokenize(SENTENCES[:32]), tokenize(SENTENCES[32:])
    np.savez(kit / "tokens.npz", **{f"calib_{k}": v for k, v in calib.items()}, **{f"held_{k}": v for k, v in held.items()})
    print(f"kit written to {kit} ({sum(f.stat().st_size for f in kit.iterdir()) / 1e6:.1f} MB)")


# ------------------------------------------------------------------------------------------------ FP8 linear


class Fp8Linear(nn.Module):
    """y = x W^T + b with x, W in E4M3FN and fp32 accumulation: per-tensor activation scale (static, from
    calibration), per-output-channel weight scales, bf16 output. `simulate` does the same rounding in fp32."""

    def __init__(self, lin: nn.Linear, act_amax: float, simulate: bool, rowwise: bool = True) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        w_amax = w.abs().amax(dim=1) if rowwise else w.abs().amax().expand(w.shape[0])
        w_scale = torch.from_numpy(fp8_scales(w_amax.cpu().numpy())).to(w.device)
        self.register_buffer("w_t", (w / w_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).t())  # (K, N) column-major
        self.register_buffer("w_scale", w_scale.view(1, -1).contiguous())
        self.register_buffer("a_scale", torch.from_numpy(fp8_scales(np.array([act_amax]))).to(w.device).view(1, 1))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.simulate, self.rowwise = simulate, rowwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq = (x2.float() / self.a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if self.simulate:
            y = (xq.float() * self.a_scale) @ (self.w_t.float() * self.w_scale)
            y = y.to(torch.bfloat16)
        elif self.rowwise:
            y = torch._scaled_mm(xq, self.w_t, scale_a=self.a_scale.expand(x2.shape[0], 1).contiguous(),
                                 scale_b=self.w_scale, out_dtype=torch.bfloat16)
        else:
            y = torch._scaled_mm(xq, self.w_t, scale_a=self.a_scale.view(()), scale_b=self.w_scale[0, 0],
                                 out_dtype=torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in f".{n}."}


@torch.no_grad()
def activation_amax(model: nn.Module, feeds: dict[str, torch.Tensor]) -> dict[str, float]:
    amax: dict[str, float] = {}
    hooks = []
    for name, lin in encoder_linears(model).items():
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(lin.register_forward_pre_hook(hook))
    for i in range(feeds["input_ids"].shape[0]):  # one sentence at a time, as compress calibrates
        model(**{k: v[i:i + 1] for k, v in feeds.items()})
    for h in hooks:
        h.remove()
    return amax


def rowwise_supported(dev: torch.device) -> bool:
    """Per-channel weight scales need _scaled_mm's row-wise mode (sm90 + a recent torch); else per-tensor."""
    a = torch.ones(32, 32, device=dev).to(FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(32, 1, device=dev), scale_b=torch.ones(1, 32, device=dev),
                         out_dtype=torch.bfloat16)
        return True
    except Exception as e:
        print(f"  (row-wise FP8 scaling unavailable: {str(e).splitlines()[0][:120]}; per-tensor weight scales)")
        return False


def fp8_model(bf16: nn.Module, amax: dict[str, float], simulate: bool, rowwise: bool = True) -> nn.Module:
    m = copy.deepcopy(bf16)
    for name, lin in encoder_linears(m).items():
        parent, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent), attr, Fp8Linear(lin, amax[name], simulate, rowwise))
    return m


# ------------------------------------------------------------------------------------------------ measure


def cosine(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"cosine_min": float(c.min()), "cosine_mean": float(c.mean())}


def runner(model: nn.Module, feeds: dict[str, torch.Tensor], dev: torch.device) -> tuple[Callable[[], Any], str]:
    """A CUDA graph of one forward pass (no launch overhead: what an inference engine does), eager elsewhere."""
    def call() -> Any:
        return model(**feeds)
    if dev.type != "cuda":
        return call, "eager"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        return g.replay, "cuda graph"
    except Exception as e:  # a data-dependent branch in the model: time it eagerly and say so
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}; eager)")
        torch.cuda.synchronize()
        return call, "eager"


def time_interleaved(fns: dict[str, Callable[[], Any]], dev: torch.device, rounds: int, reps: int) -> dict[str, float]:
    """Median ms of one call, variants alternating each round so clock and thermal drift hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(reps):
                    fn()
                b.record()
                b.synchronize()
                times[k].append(a.elapsed_time(b) / reps)
            else:
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
                times[k].append((time.perf_counter() - t) * 1e3 / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


@torch.no_grad()
def measure(kit: Path, out: Path | None, rounds: int, reps: int, batches: tuple[int, ...], cpu: bool,
            compiled: bool = False) -> dict[str, Any]:
    dev = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    real_fp8 = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tok = np.load(kit / "tokens.npz")
    calib = {k: torch.from_numpy(tok[f"calib_{k}"]).to(dev) for k in ("input_ids", "attention_mask")}
    held = {k: torch.from_numpy(tok[f"held_{k}"]).to(dev) for k in ("input_ids", "attention_mask")}

    fp32 = MiniLM(kit).eval().to(dev)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    amax = activation_amax(fp32, calib)
    variants: dict[str, nn.Module] = {"fp32": fp32, "bf16": bf16}
    rowwise = rowwise_supported(dev) if real_fp8 else True
    if real_fp8:
        variants["fp8"] = fp8_model(bf16, amax, simulate=False, rowwise=rowwise)
    variants["fp8 simulated"] = fp8_model(bf16, amax, simulate=True, rowwise=rowwise)

    ref = fp32(**held)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "real_fp8": real_fp8, "weight_scales": "per channel" if rowwise else "per tensor",
        "fp8_linears": len(encoder_linears(fp32)),
        "fidelity": {k: cosine(ref, m(**held)) for k, m in variants.items() if k != "fp32"},
        "latency_ms": {},
    }
    print(f"device: {report['device']}, torch {torch.__version__}, FP8 tensor cores: {real_fp8}, "
          f"{report['fp8_linears']} encoder Linears in FP8")
    print("\n| variant | cos min | cos mean |\n|---|---|---|")
    for k, f in report["fidelity"].items():
        print(f"| {k} | {f['cosine_min']:.4f} | {f['cosine_mean']:.4f} |")

    if real_fp8:
        report["gemm_us"] = gemm_table(dev, rowwise, rounds, reps, tuple(b * 128 for b in batches))
    if compiled and real_fp8:  # Inductor fuses each activation quantize into the op before it
        for k in ("bf16", "fp8"):
            variants[f"{k} compiled"] = torch.compile(variants[k], dynamic=False)
    timed = [k for k in variants if k != "fp8 simulated"]
    print("\n| batch x 128 tokens | " + " | ".join(f"{k} ms" for k in timed) + " | fp8 vs bf16 | how |")
    print("|---" * (len(timed) + 3) + "|")
    for b in batches:
        idx = torch.arange(b, device=dev) % held["input_ids"].shape[0]
        feeds = {k: v[idx].contiguous() for k, v in held.items()}
        fns, how = {}, set()
        for k in timed:
            fn, h = runner(variants[k], feeds, dev)
            fns[k] = fn
            how.add(h)
        ms = time_interleaved(fns, dev, rounds, reps)
        report["latency_ms"][str(b)] = {**ms, "how": sorted(how)}
        ratio = f"{ms['bf16'] / ms['fp8']:.2f}x" if "fp8" in ms else "-"
        if "fp8 compiled" in ms:
            ratio += f" (compiled {ms['bf16 compiled'] / ms['fp8 compiled']:.2f}x)"
        print(f"| {b} | " + " | ".join(f"{ms[k]:.3f}" for k in timed) + f" | {ratio} | {', '.join(sorted(how))} |")
        del fns
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp8_hopper.json").write_text(json.dumps(report, indent=2))
    return report


GEMMS_PER_GRAPH = 50


def graphed(op: Callable[[], Any], times: int, dev: torch.device) -> Callable[[], Any]:
    """`times` back-to-back calls of op as one CUDA graph replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(times):
            op()
    return g.replay


@torch.no_grad()
def gemm_table(dev: torch.device, rowwise: bool, rounds: int, reps: int, ms: tuple[int, ...]) -> dict[str, Any]:
    """The FP8 GEMMs alone against bf16, on MiniLM's Linear shapes: what the tensor cores give once the
    activation quantize is fused into the kernel before it (as an engine does), so it is left out here."""
    shapes = {"q/k/v/out 384->384": (384, 384), "mlp up 384->1536": (384, 1536), "mlp down 1536->384": (1536, 384)}
    rows: dict[str, Any] = {}
    print("\n| GEMM (K->N) | M (tokens) | bf16 us | fp8 us | fp8 vs bf16 |\n|---|---|---|---|---|")
    for label, (k, n) in shapes.items():
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            xq, wq = x.float().clamp(-448, 448).to(FP8), w.float().clamp(-448, 448).to(FP8).t()
            sa = torch.ones(m, 1, device=dev) if rowwise else torch.ones((), device=dev)
            sb = torch.ones(1, n, device=dev) if rowwise else torch.ones((), device=dev)
            ops = {"bf16": lambda: x @ w.t(),
                   "fp8": lambda: torch._scaled_mm(xq, wq, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)}
            fns = {k: graphed(op, GEMMS_PER_GRAPH, dev) for k, op in ops.items()}  # launch overhead out
            t = {k: v / GEMMS_PER_GRAPH for k, v in time_interleaved(fns, dev, rounds, reps).items()}
            rows[f"{label} M={m}"] = t
            print(f"| {label} | {m} | {t['bf16'] * 1e3:.1f} | {t['fp8'] * 1e3:.1f} | {t['bf16'] / t['fp8']:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--kit", type=Path, default=ROOT / ".fp8kit")
    m = sub.add_parser("measure")
    m.add_argument("--kit", type=Path, default=ROOT / ".fp8kit")
    m.add_argument("--out", type=Path)
    m.add_argument("--rounds", type=int, default=30)
    m.add_argument("--reps", type=int, default=10)
    m.add_argument("--batches", default=",".join(map(str, BATCHES)))
    m.add_argument("--cpu", action="store_true", help="run the code path on the CPU (no FP8 timing): a dry run")
    m.add_argument("--compile", action="store_true", help="also time bf16 and fp8 compiled by torch.compile (Inductor)")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.kit)
    else:
        measure(a.kit, a.out, a.rounds, a.reps, tuple(int(x) for x in a.batches.split(",")), a.cpu, a.compile)


if __name__ == "__main__":
    main()
