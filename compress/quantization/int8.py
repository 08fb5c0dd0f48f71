"""INT8 quantization that is actually faster than FP32 on the device, and close to it in output.

Built on onnxruntime's quantizer; what this module adds is the choice of arguments and graph preparation, each
made from measurement on this project's 2-vCPU AVX512-VNNI machines (onnxruntime 1.31.1; see
bench/quant_int8.py for the side-by-side figures):

CNNs (static QDQ, calibrated): the device preset (U8S8 per-channel on VNNI x86, where quantize_static's S8S8
default gave 1.2x over FP32 on the ResNet-18-style demo and U8S8 3.2x), onnxruntime's default op set so
activations stay 8-bit from conv to conv, and one layout rewrite kept only when it times faster: a stride-2
stem conv on 3 input channels runs as SpaceToDepth + a stride-1 conv on 12 channels (exact in fp32). The INT8
stem on 3 channels is bound by im2col, not arithmetic (0.8 ms vs 0.5 ms for the rewritten one, for 1/16 of the
network's MACs), while fp32 gets slower with the rewrite: it only pays in INT8, so it is timed there.

Transformers on CPUs (dynamic INT8 MatMuls): static activation ranges cost all-MiniLM-L6-v2 its accuracy
(per-sentence cosine to FP32 0.91-0.95 with MinMax or Percentile) and were slower than dynamic, so MatMuls with
constant weights are quantized dynamically (per-batch activation range at run time), weights per channel
(per-tensor weights: cosine 0.96; per-channel: 0.992). Activation outliers remain the main error (weights alone
account for 6% of it), so SmoothQuant-style smoothing moves them into the weights: a per-channel 1/s on each
MatMul input (a Mul) and s on the weight rows, exact in fp32, for the inputs whose channel ranges are skewed
(FFN inputs on MiniLM); alpha is chosen on the calibration samples from a small grid (MiniLM: 0.85, held-out
per-sentence cosine min 0.991 -> 0.997). Attention-score MatMuls, Softmax, LayerNorm, Gelu and the
residual Adds stay in float: quantizing them bought no speed and cost accuracy. Two fp32 graph rewrites are
timed and kept when faster: onnxruntime.transformers' BERT fusions (bias+Gelu), and residual Add -> Sum ahead
of LayerNormalization, which stops onnxruntime fusing them into SkipLayerNormalization, whose CPU kernel takes
0.27 ms where Add + LayerNormalization take 0.04 ms on 128x384 (a quarter of the INT8 encoder's run time).

On accelerators that run only static QDQ graphs (TensorRT, QNN, ...) every family takes the static path with
the profile's preset. Profiles with several candidate presets (ARM: S8S8 and U8S8) go through try_presets,
which quantizes with each and keeps the faster.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.core import (
    EdgeError,
    InputError,
    ModelError,
    UsageError,
    check_onnx_output,
    drop_unused,
    onnxgraph,
    save_model,
    sessions,
    warn,
)
from compress.core import first_line as _first_line
from compress.evaluate import fidelity, onnx_outputs
from compress.quantization.calib import CalibReader, CalibSource
from compress.quantization.candidates import pick, time_candidates, timing_json
from compress.quantization.dynamic_sim import simulable, simulate_dynamic
from compress.quantization.fp8 import tensor_values
from compress.quantization.ops import INT8_OPS
from compress.quantization.options import CALIBRATION_METHODS
from compress.quantization.prep import preprocess
from compress.quantization.presets import Preset, candidates, preset_for
from compress.quantization.reuse import Prepared
from compress.quantization.writing import quiet_onnxruntime, write_final
from devices import DeviceProfile, describe_host, usable_cores
from export import get_metadata, set_metadata
from runtime import resolve_providers

SMOOTH_ALPHAS = (None, 0.5, 0.7, 0.85)  # None: no smoothing; MiniLM cosine min (real and simulated): 0.991, 0.984, 0.997, 0.997
DEFAULT_ALPHA = 0.7  # when not tuning (per-layer sensitivity runs): the measured best on MiniLM
# Smooth a MatMul input only when its largest channel range is this many times its median one: below that a
# per-tensor range wastes little, and each smoothing Mul costs time (MiniLM: attention-output inputs, ratio
# 2-4, gained no accuracy from smoothing; leaving them and the QKV input of layer 0 out saved 0.2 ms of 8.5).
SMOOTH_MIN_OUTLIER_RATIO = 5.0
EVAL_FEEDS = 16  # calibration feeds used to pick alpha and to report in-sample fidelity
EQUIVALENT_COSINE = 0.9999  # an fp32 rewrite must reproduce the model to this per-sample cosine
GRAPH_VARIANTS = ["as-exported", "ort-fusions", "as-exported+residual-sum", "ort-fusions+residual-sum"]


# --------------------------------------------------------------------------------------------- helpers


def detect_family(model: onnx.ModelProto) -> str:
    """"transformer" for MatMul-heavy graphs with LayerNormalization/Softmax, "cnn" with convs, else "generic"."""
    ops = Counter(n.op_type for n in model.graph.node)
    gemms = ops["MatMul"] + ops["Gemm"] + ops["Attention"] + ops["MultiHeadAttention"]
    normed = any(ops[o] for o in ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                                  "Softmax", "Attention", "MultiHeadAttention"))
    if gemms >= 2 and gemms >= ops["Conv"] and normed:
        return "transformer"
    if ops["Conv"] or ops["ConvTranspose"]:
        return "cnn"
    return "generic"


def _calib_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def _names(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node}


def _check_names(model: onnx.ModelProto, include: Optional[Sequence[str]], exclude: Sequence[str], src: Path) -> None:
    """Unknown node names are refused: a typo must not silently quantize (or keep) the wrong layers."""
    known = _names(model)
    unknown = sorted({n for n in list(include or []) + list(exclude) if n not in known})
    if unknown:
        raise InputError(f"{src}: no node named {', '.join(map(repr, unknown))}")


def _equivalent(ref: list[list[np.ndarray]], path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> tuple[bool, str]:
    try:
        fid = fidelity(ref, onnx_outputs(path, feeds))
    except EdgeError as e:
        return False, str(e)
    ok = fid["cosine_min"] >= EQUIVALENT_COSINE and fid["nonfinite_samples"] == 0
    return ok, "" if ok else f"differs from the model: per-sample cosine {fid['cosine_min']:.6f}"


# ------------------------------------------------------------------------------------- graph rewrites


def residual_add_to_sum(model: onnx.ModelProto) -> int:
    """Rewrite Add -> LayerNormalization pairs (residual + norm) as Sum -> LayerNormalization; return how many.

    Sum is Add for two inputs, but onnxruntime's SkipLayerNormFusion matches only Add, so the pair keeps running
    as Add + LayerNormalization: 0.04 ms on 128x384 here, against 0.27 ms for the fused kernel.
    """
    consumers = onnxgraph.consumers(model.graph)
    count = 0
    for n in model.graph.node:
        if n.op_type == "Add" and n.domain in ("", "ai.onnx") and len(n.input) == 2:
            users = consumers.get(n.output[0], [])
            if len(users) == 1 and users[0].op_type == "LayerNormalization":
                n.op_type = "Sum"
                count += 1
    return count


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def space_to_depth_stem(model: onnx.ModelProto, kept_float: Iterable[str] = ()) -> int:
    """Run stride-2 convs on <= 4 input channels that read a graph input as SpaceToDepth(2) + a stride-1 conv.
    Not those in `kept_float`: the rewrite pays in INT8 only. On `make demo`'s pruned CNN (2-vCPU AMD EPYC, AVX2
    kernels) the float stem in this form made op selection keep the stem in INT8 (0.156 against 0.141 ms); as
    exported it runs 0.132 ms at 1 thread against the s2d INT8 stem's 0.142.

    y = conv(x, w, stride 2) equals conv(s2d(x), w', stride 1) with w'[o, (a*2+b)*C + c, i, j] = w[o, c, 2i+a-dh,
    2j+b-dw] (dh, dw = 1 when the top/left pad is odd, shifting taps so the padding stays on a 2-pixel grid).
    Exact in fp32; faster in INT8 because the conv then reads 12 channels per pixel instead of 3.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name: i for i in g.input if i.name not in inits}
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    skip = set(kept_float)
    for n in g.node:
        a = _attrs(n)
        ok = (n.name not in skip and n.op_type == "Conv" and n.domain in ("", "ai.onnx") and n.input[0] in graph_inputs and len(n.input) >= 2
              and n.input[1] in inits and list(a.get("strides", [1, 1])) == [2, 2] and a.get("group", 1) == 1
              and all(d == 1 for d in a.get("dilations", [1, 1])) and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))
        dims: list[int] = []
        w = None
        if ok:
            w = numpy_helper.to_array(inits[n.input[1]])
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in graph_inputs[n.input[0]].type.tensor_type.shape.dim]
            ok = (w.ndim == 4 and w.shape[1] <= 4 and min(w.shape[2:]) >= 3 and len(dims) == 4 and all(dims[2:])
                  and dims[2] % 2 == 0 and dims[3] % 2 == 0)
        if not ok or w is None:
            new_nodes.append(n)
            continue
        cout, cin, kh, kw = w.shape
        h, wd = dims[2], dims[3]
        pt, pl, pb, pr = list(a.get("pads", [0, 0, 0, 0]))
        oh, ow = (h + pt + pb - kh) // 2 + 1, (wd + pl + pr - kw) // 2 + 1
        dh, dw = pt % 2, pl % 2
        k2h, k2w = (kh + dh + 1) // 2, (kw + dw + 1) // 2
        lh, lw = (pt + dh) // 2, (pl + dw) // 2
        rh, rw = oh - 1 + k2h - lh - h // 2, ow - 1 + k2w - lw - wd // 2
        if rh < 0 or rw < 0:
            new_nodes.append(n)
            continue
        w2 = np.zeros((cout, 4 * cin, k2h, k2w), dtype=w.dtype)
        for u in range(kh):
            for v in range(kw):
                uh, vw = u + dh, v + dw
                block = (uh % 2) * 2 + vw % 2
                w2[:, block * cin:(block + 1) * cin, uh // 2, vw // 2] = w[:, :, u, v]
        base = n.name or n.output[0]
        g.initializer.append(numpy_helper.from_array(w2, f"{n.input[1]}_s2d"))
        new_nodes.append(helper.make_node("SpaceToDepth", [n.input[0]], [f"{base}_s2d"], name=f"{base}_s2d", blocksize=2))
        conv = helper.make_node("Conv", [f"{base}_s2d", f"{n.input[1]}_s2d", *n.input[2:]], list(n.output), name=n.name,
                                kernel_shape=[k2h, k2w], strides=[1, 1], pads=[lh, lw, rh, rw])
        new_nodes.append(conv)
        count += 1
    del g.node[:]
    g.node.extend(new_nodes)
    drop_unused(model)
    return count


# A Concat whose inputs' ranges differ by more than this factor is left in float: one INT8 scale for its output
# would leave the smaller input MIXED_RANGE x fewer steps (4 of 8 bits lost at 16)
MIXED_RANGE = 16.0


def mixed_range_joins(model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                      ratio: Optional[float] = None) -> list[dict[str, Any]]:
    """Concat nodes joining tensors whose largest magnitudes (over `feeds`, one pass) differ by more than `ratio`,
    each with its inputs' magnitudes: kept in float, since a static INT8 Concat rounds its output with one scale.
    Why: a YOLO detector's output joins decoded boxes (pixels, 0-480 at 320x320) and class scores (0-1); with
    onnxruntime's static QDQ the scores of ultralytics' YOLOv8n came out as one value (a step of 1.9 for
    numbers below 1): every detection lost, while the cosine of the whole output tensor stayed near 1."""

    ratio = MIXED_RANGE if ratio is None else ratio
    model = _load(model_path)
    inits = {t.name for t in model.graph.initializer}
    joins = [n for n in model.graph.node if n.op_type == "Concat" and len(n.input) > 1]
    names = sorted({i for n in joins for i in n.input if i and i not in inits})
    if not names or not feeds:
        return []
    amax = dict.fromkeys(names, 0.0)
    for values in tensor_values(model, names, feeds, what="range check"):
        for k, v in values.items():
            a = np.abs(np.asarray(v, np.float64))
            amax[k] = max(amax[k], float(a.max()) if a.size else 0.0)
    out = []
    for n in joins:
        r = [amax[i] for i in n.input if i in amax]
        if len(r) > 1 and min(r) > 0 and max(r) / min(r) > ratio:
            out.append({"node": n.name, "input_amax": [float(f"{x:.4g}") for x in r]})
    return out


# elementwise, monotone non-decreasing: max-pooling before them gives what max-pooling after them gives
POOL_COMMUTES = ("Relu", "Clip")


def pool_before_activation(model: onnx.ModelProto, kept_float: Iterable[str]) -> int:
    """X -> Relu -> MaxPool becomes X -> MaxPool -> Relu after each node X in `kept_float`; return how many.

    Exact (max commutes with a non-decreasing elementwise function), and what keeps a float stem fast: the
    quantizer puts the next INT8 layer's QuantizeLinear after the MaxPool, and onnxruntime's QDQ propagation
    (ORT_ENABLE_BASIC and up) hoists it above a MaxPool fed by one consumer, to the Relu; the MaxPool then runs
    on uint8 in NCHW with a generic kernel. On `make demo`'s pruned CNN (2-vCPU AMD EPYC, AVX2 kernels, 1
    thread) the stem kept in float made the model slower, 0.213 ms against 0.138 all-INT8, the MaxPool alone
    91 us against 3; with the Relu after the MaxPool the same model ran in 0.127 ms. The MaxPool's output keeps
    its name and values (the calibration ranges stay right); the pooled-before-Relu tensor gets a new one.
    """
    g = model.graph
    users = onnxgraph.consumers(g)
    outputs = {o.name for o in g.output}

    def only_user(tensor: str) -> Optional[onnx.NodeProto]:
        u = users.get(tensor, [])
        return u[0] if len(u) == 1 and tensor not in outputs else None

    wanted = set(kept_float)
    count = 0
    for n in list(g.node):
        if n.name not in wanted or not n.output:
            continue
        act = only_user(n.output[0])
        pool = only_user(act.output[0]) if act is not None and act.op_type in POOL_COMMUTES else None
        if act is None or pool is None or pool.op_type != "MaxPool" or len(pool.output) != 1 or pool.input[0] != act.output[0]:
            continue
        _run_second_first(g, act, pool, f"{n.output[0]}_pooled")
        count += 1
    return count


def _run_second_first(graph: onnx.GraphProto, first: onnx.NodeProto, second: onnx.NodeProto, between: str) -> None:
    """first -> second (second the only reader of first's output) becomes second -> first: `second` reads what
    `first` read and writes `between`, `first` reads that and writes second's output, which keeps its name (and
    its readers, and its calibration range); `second` takes first's place in the node order."""
    x, y = first.input[0], second.output[0]
    second.input[0], second.output[0] = x, between
    first.input[0], first.output[0] = between, y
    nodes = list(graph.node)
    i, j = nodes.index(first), nodes.index(second)
    nodes[i], nodes[j] = nodes[j], nodes[i]
    del graph.node[:]
    graph.node.extend(nodes)


def quantize_before_space_to_depth(model: onnx.ModelProto) -> int:
    """SpaceToDepth -> QuantizeLinear (per-tensor) becomes QuantizeLinear -> SpaceToDepth; return how many.

    Exact (quantization is elementwise with one scale, SpaceToDepth only moves data), and the move then runs
    on bytes: 0.05 ms instead of 0.12 ms for the demo's 3x224x224 input.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = onnxgraph.consumers(g)
    outputs = {o.name for o in g.output}
    count = 0
    for n in list(g.node):
        after = users.get(n.output[0], []) if n.op_type == "SpaceToDepth" else []
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or n.output[0] in outputs:
            continue
        q = after[0]
        scale = inits.get(q.input[1])
        if scale is None or int(np.prod(scale.dims)) != 1:
            continue
        _run_second_first(g, n, q, n.output[0] + "_quantized")  # Q now runs first, on the input
        count += 1
    return count


def _smoothable(model: onnx.ModelProto, quantized: Callable[[onnx.NodeProto], bool]) -> dict[str, list[onnx.NodeProto]]:
    """MatMuls with a constant 2-D float weight, grouped by their activation input (Q/K/V share one)."""
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if (w is not None and n.domain in ("", "ai.onnx") and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT
                and n.input[0] not in inits):
            groups.setdefault(n.input[0], []).append(n)
    return {x: nodes for x, nodes in groups.items() if any(quantized(n) for n in nodes)}


def activation_absmax(path: Path, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the named float tensors over the feeds (streamed), one run per feed."""

    model = onnx.load(str(path), load_external_data=False)
    graph_inputs = {i.name for i in model.graph.input}
    have = {o.name for o in model.graph.output}
    inner = [n for n in names if n not in graph_inputs]
    for name in inner:
        if name not in have:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = path.with_name(path.stem + ".probe.onnx")
    onnx.save_model(model, str(probe))  # external data, if any, is found beside the original
    amax: dict[str, np.ndarray] = {}

    def update(name: str, x: np.ndarray) -> None:
        cur = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
        amax[name] = cur if name not in amax else np.maximum(amax[name], cur)

    try:
        sess = sessions.session(probe)
        wanted = {i.name for i in sess.get_inputs()}
        for feed in feeds:
            outs = sess.run(inner, {k: v for k, v in feed.items() if k in wanted}) if inner else []
            for name, o in zip(inner, outs):
                update(name, o)
            for name in names:
                if name in graph_inputs:
                    update(name, np.asarray(feed[name], dtype=np.float32))
        return amax
    finally:
        probe.unlink(missing_ok=True)


def smooth_matmuls(model: onnx.ModelProto, amax: Mapping[str, np.ndarray], groups: Mapping[str, list[onnx.NodeProto]],
                   alpha: float) -> int:
    """SmoothQuant: divide each grouped MatMul input by s per channel (one Mul) and multiply weight rows by s.

    s_j = max|x_j|^alpha / max|w_j|^(1-alpha): activation outliers move into the weights, which are quantized
    per output channel and take them far better than a per-tensor dynamic activation range does.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    first_use: dict[int, onnx.NodeProto] = {}
    for x, nodes in groups.items():
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        s = (np.maximum(amax[x], 1e-5) ** alpha) / (np.maximum(wmax, 1e-5) ** (1.0 - alpha))
        s = np.clip(s, 1e-3, 1e3).astype(np.float32)
        inv, xs = f"{x}_smooth_inv", f"{x}_smoothed"
        g.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        mul = helper.make_node("Mul", [x, inv], [xs], name=f"{x}_smooth")
        for n, w in zip(nodes, ws):
            scaled = f"{n.input[1]}_smooth_{n.name}"
            g.initializer.append(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), scaled))
            n.input[0], n.input[1] = xs, scaled
        first_use[id(nodes[0])] = mul
    order = list(g.node)
    del g.node[:]
    for n in order:  # the Mul goes just before the first MatMul it feeds: topological order holds
        if id(n) in first_use:
            g.node.append(first_use[id(n)])
        g.node.append(n)
    drop_unused(model)
    return len(groups)


# ------------------------------------------------------------------------------------ transformer path


def _bert_fusions(src: Path, dst: Path) -> dict[str, int]:
    """onnxruntime.transformers' BERT fusions at opt_level 0 (no ORT optimiser, so MatMuls stay MatMuls).

    SkipLayerNormalization is left out: its CPU kernel is slower here than the Add + LayerNormalization it
    replaces (see residual_add_to_sum); EmbedLayerNormalization too, as it rewrites how the mask is read.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("bert")
    opts.enable_skip_layer_norm = False
    opts.enable_bias_skip_layer_norm = False
    opts.enable_embed_layer_norm = False
    with quiet_onnxruntime(), contextlib.redirect_stderr(io.StringIO()):
        opt = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, optimization_options=opts,
                             opt_level=0, use_gpu=False)
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    big = sum(len(t.raw_data) for t in opt.model.graph.initializer) >= 2 * 1024**3
    opt.save_model_to_file(str(dst), use_external_data_format=big)  # also declares the com.microsoft opset
    return stats


