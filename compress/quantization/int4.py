"""Weight-only INT4 for transformer MatMuls, with bits allocated per layer from measured salience.

Weight-only quantization stores each constant MatMul weight in blocks of `block_size` input rows with one fp32
scale and one zero point per block (onnxruntime's MatMulNBits contrib op, built by its MatMulNBitsQuantizer
with the RTN config). Activations stay float, so no activation ranges are calibrated: the calibration data is
only used to measure what each layer's rounding costs at the output.

Mixed precision: each quantizable layer gets 4 bits, 8 bits or stays float. The salience of a layer is the
output error (1 - per-sample cosine mean against fp32) when that layer alone is 4-bit
(compress.quantization.sensitivity.layer_sensitivity). Starting from all-4-bit, the upgrade with the largest
error removed per extra byte (4 -> 8, then 8 -> float) is taken while the model stays within the budget.
The 8-bit error of a layer is estimated rather than measured (salience / 256: the rounding step is 16x
finer and 1 - cosine grows with the squared error), which halves the number of models built; it makes
every 4 -> 8 upgrade worth more than any 8 -> float one, as the measurements on MiniLM bear out.

`salience="proxy"` skips building one model per layer: it predicts each layer's 4-bit output error from the
weights and the calibration activations alone (after AWQ/SliM-LLM's weight x activation salience, but with the
actual rounding error): the energy of the rounding error weighted by each input channel's mean square
activation, relative to the output's energy. It sees a layer's own error, not how later layers amplify it.

Gemm nodes with a constant weight (GPT-2's Conv1D exports as Gemm) and MatMuls whose weight is a
transposed constant (tied LM heads) are rewritten to MatMul (+ Add) on their own weight copy before
quantizing, exact in fp32; layers that stay float are left as exported, so they cost no extra bytes.
"""

from __future__ import annotations

import heapq
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.core import InputError, UsageError, drop_unused, save_model
from compress.core import first_line as _first_line
from compress.evaluate import fidelity, onnx_outputs
from compress.quantization.fp8 import tensor_values
from compress.quantization.sensitivity import layer_sensitivity
from compress.quantization.writing import quiet_onnxruntime, write_final
from export import get_metadata, set_metadata

BLOCK_SIZES = (32, 64, 128)
SALIENCE = ("measured", "proxy")
BITS = (4, 8, 32)  # 32: the layer stays float
AVG_BITS_RANGE = (4.0, 32.0)
EIGHT_BIT_ERROR_RATIO = 1.0 / 256  # estimated 8-bit salience / 4-bit salience (see the module docstring)
NODE_OVERHEAD_BYTES = 256  # protobuf names and attributes of a quantized layer, beyond its tensors
# MatMulNBits' accuracy_level: 0 computes in fp32 after unpacking the weights; 4 quantizes each activation block
# to int8 and uses the int8 dot-product kernels (much faster on x86 with VNNI and on ARM with dot-product).
DEFAULT_ACCURACY_LEVEL = 4
MB = 1_000_000


