"""Weight-only 4-bit: INC's RTN and GPTQ (torch) against ours (onnxruntime MatMulNBits) -- which won?

    .venv/bin/python bench/int4_inc.py [--skip-text] [--skip-gpt2] [--weights bench/weights/tiny_gpt2_stdlib.safetensors]

Why: compress.quantization.int4 rounds to nearest (RTN) and buys fidelity with bytes (salience-driven 4/8-bit/float per
layer). GPTQ buys fidelity with calibration instead, at the same 4 bits. This puts both next to each other on the
same models, data, layers and group size, so the question "is GPTQ's gain worth wiring into our ONNX path, or
does mixed precision already get more for its bytes" has a measured answer.

Models and data are exactly bench/quant_int4.py's:
(a) all-MiniLM-L6-v2 (real weights, bench/minilm.py's MiniLM: BERT + mean pooling + L2 norm), its 64 sentences
    tokenized to 1x128; the first 16 calibrate (GPTQ's Hessians, our salience), the last 32 are held out.
(b) the tiny byte-level GPT-2 trained on the stdlib's source by bench/train_tiny_gpt2.py (logits out), 48 byte
    windows of length 64 from the corpus's validation part: 16 calibrate, 32 held out.
Methods, all 4-bit, group/block 32 along the input dimension, asymmetric (zero point per group), fp32 scales:
  1. INC RTN (neural_compressor.torch.quantization RTNConfig, prepare/convert), evaluated in torch;
  2. INC GPTQ (GPTQConfig; percdamp 0.01, no act_order, INC's other defaults), calibrated on the 16 samples one
     at a time, evaluated in torch;
  3. ours uniform INT4 (compress.quantization.int4.quantize_int4, block 32, no budget) in onnxruntime on the ONNX that
     export.onnx_export.export_onnx writes; MatMulNBits accuracy_level 4 (our default: activations are
     quantized to int8 per block inside the kernel) and, to separate that from the weight rounding,
     accuracy_level 0 (fp32 activations);
  4. ours mixed under bench/quant_int4.py's --budget-mb (halfway between the uniform 4-bit and 8-bit files),
     salience measured on the 16 calibration samples; onnxruntime;
  5. INC's integer weights, scales and zero points (RTN and GPTQ) written into our uniform-INT4 ONNX's
     MatMulNBits initializers: whether GPTQ's result survives the trip into our deployment format. The RTN one
     doubles as a check of the packing (it must match row 3).
The reference for every cosine is the torch fp32 model; the "fp32 ONNX" row shows what export alone costs, and
the last column gives onnxruntime rows against the fp32 ONNX (bench/quant_int4.py's reference).
Layers: INC quantizes the nn.Linear / transformers Conv1D modules and skips lm_head by default
(quant_lm_head=False); ours quantizes the MatMul/Gemm nodes with a constant weight and leaves a weight shared with
a Gather (GPT-2's tied lm_head) in float. The script maps ONNX nodes to torch modules by their weights and prints
both sets: they must be the same, and any difference is reported.
Times: quantization only (ours: quantize_int4's wall time, which includes its own held-out fidelity pass and,
for mixed, one model per layer for salience); one torch/onnxruntime intra-op thread (shared 2-core machine).

Run of 2026-12-03 (167 s; tables in the README's INT4 section): GPTQ beats RTN at the same bytes on both models
(1 - cos min 1.40x smaller on MiniLM, 4.6x on the GPT-2), and its integers keep that gain inside our MatMulNBits
files (0.97853 vs 0.97107 at accuracy level 4 on MiniLM); INC's RTN and onnxruntime's agree to within 5 of 10.6
million integers. Our salience mix, for 4.7% (MiniLM) or 27% (GPT-2) more bytes than uniform 4-bit, cuts the
error 3.9x and 8.8x: more than GPTQ does, at a price in bytes that GPTQ does not pay.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import io
import logging
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minilm import SENTENCES, MiniLM, minilm_folder, tokenize  # noqa: E402
from quant_int4 import BLOCK, SALIENCE_FEEDS, gpt2_bench_data  # noqa: E402
from quant_int8 import CALIB_SAMPLES, per_sample  # noqa: E402
from train_tiny_gpt2 import WEIGHTS  # noqa: E402

from compress.core.onnxgraph import save_model  # noqa: E402
from compress.evaluate.compare import fidelity, onnx_outputs, torch_outputs  # noqa: E402
from compress.quantization.int4 import MB, model_bytes, quantizable_layers, quantize_int4, weight_only  # noqa: E402
from devices.host import describe_host  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402

BITS = 4
Feeds = list[dict[str, np.ndarray]]


@contextlib.contextmanager
def inc_quietly() -> Any:
    """INC logs every layer at INFO and prints op-type tables: keep the report to the tables below."""
    logging.disable(logging.WARNING)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        logging.disable(logging.NOTSET)


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def ort_1thread() -> Any:
    """onnxruntime session options with one intra-op thread: the machine's other core belongs to a colleague."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return o