def _graph_variant(pre: Path, work: Path, name: str, info: dict[str, Any]) -> Path:
    """The fp32 graph `name` ("as-exported", "ort-fusions", "...+residual-sum") built from the prepared model;
    what each rewrite did goes into `info` ("fusions", "residual_sums")."""
    if name == "as-exported":
        return pre
    base = pre
    if name.startswith("ort-fusions"):
        base = work / "g_fused.onnx"
        if not base.exists():
            info["fusions"] = _bert_fusions(pre, base)
    if not name.endswith("+residual-sum"):
        return base
    out = work / f"g_{name.split('+')[0]}_sum.onnx"
    if not out.exists():
        model = _load(base)
        info["residual_sums"] = residual_add_to_sum(model)
        if not info["residual_sums"]:
            return base
        save_model(model, out)
    return out


def _transformer_graph(pre: Path, work: Path, feeds: Sequence[Mapping[str, np.ndarray]], ref: list[list[np.ndarray]],
                       names: set[str], tune: bool, forced: Optional[str],
                       reuse: Optional[Prepared] = None) -> tuple[Path, dict[str, Any]]:
    """Build the fp32 graph variants, drop any that is not equivalent, time the rest, keep the fastest.

    `forced` (a recipe's graph) builds just that one, checked the same way; no tuning builds none. `reuse`:
    variants are built and checked once per source model.
    """
    if reuse is not None:
        work = reuse.graph_folder()
    wanted = [forced] if forced else (GRAPH_VARIANTS if tune else [])
    info: dict[str, Any] = {"tuned": bool(tune and not forced), "rejected": {}}
    variants: dict[str, Path] = {"as-exported": pre}
    for name in wanted:
        if name == "as-exported":
            continue
        try:
            path = _graph_variant(pre, work, name, info)
        except Exception as e:  # the optimizer is pattern matching; on an unknown export it may raise
            info["rejected"][name] = f"{type(e).__name__}: {_first_line(e)}"
            continue
        if path in variants.values():
            continue  # nothing to rewrite: the same graph as another variant
        if reuse is not None and name in reuse.equivalent:
            ok, why = reuse.equivalent[name]
        else:
            ok, why = _equivalent(ref[:2], path, feeds[:2])
            if reuse is not None:
                reuse.equivalent[name] = (ok, why)
        missing = names - _names(onnx.load(str(path), load_external_data=False)) if names else set()
        if missing:
            ok, why = False, f"renames node(s) {', '.join(sorted(missing)[:3])} that include/exclude refer to"
        if ok:
            variants[name] = path
        else:
            info["rejected"][name] = why
    if forced:
        choice = forced if forced in variants else "as-exported"
    elif len(variants) > 1:
        res = time_candidates(variants, feeds[0])
        choice = pick(res, "as-exported")
        info["fp32_timing"] = timing_json(res)
    else:
        choice = "as-exported"
    info["variant"] = choice
    return variants[choice], info


