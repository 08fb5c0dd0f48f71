"""How much faster can INT8 be than FP32 on this CPU at all? onnxruntime's own kernels, one op at a time.

    .venv/bin/python bench/int8_ceiling.py [--rounds 60]
    sh bench/isa/avx2_only.sh .venv/bin/python bench/int8_ceiling.py     # the same CPU with only AVX2 kernels

A quantized model can only be as much faster than fp32 as its GEMMs and convolutions are, less what Q/DQ and the
ops left in fp32 cost. This times the layers that carry the benchmark models' time, each alone, fp32 against
the integer kernel a quantized model runs (MLAS QGEMM for MatMulInteger, MLAS's quantized conv for QLinearConv),
with uint8 x int8 (what the x86 presets use), int8 x int8 and uint8 x uint8:
- all-MiniLM-L6-v2's projections at sequence length 128 (384x384, 384x1536, 1536x384);
- resnet_demo's 3x3 convolutions at 224x224 (64 channels at 56x56 down to 512 at 7x7), and its 7x7 stem.
Everything is timed interleaved in one process at one intra-op thread: medians of the calling thread's CPU time.
The table's last column is the ceiling a whole model's INT8 speedup cannot pass (bench/quant_int8.py measures
the models). Prints the CPU and its ISA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from devices.host import describe_host
from runtime.abtest import interleaved_latency

GEMMS = [("minilm qkv/out 128x384 @ 384x384", 128, 384, 384), ("minilm ffn-up 128x384 @ 384x1536", 128, 384, 1536),
         ("minilm ffn-down 128x1536 @ 1536x384", 128, 1536, 384)]
# name, in channels, out channels, spatial size, kernel, stride
CONVS = [("resnet stem 7x7/2 3->64 @224", 3, 64, 224, 7, 2), ("resnet 3x3 64->64 @56", 64, 64, 56, 3, 1),
         ("resnet 3x3 128->128 @28", 128, 128, 28, 3, 1), ("resnet 3x3 256->256 @14", 256, 256, 14, 3, 1),
         ("resnet 3x3 512->512 @7", 512, 512, 7, 3, 1)]
TYPES = {"u8s8": (TensorProto.UINT8, TensorProto.INT8), "s8s8": (TensorProto.INT8, TensorProto.INT8),
         "u8u8": (TensorProto.UINT8, TensorProto.UINT8)}
NP = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def _save(nodes: list, inputs: list, outputs: list, inits: list, path: Path) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _ints(rng: np.random.Generator, shape: tuple[int, ...], t: int) -> np.ndarray:
    lo, hi = (0, 255) if t == TensorProto.UINT8 else (-127, 127)
    return rng.integers(lo, hi, shape, endpoint=True).astype(NP[t])


def gemm_models(work: Path, m: int, k: int, n: int, rng: np.random.Generator) -> dict[str, Path]:
    out = {"fp32": _save([helper.make_node("MatMul", ["xf", "w"], ["y"])],
                         [helper.make_tensor_value_info("xf", TensorProto.FLOAT, [m, k])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                         [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")], work / "mm_fp32.onnx")}
    for name, (a, b) in TYPES.items():
        out[name] = _save([helper.make_node("MatMulInteger", [f"x{a}", "w"], ["y"])],
                          [helper.make_tensor_value_info(f"x{a}", a, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                          [numpy_helper.from_array(_ints(rng, (k, n), b), "w")], work / f"mm_{name}.onnx")
    return out


def conv_models(work: Path, cin: int, cout: int, hw: int, kernel: int, stride: int, rng: np.random.Generator) -> dict[str, Path]:
    pads = [kernel // 2] * 4
    ho = (hw + 2 * (kernel // 2) - kernel) // stride + 1
    attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": pads}
    out = {"fp32": _save([helper.make_node("Conv", ["xf", "w", "b"], ["y"], **attrs)],
                         [helper.make_tensor_value_info("xf", TensorProto.FLOAT, [1, cin, hw, hw])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, ho, ho])],
                         [numpy_helper.from_array(rng.standard_normal((cout, cin, kernel, kernel)).astype(np.float32), "w"),
                          numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")], work / "conv_fp32.onnx")}
    for name, (a, b) in TYPES.items():
        zp_a = 128 if a == TensorProto.UINT8 else 0
        zp_b = 128 if b == TensorProto.UINT8 else 0
        inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(zp_a, NP[a]), "xz"),
                 numpy_helper.from_array(_ints(rng, (cout, cin, kernel, kernel), b), "w"),
                 numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),  # per channel, as our presets
                 numpy_helper.from_array(np.full(cout, zp_b, NP[b]), "wz"),
                 numpy_helper.from_array(np.array(0.5, np.float32), "ys"), numpy_helper.from_array(np.array(zp_a, NP[a]), "yz"),
                 numpy_helper.from_array(rng.integers(-1000, 1000, cout).astype(np.int32), "b")]
        node = helper.make_node("QLinearConv", [f"x{a}", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"], **attrs)
        out[name] = _save([node], [helper.make_tensor_value_info(f"x{a}", a, [1, cin, hw, hw])],
                          [helper.make_tensor_value_info("y", a, [1, cout, ho, ho])], inits, work / f"conv_{name}.onnx")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    h = describe_host()
    print(f"{dt.date.today()}, {h['cpu']} ({', '.join(h['isa'])}), onnxruntime {h['onnxruntime']}; 1 intra-op thread, "
          f"medians of thread CPU time over {args.rounds} interleaved rounds")
    print(f"| layer | fp32 ms | {' | '.join(f'{t} ms' for t in TYPES)} | {' | '.join(f'{t} x' for t in TYPES)} |")
    print("|---|---:|" + "---:|" * (2 * len(TYPES)))
    rng = np.random.default_rng(0)
    rows = [(n, gemm_models, (m, k, nn)) for n, m, k, nn in GEMMS] + [(n, conv_models, rest) for n, *rest in CONVS]
    for name, build, shape in rows:
        with tempfile.TemporaryDirectory() as tmp:
            models = build(Path(tmp), *shape, rng)
            sess_feeds: dict[str, np.ndarray] = {}
            for path in models.values():
                inp = onnx.load(str(path)).graph.input[0]
                dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
                t = inp.type.tensor_type.elem_type
                sess_feeds[inp.name] = (rng.standard_normal(dims).astype(np.float32) if t == TensorProto.FLOAT
                                        else _ints(rng, tuple(dims), t))
            res = interleaved_latency(models, feeds=sess_feeds, threads=1, rounds=args.rounds, min_seconds=2.0)
        ms = " | ".join(f"{res.cpu_ms[t]:.3f}" for t in TYPES)
        ratio = " | ".join(f"{res.speedup(t):.2f}" for t in TYPES)
        print(f"| {name} | {res.cpu_ms['fp32']:.3f} | {ms} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