def to_torch(feed: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}


def inc_rtn(fp32: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    """INC RTN 4-bit, group 32, asymmetric, on a copy. use_layer_wise=False: INC 3.10's RTNConfig defaults it to
    True, which wants a checkpoint path (it falls back with a warning without one)."""
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare

    cfg = RTNConfig(bits=BITS, group_size=BLOCK, use_sym=False, use_layer_wise=False)
    t0 = time.perf_counter()
    with inc_quietly():
        q = convert(prepare(copy.deepcopy(fp32), cfg))
    return q.eval(), time.perf_counter() - t0


def inc_gptq(fp32: torch.nn.Module, calib: Feeds) -> tuple[torch.nn.Module, float]:
    """INC GPTQ 4-bit, group 32, asymmetric, on a copy; the calibration samples go through prepare()'s hooks one
    forward each (INC caches the first transformer block's inputs and quantizes block by block).

    INC 3.10 quirks worked around here: GPTQ imports `accelerate` (not a dependency of neural-compressor-pt), and
    its quantizer resolves `model_path` even when layer-wise mode is off: the default "" is taken for a Hub repo id
    and fails validation. Any existing local folder passes (it is never read without use_layer_wise)."""
    from neural_compressor.torch.quantization import GPTQConfig, convert, prepare

    cfg = GPTQConfig(bits=BITS, group_size=BLOCK, use_sym=False, use_layer_wise=False,
                     model_path=tempfile.gettempdir())
    t0 = time.perf_counter()
    with inc_quietly():
        m = prepare(copy.deepcopy(fp32), cfg)
        with torch.no_grad():
            for feed in calib:
                m(**to_torch(feed))
        q = convert(m)
    return q.eval(), time.perf_counter() - t0


def conv1d_as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every transformers Conv1D (GPT-2's projections, y = x W + b with W [in, out]) replaced by the
    same nn.Linear (weight W.T): exact, and needed because INC 3.10's GPTQ accepts Conv1D while collecting but
    breaks when it packs one (gptq.py transposes the weight but not the scales, then reads an unset `scale`).
    Module names stay, so both INC methods and our ONNX layers line up by name."""
    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, Conv1D):
            lin = torch.nn.Linear(m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, lin)
    return out.eval()


def inc_layers(q: torch.nn.Module) -> dict[str, Any]:
    """The modules INC replaced by its weight-only linear, by name."""
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    return {n: m for n, m in q.named_modules() if isinstance(m, INCWeightOnlyLinear)}


def torch_weights_kn(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Each Linear / Conv1D module's weight as the [K, N] matrix a MatMul multiplies by."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[n] = m.weight.detach().T.numpy()
        elif isinstance(m, Conv1D):
            out[n] = m.weight.detach().numpy()
    return out


def node_to_module(model: torch.nn.Module, proto: onnx.ModelProto) -> dict[str, str]:
    """ONNX MatMul/Gemm node -> torch module name, matched by identical weights (the exporter copies them
    bit-exactly): the only link that survives the exporter's renaming."""
    inits = {t.name: t for t in proto.graph.initializer}
    by_bytes: dict[tuple[tuple[int, ...], bytes], str] = {}
    for name, w in torch_weights_kn(model).items():
        by_bytes.setdefault((w.shape, np.ascontiguousarray(w, dtype=np.float32).tobytes()), name)
    out = {}
    for l in quantizable_layers(proto):
        w = numpy_helper.to_array(inits[l.weight])
        w = np.ascontiguousarray(w.T if l.transposed else w, dtype=np.float32)
        hit = by_bytes.get((w.shape, w.tobytes()))
        if hit is not None:
            out[l.node] = hit
    return out


# ------------------------------------------------------------------ INC's integers into MatMulNBits


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two to a byte, the first in the low nibble (MatMulNBits' layout)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(b: np.ndarray, n: int) -> np.ndarray:
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[:-1] + (-1,))
    return q[..., :n]


def matmulnbits_tensors(int_weight: np.ndarray, scales: np.ndarray, zp: np.ndarray, block: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, k_blocks, block/2], scales [N, k_blocks] and zero points [N, ceil(k_blocks/2)] from
    integer weights [N, K] (0..15), scales [N, k_blocks] and integer zero points [N, k_blocks]."""
    n, k = int_weight.shape
    if k % block:
        raise SystemExit(f"K={k} is not a multiple of {block}: padding is not handled here")
    q = int_weight.astype(np.uint8).reshape(n, k // block, block)
    return pack_nibbles(q), scales.astype(np.float32), pack_nibbles(zp.astype(np.uint8))


def inc_integers(module: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int weight [N, K], scales [N, k_blocks], zero points [N, k_blocks]) of an INCWeightOnlyLinear, after
    checking that it dequantizes as (q - zp) * scale per contiguous group (no act_order permutation)."""
    p = module.unpack()
    w, s, z = p["int_weight"], p["scales"], p["zp"]
    if p.get("g_idx") is not None:
        expect = torch.arange(w.shape[1], dtype=torch.int32) // module.group_size
        if not torch.equal(p["g_idx"].to(torch.int32).cpu(), expect):
            raise SystemExit("INC's weights are permuted (act_order): not a plain MatMulNBits layout")
    if z is None:
        raise SystemExit("INC's weights carry no zero points: expected asymmetric")
    return w.to(torch.int64).numpy(), s.to(torch.float32).numpy(), z.to(torch.int64).numpy()


def with_inc_weights(src: Path, dst: Path, q: torch.nn.Module, mapping: Mapping[str, str]) -> dict[str, Any]:
    """Copy of our uniform-INT4 ONNX `src` with every MatMulNBits' B / scales / zero points replaced by the
    integers INC chose for the same layer. Returns how many layers were replaced and how many of INC's integer
    weights differ from what onnxruntime's RTN stored (0 expected for INC RTN, up to rounding ties)."""
    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    mods = inc_layers(q)
    replaced, differ, total = 0, 0, 0
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4 or attrs["block_size"] != BLOCK or len(node.input) < 4:
            raise SystemExit(f"{node.name}: not 4-bit asymmetric block {BLOCK}")
        orig = node.name[:-len("_Q4")] if node.name.endswith("_Q4") else node.name
        name = mapping.get(orig)
        if name is None or name not in mods:
            raise SystemExit(f"{node.name}: no INC-quantized torch module for it ({name})")
        w, s, z = inc_integers(mods[name])
        b, scales, zps = matmulnbits_tensors(w, s, z, BLOCK)
        old_b = numpy_helper.to_array(inits[node.input[1]])
        theirs = unpack_nibbles(old_b, BLOCK).reshape(w.shape)
        differ += int((theirs != w).sum())
        total += w.size
        for idx, arr in ((1, b), (2, scales), (3, zps)):
            t = inits[node.input[idx]]
            old = numpy_helper.to_array(t)
            if old.size != arr.size:
                raise SystemExit(f"{node.name} input {idx}: {old.shape} in the model, {arr.shape} from INC")
            t.CopyFrom(numpy_helper.from_array(arr.reshape(old.shape).astype(old.dtype), t.name))
        replaced += 1
    save_model(proto, dst)
    return {"replaced": replaced, "int_weights_differing": differ, "int_weights": total}


def check_packing(path: Path, proto_fp32: onnx.ModelProto) -> tuple[int, int]:
    """Decode our uniform-INT4 file's MatMulNBits back to float and count the weights that differ from a float64
    RTN of the fp32 weights by more than 1e-3 of their block's scale: a wrong reading of onnxruntime's layout
    (nibble order, zero-point packing, scale order) would put most of them off, rounding ties only a few."""
    from compress.quantization.int4 import rtn_error

    q = onnx.load(str(path))
    qi = {t.name: t for t in q.graph.initializer}
    fi = {t.name: t for t in proto_fp32.graph.initializer}
    layers = {l.node: l for l in quantizable_layers(proto_fp32)}
    off, total = 0, 0
    for node in q.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        l = layers[node.name[:-len("_Q4")]]
        w = numpy_helper.to_array(fi[l.weight]).astype(np.float64)
        w = w.T if l.transposed else w
        b = numpy_helper.to_array(qi[node.input[1]])
        n, kb = b.shape[0], b.shape[1]
        ints = unpack_nibbles(b, BLOCK).reshape(n, kb, BLOCK).astype(np.float64)
        s = numpy_helper.to_array(qi[node.input[2]]).reshape(n, kb, 1).astype(np.float64)
        z = unpack_nibbles(numpy_helper.to_array(qi[node.input[3]]).reshape(n, -1), kb).reshape(n, kb, 1)
        deq = ((ints - z) * s).reshape(n, -1).T
        expect = w - rtn_error(w, 4, BLOCK)
        step = np.repeat(s.reshape(n, kb), BLOCK, axis=1).T
        off += int((np.abs(deq - expect) > 1e-3 * step).sum())
        total += w.size
    return off, total


# ------------------------------------------------------------------ one model


def compare(tag: str, title: str, model: torch.nn.Module, calib: Feeds, held: Feeds, work: Path) -> list[str]:
    """Every method on one model; prints the table and the layer check, returns the verdict lines."""
    rows: dict[str, dict[str, Any]] = {}
    ref = torch_outputs(model, held)

    def row(name: str, where: str, outs: Any, seconds: Optional[float], size: Optional[int] = None,
            onnx_ref: Any = None) -> None:
        rows[name] = {"where": where, "fid": fidelity(ref, outs), "seconds": seconds, "size": size,
                      "fid_onnx": fidelity(onnx_ref, outs) if onnx_ref is not None else None}

    row("fp32 torch (reference)", "torch", ref, None)
    fp32 = work / f"{tag}_fp32.onnx"
    t0 = time.perf_counter()
    export_onnx(model, to_torch(calib[0]), fp32)
    export_s = time.perf_counter() - t0
    onnx_ref = onnx_outputs(fp32, held, ort_1thread())
    row("fp32 ONNX (export)", "onnxruntime", onnx_ref, export_s, model_bytes(fp32), onnx_ref)
    proto = onnx.load(str(fp32))
    mapping = node_to_module(model, proto)

    for_inc = conv1d_as_linear(model)
    rtn, rtn_s = inc_rtn(for_inc)
    row(f"INC RTN int{BITS} g{BLOCK} asym", "torch", torch_outputs(rtn, held), rtn_s)
    gptq, gptq_s = inc_gptq(for_inc, calib[:SALIENCE_FEEDS])
    row(f"INC GPTQ int{BITS} g{BLOCK} asym", "torch", torch_outputs(gptq, held), gptq_s)

    paths: dict[str, Path] = {}
    reports: dict[str, dict[str, Any]] = {}
    for name, acc in (("ours uniform int4 (acc level 4)", 4), ("ours uniform int4 (acc level 0)", 0)):
        paths[name] = work / f"{tag}_u4_acc{acc}.onnx"
        t0 = time.perf_counter()
        reports[name] = quantize_int4(fp32, paths[name], calib, held, block_size=BLOCK, accuracy_level=acc)
        row(name, "onnxruntime", onnx_outputs(paths[name], held, ort_1thread()), time.perf_counter() - t0,
            model_bytes(paths[name]), onnx_ref)
    u4 = paths["ours uniform int4 (acc level 4)"]
    ours_layers = [l for l in quantizable_layers(proto) if not l.shared_with]
    u8 = work / f"{tag}_u8.onnx"
    save_model(weight_only(proto, {l.node: 8 for l in ours_layers}, BLOCK), u8)
    budget = (model_bytes(u4) + model_bytes(u8)) / 2 / MB
    name = f"ours mixed --budget-mb {budget:.2f} (acc level 4)"
    paths[name] = work / f"{tag}_mixed.onnx"
    t0 = time.perf_counter()
    reports[name] = quantize_int4(fp32, paths[name], calib[:SALIENCE_FEEDS], held, block_size=BLOCK, budget_mb=budget)
    row(name, "onnxruntime", onnx_outputs(paths[name], held, ort_1thread()), time.perf_counter() - t0, model_bytes(paths[name]),
        onnx_ref)
    mixed_name = name

    packing_gap = check_packing(u4, proto)
    swaps: dict[str, dict[str, Any]] = {}
    for src_name, q, what in ((u4, rtn, "INC RTN"), (u4, gptq, "INC GPTQ"),
                              (paths["ours uniform int4 (acc level 0)"], gptq, "INC GPTQ")):
        acc = 0 if "acc0" in src_name.name else 4
        name = f"{what} integers in our MatMulNBits (acc level {acc})"
        dst = work / f"{tag}_{what.split()[1].lower()}_in_nbits_acc{acc}.onnx"
        t0 = time.perf_counter()
        swaps[name] = with_inc_weights(src_name, dst, q, mapping)
        row(name, "onnxruntime", onnx_outputs(dst, held, ort_1thread()), time.perf_counter() - t0, model_bytes(dst), onnx_ref)

    # which layers each side quantized, in torch module names
    inc_set = {"RTN": set(inc_layers(rtn)), "GPTQ": set(inc_layers(gptq))}
    ours_set = {mapping.get(r["node"], f"(onnx) {r['node']}") for r in reports["ours uniform int4 (acc level 4)"]["layers"]
                if r["bits"] == 4}
    ours_float = [(mapping.get(r["node"], r["node"]), r.get("why", "")) for r in
                  reports["ours uniform int4 (acc level 4)"]["layers"] if r["bits"] == 32]
    all_mods = set(torch_weights_kn(model))

    print(f"\n{title}")
    print("| method | runs in | size MB | quantize s | cos min | 1 - cos min | cos mean | rel L2 | cos min vs fp32 ONNX |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        f, fo = r["fid"], r["fid_onnx"]
        size = None if r["size"] is None else r["size"] / MB
        print(f"| {n} | {r['where']} | {fmt(size, '.2f')} | {fmt(r['seconds'], '.1f')} | {f['cosine_min']:.5f} | "
              f"{1 - f['cosine_min']:.2e} | {f['cosine_mean']:.5f} | {fmt(f['rel_l2'], '.4f')} | {fmt(fo and fo['cosine_min'], '.5f')} |")
    mixed = reports[mixed_name]
    ours_nodes = {l.node for l in ours_layers}
    above4 = [f"{mapping.get(x['node'], x['node'])} ({x['bits']})" for x in mixed["layers"]
              if x["bits"] != 4 and x["node"] in ours_nodes]
    counts = {b: sum(1 for x in mixed["layers"] if x["node"] in ours_nodes and x["bits"] == b) for b in (4, 8, 32)}
    print(f"{mixed_name}: {counts[4]} layers 4-bit, {counts[8]} 8-bit, {counts[32]} float; above 4 bits: "
          f"{', '.join(above4) or 'none'}")
    print(f"INC layers stored like ours would cost the same bytes as 'ours uniform int4' (same 4-bit blocks of {BLOCK}, "
          f"fp32 scales, 4-bit zero points); INC's in-memory torch model is not an export format, so no size is given.")
    print(f"packing check: our uniform INT4 file, decoded with this script's reading of the MatMulNBits layout, "
          f"differs from a float64 RTN of the fp32 weights in {packing_gap[0]} of {packing_gap[1]} weights "
          f"(a wrong reading of the layout would put most of them off)")
    for n, s in swaps.items():
        print(f"{n}: {s['replaced']} MatMulNBits rewritten; {s['int_weights_differing']} of {s['int_weights']} "
              f"integer weights differ from onnxruntime's RTN ({100 * s['int_weights_differing'] / max(1, s['int_weights']):.2f}%)")
    print(f"layers: torch Linear/Conv1D modules {len(all_mods)}; INC RTN quantized {len(inc_set['RTN'])}, "
          f"INC GPTQ {len(inc_set['GPTQ'])}, ours {len(ours_set)}")
    for what, s in inc_set.items():
        only_inc, only_ours = sorted(s - ours_set), sorted(ours_set - s)
        print(f"  INC {what} vs ours: {'same layers' if not only_inc and not only_ours else ''}"
              f"{' INC only: ' + ', '.join(only_inc) if only_inc else ''}{' ours only: ' + ', '.join(only_ours) if only_ours else ''}")
    skipped = sorted(all_mods - inc_set["RTN"])
    print(f"  left in float by INC: {', '.join(skipped) or 'none'}; by ours: "
          f"{'; '.join(f'{n} ({w})' for n, w in ours_float) or 'none'}")

    def cmin(n: str) -> float:
        return rows[n]["fid"]["cosine_min"]

    r_inc, r_gptq = cmin(f"INC RTN int{BITS} g{BLOCK} asym"), cmin(f"INC GPTQ int{BITS} g{BLOCK} asym")
    r_ours, r_mixed = cmin("ours uniform int4 (acc level 4)"), cmin(mixed_name)
    r_ours0 = cmin("ours uniform int4 (acc level 0)")
    cands = {"INC RTN": r_inc, "INC GPTQ": r_gptq, "ours RTN (ORT, acc level 4)": r_ours}
    best = max(cands, key=cands.get)
    gptq_gain, mixed_gain = r_gptq - r_inc, r_mixed - r_ours
    gptq_x, mixed_x = (1 - r_inc) / max(1 - r_gptq, 1e-12), (1 - r_ours) / max(1 - r_mixed, 1e-12)
    extra = (model_bytes(paths[mixed_name]) - model_bytes(u4)) / MB
    verdict = (f"{tag} best cosine min at uniform 4 bits: {best} ({cands[best]:.5f}; INC RTN {r_inc:.5f}, INC GPTQ "
               f"{r_gptq:.5f}, ours RTN {r_ours:.5f}, {r_ours0:.5f} at acc level 0). GPTQ over INC RTN at the same "
               f"bytes: {gptq_gain:+.5f} (1 - cos min {gptq_x:.2f}x smaller); our mixed over our uniform for "
               f"+{extra:.2f} MB: {mixed_gain:+.5f} ({mixed_x:.2f}x smaller) -> "
               f"{'GPTQ gains more' if gptq_gain > mixed_gain else 'mixed precision gains more'}")
    return [verdict]


def bench_minilm(work: Path) -> list[str]:
    enc = tokenize(SENTENCES)
    calib = per_sample({k: v[:CALIB_SAMPLES] for k, v in enc.items()})
    held = per_sample({k: v[CALIB_SAMPLES:] for k, v in enc.items()})
    model = MiniLM(minilm_folder()).eval()
    return compare("(a)", f"(a) all-MiniLM-L6-v2 (real weights) 1x128: GPTQ/salience on {SALIENCE_FEEDS} calibration "
                   f"sentences, per-sentence cosine to torch fp32 on {len(held)} held-out ones", model, calib, held, work)


def bench_gpt2(work: Path, weights: Path) -> list[str]:
    model, ids, meta = gpt2_bench_data(weights)
    calib = per_sample({"input_ids": ids[:SALIENCE_FEEDS]})
    held = per_sample({"input_ids": ids[SALIENCE_FEEDS:]})
    return compare("(b)", f"(b) tiny GPT-2 trained on stdlib source (val {meta.get('val_bits_per_byte', '?')} bits/byte) "
                   f"1x{ids.shape[1]} bytes -> logits: GPTQ/salience on {SALIENCE_FEEDS} validation windows, "
                   f"per-sample cosine of the logits to torch fp32 on {len(held)} others", model, calib, held, work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h = describe_host()
    print(f"{dt.date.today()}, {h['cpu']} ({h['cores']} cores), torch {torch.__version__}, onnxruntime "
          f"{h['onnxruntime']}, {args.threads} torch thread(s); int{BITS} group/block {BLOCK}, asymmetric")
    t_all = time.perf_counter()
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-int4-inc-") as tmp:
        if not args.skip_text:
            out += bench_minilm(Path(tmp))
        if not args.skip_gpt2:
            out += bench_gpt2(Path(tmp), args.weights)
    print("\nverdicts:")
    for v in out:
        print("  " + v)
    print(f"\n{time.perf_counter() - t_all:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