def _quantize_dynamic(src: Path, dst: Path, preset: Preset, include: Optional[Sequence[str]], exclude: Sequence[str]) -> None:
    from onnxruntime.quantization import quantize_dynamic

    args = preset.dynamic_args()
    big = (src.stat().st_size + _data_size(src)) >= 2 * 1024**3
    with quiet_onnxruntime():
        quantize_dynamic(str(src), str(dst), nodes_to_quantize=list(include) if include else None,
                         nodes_to_exclude=[*exclude, *_onnx_attention(src)], use_external_data_format=big, **args)


def _onnx_attention(src: Path) -> list[str]:
    """ONNX's own Attention nodes (opset 23: a decoder exported for generation): onnxruntime's quantizer maps the
    op type "Attention" to its contrib QAttention without reading the domain, and wrote a graph it then cannot
    load ("invalid model ... QAttention"). The projections around them are MatMuls and are quantized; the
    attention itself multiplies activations by activations and stays in float."""
    graph = onnx.load(str(src), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]


def _simulated(model: onnx.ModelProto, quantized: Callable[[onnx.NodeProto], bool], op_types: Sequence[str],
               spill: Path) -> bytes | Path:
    """`model` made its simulated dynamic INT8 (dynamic_sim), serialized, or saved to `spill` when one protobuf
    cannot hold it; the ModelProto is not kept beside the bytes onnxruntime reads (one copy of the weights
    fewer at the peak)."""
    simulate_dynamic(model, quantized, op_types)
    if onnxgraph.initializer_bytes(model) >= onnxgraph.TWO_GB:
        save_model(model, spill)
        return spill
    return model.SerializeToString()