@dataclass
class Layer:
    """A quantizable layer: a MatMul/Gemm node whose weight is a constant 2-D float matrix [K, N]."""

    node: str
    op_type: str
    weight: str  # the initializer
    k: int
    n: int
    transposed: bool  # the matmul reads weight.T (Gemm transB, or MatMul after a Transpose)
    shared_with: str = ""  # another op reading the same weight (a tied embedding's Gather): it stays float

    @property
    def elements(self) -> int:
        return self.k * self.n

    def nbytes(self, bits: int, block_size: int) -> int:
        """Bytes of this layer's weight at `bits` (32: float) with MatMulNBits' layout: packed blocks, fp32
        scales and (asymmetric) zero points, two 4-bit ones to a byte."""
        if bits == 32:
            return 4 * self.elements
        k_blocks = -(-self.k // block_size)
        blocks = self.n * k_blocks
        zero_points = blocks if bits == 8 else self.n * -(-k_blocks // 2)
        return blocks * block_size * bits // 8 + 4 * blocks + zero_points


def _float_init(inits: Mapping[str, onnx.TensorProto], name: str) -> Optional[onnx.TensorProto]:
    t = inits.get(name)
    return t if t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 else None


def quantizable_layers(model: onnx.ModelProto) -> list[Layer]:
    """MatMul/Gemm nodes of the main graph with a constant 2-D fp32 weight, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or len(n.input) < 2 or n.input[0] in inits or not n.name:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w, trans = _float_init(inits, n.input[1]), False
        if n.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
            trans = bool(attrs.get("transB", 0))
        elif n.op_type == "MatMul" and w is None:
            # a weight stored transposed (Transpose(W) -> MatMul); any other producer is an activation (attention's
            # K from a Concat with the KV cache: reading its int `axis` as a perm crashed on every decoder with past)
            p = producers.get(n.input[1])
            if p is not None and p.op_type == "Transpose":
                perm = {a.name: list(helper.get_attribute_value(a)) for a in p.attribute}.get("perm", [1, 0])
                if perm == [1, 0]:
                    w, trans = _float_init(inits, p.input[0]), True
        elif n.op_type != "MatMul":
            continue
        if w is None:
            continue
        k, nn = (w.dims[1], w.dims[0]) if trans else (w.dims[0], w.dims[1])
        via = n.input[1] if n.input[1] != w.name else None  # the Transpose's output
        others = [r for r in readers.get(w.name, []) if r.name != n.name and via not in r.output]
        out.append(Layer(n.name, n.op_type, w.name, int(k), int(nn), trans,
                         f"{others[0].op_type} {others[0].name}".strip() if others else ""))
    return out


def _rewrite(model: onnx.ModelProto, layers: Sequence[Layer]) -> None:
    """Give each layer to quantize a plain MatMul on its own [K, N] weight copy (Gemm -> MatMul + Add), in place."""
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {l.node: l for l in layers}
    nodes = []
    for n in model.graph.node:
        layer = by_name.get(n.name)
        if layer is None:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[layer.weight])
        w = np.ascontiguousarray(w.T if layer.transposed else w)
        own = f"{layer.weight}__{n.name}"
        model.graph.initializer.append(numpy_helper.from_array(w, own))
        if n.op_type == "MatMul":
            nodes.append(helper.make_node("MatMul", [n.input[0], own], list(n.output), name=n.name))
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if len(n.input) < 3 or not n.input[2] or attrs.get("beta", 1.0) == 0.0:
            nodes.append(helper.make_node("MatMul", [n.input[0], own], list(n.output), name=n.name))
            continue
        bias = n.input[2]
        if attrs.get("beta", 1.0) != 1.0:
            c = inits.get(bias)
            if c is None:
                raise InputError(f"Gemm {n.name}: beta {attrs['beta']} on a non-constant bias is not supported")
            bias = f"{bias}__{n.name}_beta"
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(c) * np.float32(attrs["beta"]), bias))
        mid = f"{n.output[0]}__matmul"
        nodes.append(helper.make_node("MatMul", [n.input[0], own], [mid], name=n.name))
        nodes.append(helper.make_node("Add", [mid, bias], list(n.output), name=f"{n.name}__bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def weight_only(model: onnx.ModelProto, bits: Mapping[str, int], block_size: int = 32,
                accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> onnx.ModelProto:
    """A copy of `model` with each named layer's weight in MatMulNBits at bits[node] (4 or 8; 32 = float).

    One pass of onnxruntime's default (C++ MLAS) blockwise quantizer per bit-width, every other MatMul excluded
    so that only what is asked for changes. Not the RTN config's per-node bits in one pass: that path
    (onnxruntime.quantization.neural_compressor.weight_only) packs 4-bit zero points across columns and fails
    with a reshape error whenever K spans an odd number of blocks (MiniLM's K=384 at block 128).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if block_size not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block_size}: one of {', '.join(map(str, BLOCK_SIZES))}")
    bad = {b for b in bits.values() if b not in BITS}
    if bad:
        raise UsageError(f"bits {sorted(bad)}: each layer takes one of {', '.join(map(str, BITS))}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    layers = {l.node: l for l in quantizable_layers(m)}
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise InputError(f"not a MatMul/Gemm with a constant 2-D weight: {', '.join(unknown)}")
    chosen = [layers[n] for n, b in bits.items() if b != 32]
    _rewrite(m, chosen)
    out = m
    for b in (4, 8):
        these = {l.node for l in chosen if bits[l.node] == b}
        if not these:
            continue
        keep = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name not in these]
        cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
                                           op_types_to_quantize=("MatMul",), bits=b)
        with quiet_onnxruntime():
            q = MatMulNBitsQuantizer(out, bits=b, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level, nodes_to_exclude=keep, algo_config=cfg)
            q.process()
        out = q.model.model if hasattr(q.model, "model") else q.model
    drop_unused(out)
    return out


def rtn_error(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """w - dequant(quant(w)) for a [K, N] weight under asymmetric round-to-nearest in blocks of `block_size`
    rows per column, as MatMulNBits' RTN stores it (range widened to include 0, zero point rounded)."""
    k, n = w.shape
    pad = -k % block_size
    wb = np.pad(w.astype(np.float64), ((0, pad), (0, 0))).reshape(-1, block_size, n)
    lo, hi = np.minimum(wb.min(axis=1, keepdims=True), 0.0), np.maximum(wb.max(axis=1, keepdims=True), 0.0)
    top = 2 ** bits - 1
    scale = np.where(hi > lo, (hi - lo) / top, 1.0)
    zp = np.clip(np.round(-lo / scale), 0, top)
    q = np.clip(np.round(wb / scale) + zp, 0, top)
    return (wb - (q - zp) * scale).reshape(-1, n)[:k]


def proxy_salience(model: onnx.ModelProto, layers: Sequence[Layer], feeds: Sequence[Mapping[str, np.ndarray]],
                   block_size: int) -> dict[str, float]:
    """Predicted 1 - cosine at each layer's output when it alone is 4-bit: half the relative error energy
    sum_k E[x_k^2] |e_k|^2 / sum_k E[x_k^2] |w_k|^2 (e: the rounding error of weight row k), one fp32 pass."""
    inits = {t.name: t for t in model.graph.initializer}
    act = {n.name: n.input[0] for n in model.graph.node}
    names = sorted({act[l.node] for l in layers})
    sumsq: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for values in tensor_values(model, names, feeds):
        for name, v in values.items():
            x = np.asarray(v, dtype=np.float64)
            x = x.reshape(-1, x.shape[-1])
            sumsq[name] = sumsq.get(name, 0.0) + (x * x).sum(axis=0)
            rows[name] = rows.get(name, 0) + x.shape[0]
    out = {}
    for l in layers:
        w = numpy_helper.to_array(inits[l.weight]).astype(np.float64)
        w = w.T if l.transposed else w
        ex2 = sumsq[act[l.node]] / max(rows[act[l.node]], 1)
        signal = float(ex2 @ (w * w).sum(axis=1))
        noise = float(ex2 @ (rtn_error(w, 4, block_size) ** 2).sum(axis=1))
        out[l.node] = 0.5 * noise / signal if signal > 0 else 0.0
    return out


def model_bytes(path: Path) -> int:
    return path.stat().st_size + (p.stat().st_size if (p := path.parent / (path.name + ".data")).exists() else 0)


def average_bits(layers: Sequence[Layer], bits: Mapping[str, int]) -> float:
    """The nominal bits per quantizable weight element (4, 8, or 32 for float), as the mixed-precision papers
    (GPTQ, SliM-LLM) count them: what `--avg-bits` budgets. The scales and zero points are not counted here,
    so "4.5 bits" means the same mix of 4- and 8-bit layers at every block size; `stored_bits` counts them."""
    return sum(l.elements * bits[l.node] for l in layers) / max(1, sum(l.elements for l in layers))


def stored_bits(layers: Sequence[Layer], bits: Mapping[str, int], block_size: int) -> float:
    """Bits per quantizable weight element as stored, fp32 scales and zero points included (float layers 32):
    what the file costs, which `--budget-mb` budgets."""
    total = sum(l.nbytes(bits[l.node], block_size) for l in layers)
    return 8.0 * total / max(1, sum(l.elements for l in layers))


def allocate(layers: Sequence[Layer], salience: Mapping[str, Optional[float]], block_size: int,
             layer_budget: Optional[int], nominal: bool = False) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Greedy bit allocation: all 4-bit, then the upgrade removing the most estimated error per extra byte
    while the layers' bytes stay within `layer_budget` (None: no upgrades). Bytes are as stored (scales and
    zero points counted), or with `nominal` the weight bits alone (the `--avg-bits` convention). A layer whose
    4-bit quantization failed (salience None) stays float. Returns bits per node and the upgrades in the order
    taken."""
    bits = {l.node: (32 if salience.get(l.node) is None else 4) for l in layers}
    if layer_budget is None:
        return bits, []
    by = {l.node: l for l in layers}

    def cost(l: Layer, b: int) -> int:
        return l.elements * b // 8 if nominal else l.nbytes(b, block_size)

    used = sum(cost(l, bits[l.node]) for l in layers)

    def option(node: str) -> Optional[tuple[float, int, int, float]]:
        b, s = bits[node], float(salience[node] or 0.0)
        if b == 32:
            return None
        nxt = 8 if b == 4 else 32
        gain = s * (1 - EIGHT_BIT_ERROR_RATIO) if b == 4 else s * EIGHT_BIT_ERROR_RATIO
        extra = cost(by[node], nxt) - cost(by[node], b)
        return gain / extra, extra, nxt, gain

    heap = []
    for n in bits:
        if (o := option(n)) is not None:
            heapq.heappush(heap, (-o[0], n, o))
    taken = []
    while heap:
        _, node, (per_byte, extra, nxt, gain) = heapq.heappop(heap)
        if used + extra > layer_budget:
            continue  # a smaller upgrade further down may still fit
        used += extra
        taken.append({"node": node, "from": bits[node], "to": nxt, "extra_bytes": extra, "error_removed": gain})
        bits[node] = nxt
        if (o := option(node)) is not None:
            heapq.heappush(heap, (-o[0], node, o))
    return bits, taken


def _quant_meta(bits: Mapping[str, int], block_size: int, accuracy_level: int) -> dict[str, Any]:
    return {"format": "int4", "mode": "weight-only", "block_size": block_size, "bits": dict(bits),
            "accuracy_level": accuracy_level}


def check_options(block_size: int, budget_mb: Optional[float], avg_bits: Optional[float],
                  salience_from: str = "measured") -> None:
    """The budget and block size, before any work (the CLI calls this at parse time too)."""
    if block_size not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block_size}: one of {', '.join(map(str, BLOCK_SIZES))}")
    if budget_mb is not None and avg_bits is not None:
        raise UsageError("--budget-mb and --avg-bits both set a size budget: pass one")
    if avg_bits is not None and not AVG_BITS_RANGE[0] <= avg_bits <= AVG_BITS_RANGE[1]:
        raise UsageError(f"--avg-bits {avg_bits:g}: must be in [{AVG_BITS_RANGE[0]:g}, {AVG_BITS_RANGE[1]:g}]")
    if budget_mb is not None and not budget_mb > 0:
        raise UsageError(f"--budget-mb {budget_mb:g}: must be > 0")
    if salience_from not in SALIENCE:
        raise UsageError(f"--salience {salience_from}: one of {', '.join(SALIENCE)}")


def _salience(src: Path, proto: onnx.ModelProto, layers: list[Layer], calib_feeds: Sequence[Mapping[str, np.ndarray]],
              block_size: int, accuracy_level: int, salience_from: str, on_stage: Callable[[str], None]
              ) -> tuple[dict[str, Optional[float]], list[dict[str, Any]]]:
    """Each layer's salience (the output error of its 4-bit rounding), measured with one model per layer or
    predicted in one pass; and the ranked rows."""
    if salience_from == "proxy":
        on_stage("salience from weights and calibration activations")
        salience: dict[str, Optional[float]] = dict(proxy_salience(proto, layers, calib_feeds, block_size))
        return salience, [{"node": n, "salience": s} for n, s in sorted(salience.items(), key=lambda t: -t[1])]

    def one(_src: Path, out: Path, nodes: list[str]) -> None:
        save_model(weight_only(proto, {n: 4 for n in nodes}, block_size, accuracy_level), out)

    sens = layer_sensitivity(src, [l.node for l in layers], one, calib_feeds,
                             on_layer=lambda i, n, name: on_stage(f"salience of layer {i + 1}/{n}: {name}"))
    return {r["node"]: r["salience"] for r in sens}, sens


def _layer_rows(found: list[Layer], layers: list[Layer], bits: Mapping[str, int], salience: Mapping[str, Optional[float]],
                sens: list[dict[str, Any]], salience_from: str, block_size: int) -> list[dict[str, Any]]:
    """The report's row per layer: its bits and bytes, and why a layer is above 4 bits."""
    rows = [{"node": l.node, "op_type": l.op_type, "shape": [l.k, l.n], "bits": 32, "bytes": 0, "salience": None,
             "why": f"its weight is also read by {l.shared_with}, which keeps it in float anyway: a quantized copy "
                    "would add bytes"} for l in found if l.shared_with]
    ranked = {r["node"]: i + 1 for i, r in enumerate(sens)}
    for l in layers:
        s = salience.get(l.node)
        row = {"node": l.node, "op_type": l.op_type, "shape": [l.k, l.n], "bits": bits[l.node],
               "bytes": l.nbytes(bits[l.node], block_size), "salience": s if sens else None}
        if bits[l.node] != 4:
            if s is None:
                why = "its 4-bit quantization failed"
            else:
                how = ("predicted from weights and activations" if salience_from == "proxy"
                       else "1 - cosine mean with only it 4-bit")
                why = f"salience rank {ranked[l.node]} of {len(layers)} ({s:.3g}, {how}); the upgrade fit the budget"
            row["why"] = why
        rows.append(row)
    return rows


def quantize_int4(
    src: str | Path,
    dst: str | Path,
    calib_feeds: Sequence[Mapping[str, np.ndarray]],
    held_feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    block_size: int = 32,
    budget_mb: Optional[float] = None,
    avg_bits: Optional[float] = None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    salience_from: str = "measured",
    on_stage: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Write a weight-only quantized copy of `src` to `dst` and return the report.

    Without a budget every quantizable layer is 4-bit. With `budget_mb` (total model file size, 1 MB = 10^6
    bytes) or `avg_bits` (nominal bits per quantizable weight element: 4, 8 or 32 each, scales and zero points
    not counted, as the mixed-precision papers count them; `stored_bits` in the report counts them), layers are
    ranked by salience measured on `calib_feeds` and upgraded to 8-bit or float while the budget holds.
    Fidelity to fp32 is reported on `held_feeds`.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_options(block_size, budget_mb, avg_bits, salience_from)
    try:
        proto = onnx.load(str(src), load_external_data=True)
    except Exception as e:
        raise InputError(f"{src} is not a readable ONNX model: {_first_line(e)}") from e
    found = quantizable_layers(proto)
    layers = [l for l in found if not l.shared_with]
    if not layers:
        why = " not read by another op as well" if found else ""
        raise InputError(f"{src}: no MatMul or Gemm with a constant 2-D float weight{why}: weight-only INT4 has nothing to quantize")
    fp32_bytes = model_bytes(src)
    # everything but the layers' weights, plus the metadata entry that records each layer's bits
    rest = fp32_bytes - sum(l.nbytes(32, block_size) for l in layers) + len(json.dumps(
        _quant_meta({l.node: 32 for l in layers}, block_size, accuracy_level))) + 16
    q4 = sum(l.nbytes(4, block_size) + NODE_OVERHEAD_BYTES for l in layers)
    layer_budget: Optional[int] = None
    if budget_mb is not None:
        layer_budget = int(budget_mb * MB) - rest - NODE_OVERHEAD_BYTES * len(layers)
        if rest + q4 > budget_mb * MB:
            raise UsageError(f"--budget-mb {budget_mb:g}: below the all-4-bit size of this model "
                             f"({(rest + q4) / MB:.3f} MB at block size {block_size})")
    elif avg_bits is not None:
        layer_budget = int(avg_bits * sum(l.elements for l in layers) / 8)  # nominal bits: 4 is the floor
    salience: dict[str, Optional[float]] = {l.node: 0.0 for l in layers}
    sens: list[dict[str, Any]] = []
    if layer_budget is not None:
        salience, sens = _salience(src, proto, layers, calib_feeds, block_size, accuracy_level, salience_from, on_stage)
    bits, upgrades = allocate(layers, salience, block_size, layer_budget, nominal=avg_bits is not None)
    on_stage("writing the weight-only model")
    reference = onnx_outputs(src, held_feeds)
    with tempfile.TemporaryDirectory(prefix=".quant-int4-", dir=dst.parent) as tmp:
        work = Path(tmp)
        meta = dict(get_metadata(proto) or {})
        meta.pop("schema", None)
        while True:
            model = weight_only(proto, bits, block_size, accuracy_level)
            meta["quantization"] = _quant_meta(bits, block_size, accuracy_level)
            set_metadata(model, meta)  # before the size check: the metadata is part of the file's bytes
            path = work / "candidate.onnx"
            save_model(model, path)
            size = model_bytes(path)
            if budget_mb is None or size <= budget_mb * MB or not upgrades:
                break
            last = upgrades.pop()  # the estimate missed by protobuf overhead: undo the last upgrade
            bits[last["node"]] = last["from"]
            path.unlink()
        fid = fidelity(reference, onnx_outputs(path, held_feeds))
        write_final(model, work, dst, what="INT4")
    size = model_bytes(dst)
    rows = _layer_rows(found, layers, bits, salience, sens, salience_from, block_size)
    counts = {b: sum(1 for r in rows if r["bits"] == b) for b in BITS}
    return {
        "path": str(dst), "format": "int4", "block_size": block_size, "accuracy_level": accuracy_level,
        "salience_from": salience_from if layer_budget is not None else None,
        "budget": ({"mb": budget_mb} if budget_mb is not None else {"avg_bits": avg_bits} if avg_bits is not None
                   else None),
        "layers": rows, "upgrades": upgrades,
        "counts": {"int4": counts[4], "int8": counts[8], "float": counts[32]},
        "size_bytes": size, "fp32_size_bytes": fp32_bytes, "all_int4_size_bytes": rest + q4,
        "avg_bits": average_bits(layers, bits), "stored_bits": stored_bits(layers, bits, block_size),
        "fidelity": fid, "seconds": round(time.perf_counter() - t0, 2),
    }