def _data_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.exists() else 0


def _transformer_path(pre: Path, work: Path, preset: Preset, reader: CalibReader, ref: list[list[np.ndarray]],
                      include: Optional[Sequence[str]], exclude: Sequence[str], tune: bool,
                      recipe: Mapping[str, Any], reuse: Optional[Prepared] = None) -> tuple[Path, dict[str, Any]]:
    feeds = reader.feeds(EVAL_FEEDS)
    graph, ginfo = _transformer_graph(pre, work, feeds, ref, set(include or []) | set(exclude), tune, recipe.get("graph"),
                                      reuse)
    model = _load(graph)
    args = preset.dynamic_args()
    ops = set(args["op_types_to_quantize"])
    chosen = (lambda n: n.name in include) if include else (lambda n: n.op_type in ops)
    groups = _smoothable(model, lambda n: chosen(n) and n.name not in exclude)
    if "smoothing_alpha" in recipe:
        alphas: tuple[Optional[float], ...] = (recipe["smoothing_alpha"],)
    else:
        alphas = SMOOTH_ALPHAS if tune else (DEFAULT_ALPHA,)
    amax: dict[str, np.ndarray] = {}
    if groups and any(a is not None for a in alphas):  # every calibration feed, streamed
        variant = ginfo["variant"]
        kept = {x: reuse.amax[(variant, x)] for x in groups if (variant, x) in reuse.amax} if reuse else {}
        todo = [x for x in groups if x not in kept]
        amax = {**kept, **(activation_absmax(graph, todo, (reader.feed(i) for i in range(len(reader))))
                           if todo else {})}
        if reuse is not None:
            reuse.amax.update(((variant, x), a) for x, a in amax.items())
    skewed = {x for x, a in amax.items() if a.max() >= SMOOTH_MIN_OUTLIER_RATIO * max(float(np.median(a)), 1e-12)}

    def to_smooth(m: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
        found = _smoothable(m, lambda n: chosen(n) and n.name not in exclude)
        return {x: nodes for x, nodes in found.items() if x in skewed}

    def smoothed_model(alpha: Optional[float]) -> onnx.ModelProto:
        m = _load(graph)
        if alpha is not None and skewed:
            smooth_matmuls(m, amax, to_smooth(m), alpha)
        return m

    def quantized(alpha: Optional[float]) -> Path:
        tag = "none" if alpha is None else f"{alpha:g}"
        smoothed = graph
        if alpha is not None and skewed:
            smoothed = work / f"smooth_{tag}.onnx"
            save_model(smoothed_model(alpha), smoothed)
        out = work / f"dyn_{tag}.onnx"
        _quantize_dynamic(smoothed, out, preset, include, exclude)
        return out

    def asked(n: onnx.NodeProto) -> bool:  # what the quantizer is asked to quantize, of the op types it takes
        return (n.name in include if include else True) and n.name not in exclude

    op_types = args["op_types_to_quantize"]
    simulated = len(alphas) > 1 and simulable(model, asked, op_types) is not None
    trials: dict[str, dict[str, Any]] = {}
    best: Optional[tuple[tuple[float, float], Optional[Path], Optional[float]]] = None
    for alpha in alphas if len(alphas) > 1 else ():
        if simulated:  # the same arithmetic in float (dynamic_sim): only the chosen strength is quantized
            outs = onnx_outputs(_simulated(smoothed_model(alpha), asked, op_types, work / "sim.onnx"), feeds)
            out: Optional[Path] = None
        else:
            out = quantized(alpha)
            outs = onnx_outputs(out, feeds)
        fid = fidelity(ref, outs)
        trials["none" if alpha is None else f"{alpha:g}"] = {"cosine_min": fid["cosine_min"],
                                                             "cosine_mean": fid["cosine_mean"]}
        key = (fid["cosine_min"], fid["cosine_mean"])
        if best is None or key > best[0]:
            best = (key, out, alpha)
    if best is None:
        trials["none" if alphas[0] is None else f"{alphas[0]:g}"] = {}
        best = ((0.0, 0.0), None, alphas[0])
    chosen = best[1] or quantized(best[2])
    how = ((f"{len(feeds)} calibration feeds (per-sample cosine min, then mean)"
            + (", dynamic INT8 simulated in float for each strength" if simulated else "")) if len(trials) > 1
           else "recipe" if "smoothing_alpha" in recipe else "default")
    info = {
        "activations": "dynamic (per-batch range at run time)",
        "graph": ginfo,
        "smoothing": {"alpha": best[2], "groups": len(skewed) if best[2] is not None else 0,
                      "candidate_groups": len(groups), "min_outlier_ratio": SMOOTH_MIN_OUTLIER_RATIO,
                      "trials": trials, "chosen_on": how},
    }
    return chosen, info


# ----------------------------------------------------------------------------------------- static path


def _quantize_static(src: Path, dst: Path, preset: Preset, reader: CalibReader, method: str,
                     include: Optional[Sequence[str]], exclude: Sequence[str], cache: Optional[Path]) -> None:
    from onnxruntime.quantization import quantize_static

    big = (src.stat().st_size + _data_size(src)) >= 2 * 1024**3
    reader.rewind()
    # No CalibMaxIntermediateOutputs: onnxruntime's MinMax calibrator (1.32 here) drops each full chunk without
    # merging its ranges (microsoft/onnxruntime#18893): the ranges then come from the last partial chunk alone,
    # and a sample count that is a multiple of the chunk fails with "No data is collected". Measured on
    # resnet_tiny, 40 samples, chunks of 16: 25 of 44 scales changed. MinMax keeps two reductions per tensor and
    # sample, not activations, and CalibReader holds one feed at a time, so memory stays small without it.
    extra: dict[str, Any] = {}
    if cache is not None:
        extra["calibration_cache_path"] = str(cache)
    try:
        with quiet_onnxruntime():
            quantize_static(str(src), str(dst), reader, calibrate_method=_calib_method(method),
                            nodes_to_quantize=list(include) if include else None,
                            nodes_to_exclude=[*exclude, *_onnx_attention(src)],
                            use_external_data_format=big, **preset.static_args(), **extra)
    except ValueError as e:
        if "bins" not in str(e):
            raise
        # onnxruntime's histogram collector (percentile, entropy) bins each tensor's float32 values over their own
        # range: a tensor that spans fewer float32 steps than bins cannot be binned (timm's LCNet-050 with random
        # weights, in its hard-swish blocks); minmax needs no bins
        raise ModelError(f"{method} calibration failed in onnxruntime's histogram collector: {_first_line(e)} "
                         "(a tensor whose values span only a few float32 steps); --method minmax avoids it") from e


def _pool_first(pre: Path, kept_float: Sequence[str], prep: dict[str, Any]) -> None:
    """pool_before_activation on the preprocessed model, in place, said in `prep` (the preprocess account)."""
    model = _load(pre)
    moved = pool_before_activation(model, kept_float)
    if moved:
        save_model(model, pre)
        prep["pool_before_activation"] = moved


def _static_path(pre: Path, work: Path, preset: Preset, reader: CalibReader, method: str,
                 include: Optional[Sequence[str]], exclude: Sequence[str], tune: bool,
                 cache: Optional[Path], recipe: Mapping[str, Any],
                 reuse: Optional[Prepared] = None) -> tuple[Path, dict[str, Any]]:
    forced = recipe.get("graph")
    can_s2d = preset.target == "cpu" and preset.family == "cnn"
    wanted = [forced] if forced else (["as-exported", "s2d-stem"] if tune and can_s2d else ["as-exported"])
    info: dict[str, Any] = {"activations": f"static ({method} calibration)",
                            "graph": {"variant": "as-exported", "tuned": bool(tune and not forced)}}
    variants: dict[str, Path] = {}
    if "s2d-stem" in wanted:
        model = _load(pre)
        if space_to_depth_stem(model, exclude):
            s2d_fp32, s2d = work / "g_s2d.onnx", work / "static_s2d.onnx"
            save_model(model, s2d_fp32)
            try:
                _quantize_static(s2d_fp32, s2d, preset, reader, method, include, exclude,
                                 reuse.ranges(s2d_fp32, method) if reuse is not None else None)
                q = _load(s2d)
                if quantize_before_space_to_depth(q):
                    save_model(q, s2d)
                variants["s2d-stem"] = s2d
            except Exception as e:
                info["graph"]["rejected"] = {"s2d-stem": f"{type(e).__name__}: {_first_line(e)}"}
    if "as-exported" in wanted or not variants:
        base = work / "static.onnx"
        _quantize_static(pre, base, preset, reader, method, include, exclude, cache)
        variants = {"as-exported": base, **variants}
    if len(variants) > 1:
        res = time_candidates(variants, reader.feed(0))
        choice = pick(res, "as-exported")
        info["graph"].update(int8_timing=timing_json(res))
    else:
        choice = next(iter(variants))
    info["graph"]["variant"] = choice
    return variants[choice], info


# ----------------------------------------------------------------------------------------- public API


def _excluded(model: onnx.ModelProto, include: Optional[Sequence[str]], exclude: Sequence[str]) -> list[str]:
    """Conv/MatMul/Gemm/Attention nodes kept in float by the caller's include/exclude choice."""
    if include is None:
        return list(dict.fromkeys(exclude))
    inc = set(include)
    return [n.name for n in model.graph.node if n.op_type in INT8_OPS and (n.name not in inc or n.name in exclude)]


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    profile: DeviceProfile,
    calib: CalibSource,
    *,
    method: str = "minmax",
    include: Optional[list[str]] = None,
    exclude: Sequence[str] = (),
    preset: Optional[Preset] = None,
    family: Optional[str] = None,
    tune: Optional[bool] = None,
    max_samples: Optional[int] = None,
    calibration_cache: Optional[str | Path] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    calib_label: Optional[str] = None,
    announce: bool = True,
    reuse: Optional[Prepared] = None,
) -> dict[str, Any]:
    """Write an INT8 copy of the ONNX model `src` to `dst` for `profile`'s device and return what was done.

    calib: an .npz path or a dict of arrays (keys = input names, first axis = samples), or None for synthetic
    samples from the model's metadata (warned about). method: static calibration ("minmax", "percentile",
    "entropy"). include: quantize only these nodes (per-layer sensitivity); exclude: keep these in float.
    preset: overrides the profile's (see compress.quantization.presets). tune (default: unless `include` is given)
    times the graph rewrites and smoothing strengths and keeps what measures best; without it the measured
    defaults are used, which is what many-model searches want. calibration_cache: onnxruntime's JSON cache of
    static activation ranges, reused when it exists (skips calibration in repeated runs on one model).
    recipe: the "recipe" of an earlier result on the same model (graph rewrite, smoothing strength, the Concats
    kept in float), applied without measuring again: per-layer searches then quantize exactly as the first run
    did, quickly.
    calib_label: the --calib file `calib`'s arrays were loaded from, named in errors about them. announce: warn
    about synthetic calibration (a re-quantization of a model already quantized leaves it to the first: the
    float fallback on timm's LeViT printed the same warning 98 times). reuse: a Prepared the caller keeps across
    re-quantizations of `src` with the same calibration data (compress.quantization.reuse): what does not depend on
    include/exclude is made once.
    """
    t0 = time.perf_counter()
    src = Path(src).expanduser()
    if not src.is_file():
        raise InputError(f"model {src} not found")
    dst = check_onnx_output(str(dst), [src])
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"calibration method {method!r}: one of {', '.join(CALIBRATION_METHODS)}")
    exclude = list(exclude or [])
    if include is not None and not include:
        raise UsageError("include is empty: name at least one node to quantize (or pass None for all)")
    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception as e:
        raise InputError(f"{src} is not a readable ONNX model: {_first_line(e)}") from e
    _check_names(proto, include, exclude, src)
    family = family or detect_family(proto)
    preset = (preset or preset_for(profile)).for_family(family)
    mode = "dynamic" if family == "transformer" and not preset.static_only else "static"
    tune = include is None if tune is None else tune
    reader = CalibReader(proto, calib, max_samples=max_samples, label=calib_label)
    if reader.source == "synthetic" and announce:
        warn("no calibration data: INT8 ranges come from synthetic inputs shaped by the model's metadata, which "
             "fit noise rather than your data; pass --calib with real samples (an .npz, an image folder, a text file or an hf: dataset)")
    try:
        with tempfile.TemporaryDirectory(prefix=".quant-int8-", dir=dst.parent) as tmp:
            work = Path(tmp)
            pre = work / "pre.onnx"
            reuse = reuse.for_source(src) if reuse is not None else None

            def prepared(optimize: bool) -> dict[str, Any]:
                if reuse is None:
                    return preprocess(src, pre, optimize=optimize)
                return reuse.preprocessed(pre, optimize, lambda dst: preprocess(src, dst, optimize=optimize))

            prep = prepared(mode == "static")
            names = set(include or []) | set(exclude)
            if names - _names(onnx.load(str(pre), load_external_data=False)) and prep.get("optimized"):
                prep = prepared(False)  # ORT's optimiser renamed nodes the caller named
                prep["reason"] = "include/exclude name nodes that onnxruntime's optimiser renames"
            if exclude and mode == "static":
                _pool_first(pre, exclude, prep)
            if reuse is not None and reuse.reference is None:
                reuse.reference = onnx_outputs(src, reader.feeds(EVAL_FEEDS))
            ref = reuse.reference if reuse is not None else onnx_outputs(src, reader.feeds(EVAL_FEEDS))
            if mode == "dynamic":
                out, details = _transformer_path(pre, work, preset, reader, ref, include, exclude, tune, recipe or {},
                                                 reuse)
            else:
                cache = Path(calibration_cache) if calibration_cache else None
                if cache is None and reuse is not None:
                    cache = reuse.ranges(pre, method)
                # measured once per model: re-quantizations with the first result's recipe (op selection, the
                # float fallback) reuse them
                joins: Optional[list[dict[str, Any]]] = None
                if include is None:
                    joins = list(recipe["float_joins"]) if recipe and "float_joins" in recipe else \
                        mixed_range_joins(pre, reader.feeds(EVAL_FEEDS))
                out, details = _static_path(pre, work, preset, reader, method, include,
                                            [*exclude, *(j["node"] for j in joins or [])], tune, cache, recipe or {},
                                            reuse)
                if joins:
                    details["float_joins"] = joins
            made = {"graph": details["graph"]["variant"]}
            if mode == "static" and joins is not None:
                made["float_joins"] = joins
            if "smoothing" in details:
                made["smoothing_alpha"] = details["smoothing"]["alpha"]
            fid = fidelity(ref, onnx_outputs(out, reader.feeds(EVAL_FEEDS)))
            excluded = _excluded(proto, include, exclude)
            calibration = {**reader.info(), "method": method if mode == "static" else "dynamic"}
            model = _load(out)
            meta = dict(get_metadata(proto) or {})
            meta.pop("schema", None)
            meta["quantization"] = {
                "format": "int8", "preset": preset.to_json(), "method": method, "mode": mode, "family": family,
                "excluded": excluded, "calibration": calibration,
                "recipe": made,
            }
            set_metadata(model, meta)
            write_final(model, work, dst)
    finally:
        reader.close()
    return {
        "path": str(dst), "family": family, "mode": mode, "preset": preset.to_json(), "method": method,
        "included": list(include) if include is not None else None, "excluded": excluded,
        "calibration": calibration, "preprocess": prep, "recipe": made, **details,
        "fidelity_calibration": fid, "size_bytes": dst.stat().st_size + _data_size(dst),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def try_presets(
    src: str | Path,
    dst: str | Path,
    profile: DeviceProfile,
    calib: CalibSource,
    *,
    rounds: int = 30,
    **kwargs: Any,
) -> dict[str, Any]:
    """Quantize with each of the profile's candidate presets, time them against each other, keep the faster.

    ARM profiles with try_signedness give S8S8 and U8S8 (which one MLAS runs faster depends on the core). The
    candidates are timed interleaved (runtime.abtest) with the profile's providers and threads (capped at this
    machine's cores); run this on the device itself for the device's answer: the result says where it ran.
    Both timings are kept in the result and in the model's metadata.
    """
    src = Path(src).expanduser()
    dst = check_onnx_output(str(dst), [src])
    cands = candidates(profile)
    proto = onnx.load(str(src), load_external_data=False)
    family = kwargs.get("family") or detect_family(proto)
    dynamic = family == "transformer" and not cands[0].static_only
    if len(cands) == 1 or dynamic:
        result = quantize_int8(src, dst, profile, calib, preset=cands[0], **kwargs)
        why = "one candidate" if len(cands) == 1 else "dynamic quantization has uint8 activations: the candidates are the same"
        result["presets"] = {"tried": [c.name for c in cands][:1], "chosen": cands[0].name, "why": why}
        return result
    chosen_providers, _ = resolve_providers(profile)
    providers = [(name, opts) for name, opts in chosen_providers]
    threads = max(1, min(profile.threads, usable_cores()))
    with tempfile.TemporaryDirectory(prefix=".quant-presets-", dir=dst.parent) as tmp:
        work = Path(tmp)
        results: dict[str, dict[str, Any]] = {}
        paths: dict[str, Path] = {}
        for i, cand in enumerate(cands):
            paths[cand.signedness] = work / f"{cand.signedness}.onnx"
            results[cand.signedness] = quantize_int8(src, paths[cand.signedness], profile, calib, preset=cand,
                                                     **{**kwargs, "announce": kwargs.get("announce", True) and i == 0})
        reader = CalibReader(proto, calib, max_samples=1, label=kwargs.get("calib_label"))
        try:
            feed = reader.feed(0)
        finally:
            reader.close()
        res = time_candidates(paths, feed, threads=threads, session_config=dict(profile.session_config), providers=providers,
                      rounds=rounds, min_seconds=1.0)
        clock = "cpu" if threads == 1 else "wall"
        ms = res.cpu_ms if clock == "cpu" else res.wall_ms
        winner = min(ms, key=ms.get)
        host = describe_host()
        presets = {
            "tried": [c.name for c in cands], "chosen": results[winner]["preset"]["name"], "clock": clock,
            "threads": threads, "timing": timing_json(res), "measured_on": f"{host['arch']} {host['cpu']}",
        }
        if host["arch"] != profile.arch:
            presets["warning"] = (f"timed on this {host['arch']} machine, not on the {profile.arch} device: run "
                                  "the quantization on the device for its own answer")
        model = _load(paths[winner])
        meta = dict(get_metadata(model) or {})
        meta.pop("schema", None)
        meta.setdefault("quantization", {})["candidates"] = presets
        set_metadata(model, meta)
        write_final(model, work, dst)
    result = results[winner]
    result.update(path=str(dst), presets=presets, candidates={k: {"fidelity_calibration": r["fidelity_calibration"]}
                                                               for k, r in results.items()})
    return result
