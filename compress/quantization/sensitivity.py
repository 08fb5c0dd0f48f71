"""Accuracy-aware fallback: find the layers that quantization hurts most, and keep just those in fp32.

Independent of the number format: the caller hands in a callback that writes a quantized model (FP8 from
compress.quantization.fp8, INT8, ...), given which Conv/MatMul/Gemm nodes to quantize or to leave alone.

Two steps, each costing one quantization and one evaluation per model written:
1. `layer_sensitivity`: quantize ONE layer at a time and measure the output error against fp32 on the eval
   feeds. Quantizing one layer alone isolates its own damage; the salience is 1 - cosine_mean (rel_l2 breaks
   ties), or the drop of a user score.
2. `fallback`: quantize everything except the k most sensitive layers, for k = 0, 1, 2, ... (or 0, 1, 2, 4, ...
   then a bisection back, for big models) until the fidelity is within the tolerance.
Errors of independent layers add up (roughly as a sum of squares), so the ranking of step 1 is a good order for
step 2 without trying every subset.

Between the two, where the device can be timed here, `float_costs` measures what keeping each of the most
salient layers in float costs the whole model, and `rank_by_cost` orders them by salience per millisecond: a
layer in float costs its lost speedup and the conversions at its borders, which depend on where it sits. On the
demo pruned 25% (AVX2 kernels, 2 threads), ranked by salience alone the fallback kept the two first-stage
convolutions in float and the INT8 model went from 0.27 to 0.50 ms, 1.05x fp32; timed whole, one of them alone
cost 0.23 ms in float (its kernel 0.018 ms when timed alone by op selection), the other 0.002 ms. Ranked per
millisecond, the fallback kept five or seven later layers instead: 1.77x and 1.47x fp32 in two runs.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from compress.core import EdgeError, UsageError, onnxgraph, save_model
from compress.core import first_line as _first_line
from compress.evaluate import fidelity, onnx_outputs
from compress.quantization.fp8 import tensor_values
from compress.quantization.ops import is_quantizable

METRICS = ("cosine_min", "cosine_mean", "rel_l2", "top1", "boxes", "next_token", "perplexity")
TOKEN_METRICS = ("next_token", "perplexity")  # a decoder's, measured with its token ids (compress.evaluate.tokens)
LINEAR_UP_TO = 16  # candidates; beyond, fallback grows its exclusions in doubling batches
# ops that make a copied node quantized (QDQ, dynamic INT8)
QUANTIZING = ("DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger")
# copies are used where they are this close to the quantizer's own single-layer models, relative to its error
COPY_WITHIN = 1.5
SHARED_WEIGHTS = "alone.weights"  # QuantizedAlone's fp32 weights, once per folder its copies are written to
MEASURED_LAYERS = 64  # screened_sensitivity measures at most this many layers: those the one-pass proxy ranks first
SOURCE = "\0source"  # float_costs' key for the unquantized model among what it times (never a node's name)

Feeds = Sequence[Mapping[str, np.ndarray]]
Outputs = list[list[np.ndarray]]
QuantizeFn = Callable[[Path, Path, list[str]], None]  # (src, dst, node names) -> writes dst
Runner = Callable[[Path, Feeds], Outputs]  # (model, feeds) -> outputs per batch
Evaluate = Callable[[Path], float]  # a user's score of a model file (accuracy, ...): higher is better


def quantizable_nodes(model_path: str | Path) -> list[dict[str, str]]:
    """Conv/MatMul/Gemm nodes of the main graph in graph order: [{"node", "op_type"}]."""
    model = onnx.load(str(model_path), load_external_data=False)
    return [{"node": n.name, "op_type": n.op_type} for n in model.graph.node
            if is_quantizable(n)]


def metric_error(fid: Mapping[str, Any], metric: str) -> float:
    """The figure compared with the tolerance, as an error (0 = identical to fp32): 1 - cosine, rel_l2, 1 - top-1."""
    if metric not in METRICS:
        raise UsageError(f"metric {metric!r}: one of {', '.join(METRICS)}")
    if metric == "top1":
        if fid.get("top1_agreement") is None:
            raise UsageError("metric 'top1' needs classifier outputs ([N, C] with C > 1); use cosine_min")
        return 1.0 - float(fid["top1_agreement"])
    if metric == "boxes":
        if not fid.get("boxes"):
            raise UsageError("metric 'boxes' needs a detection head's outputs (compress.evaluate.detection)")
        return 1.0 - float(fid["boxes"]["f1"])
    if metric == "rel_l2":
        return math.inf if fid.get("rel_l2") is None else float(fid["rel_l2"])
    if metric in TOKEN_METRICS:  # the rule compress.evaluate.judged applies to a decoder
        key = "next_token_agreement" if metric == "next_token" else "perplexity_increase"
        if fid.get(key) is None:
            raise UsageError(f"metric {metric!r} needs a decoder's logits and its token ids; use cosine_min")
        return 1.0 - float(fid[key]) if metric == "next_token" else max(0.0, float(fid[key]))
    return 1.0 - float(fid[metric])


class _Scorer:
    """Measures a candidate model: fidelity to the fp32 reference on the eval feeds, or a user's score."""

    def __init__(self, src: Path, eval_feeds: Feeds, reference: Outputs | None, runner: Runner,
                 evaluate: Evaluate | None, metric: str = "cosine_min") -> None:
        self.feeds, self.runner, self.evaluate = eval_feeds, runner, evaluate
        self.tokens = eval_feeds if metric in TOKEN_METRICS else None  # the feeds' token ids, for a decoder
        self.real_tokens = metric == "perplexity"
        if evaluate is not None:
            self.reference_score = float(evaluate(src))
            self.reference = None
        else:
            if not eval_feeds:
                raise UsageError("sensitivity analysis needs evaluation feeds (or an evaluate callback)")
            self.reference = reference if reference is not None else runner(src, eval_feeds)

    def __call__(self, path: Path) -> dict[str, Any]:
        if self.evaluate is not None:
            score = float(self.evaluate(path))
            return {"score": score, "reference_score": self.reference_score, "drop": self.reference_score - score}
        return fidelity(self.reference, self.runner(path, self.feeds), tokens=self.tokens, real_tokens=self.real_tokens)

    def error(self, fid: Mapping[str, Any], metric: str) -> float:
        return float(fid["drop"]) if self.evaluate is not None else metric_error(fid, metric)


def layer_sensitivity(
    src: str | Path,
    candidates: list[str] | None,
    quantize_only: QuantizeFn,
    eval_feeds: Feeds,
    reference_outputs: Outputs | None = None,
    *,
    runner: Runner = onnx_outputs,
    evaluate: Evaluate | None = None,
    on_layer: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Salience of each candidate layer, most sensitive first: what quantizing that layer alone costs.

    `quantize_only(src, dst, [node])` writes a model with just that node quantized; `runner` runs a model on
    the feeds (pass one with the format's session options, e.g. FP8 needs compress.quantization.fp8's); `evaluate`,
    when given, replaces fidelity by a user score (salience = its drop). A layer whose quantization fails is
    listed last with its error and salience None, and is never chosen for fallback.
    """
    src = Path(src)
    ops = {d["node"]: d["op_type"] for d in quantizable_nodes(src)}
    names = list(ops) if candidates is None else list(candidates)
    unknown = [n for n in names if n not in ops]
    if unknown:
        raise UsageError(f"not a Conv/MatMul/Gemm node of {src}: {', '.join(unknown)}")
    scorer = _Scorer(src, eval_feeds, reference_outputs, runner, evaluate)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=".sensitivity-") as work:
        for i, name in enumerate(names):
            if on_layer:
                on_layer(i, len(names), name)
            t0 = time.perf_counter()
            path = Path(work) / f"layer{i}.onnx"
            row: dict[str, Any] = {"node": name, "op_type": ops[name]}
            try:
                quantize_only(src, path, [name])
                fid = scorer(path)
            except EdgeError as e:
                row.update(salience=None, error=_first_line(e), seconds=round(time.perf_counter() - t0, 3))
                rows.append(row)
                continue
            finally:
                _remove_model(path)
            if evaluate is not None:
                row.update(salience=float(fid["drop"]), score=fid["score"])
            else:
                row.update(salience=1.0 - fid["cosine_mean"], cosine_mean=fid["cosine_mean"],
                           cosine_min=fid["cosine_min"], rel_l2=fid["rel_l2"], top1_agreement=fid["top1_agreement"])
            row["seconds"] = round(time.perf_counter() - t0, 3)
            rows.append(row)

    def key(r: dict[str, Any]) -> tuple[float, float]:
        if r["salience"] is None:
            return (math.inf, 0.0)
        rel = r.get("rel_l2")
        return (-r["salience"], -(math.inf if rel is None and evaluate is None else (rel or 0.0)))

    return sorted(rows, key=key)


def screened_sensitivity(src: str | Path, quantized: str | Path, candidates: list[str], quantize_only: QuantizeFn,
                         eval_feeds: Feeds, reference_outputs: Outputs | None = None, *, runner: Runner = onnx_outputs,
                         measure: int = MEASURED_LAYERS) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The fallback's ranking at a fraction of the quantizer's cost: each candidate quantized alone is copied from
    `quantized` (QuantizedAlone; `quantize_only` only where it cannot be). Past `measure` candidates, the one-pass
    proxy (QuantizedAlone.local_errors) picks which `measure` to measure, and the rest follow them in predicted
    order (rows marked "predicted"), so the cost grows linearly beyond that. Returns (rows, an account).

    Why: measuring each layer by running the quantizer (its calibration pass included) took 68 s of the INT8
    stage for timm's MobileNetV2-050 (53 layers) and 112 s for MobileNetV4-conv-small (47), AMD EPYC, 2 cores;
    copied, all 53 take 3.8 s, ranked alike (Spearman 0.89 and 0.87 against the quantizer's, random weights,
    synthetic inputs; 3 of its top 4 and 4 of 4 among the copied top 4). The proxy alone ranks poorly there
    (Spearman 0.43 and 0.19; 2 of MobileNetV4's top 4 outside its top 32): a screen for deep models only."""
    alone = QuantizedAlone(src, quantized)
    measure_fn = alone.quantize_only(quantize_only)
    info: dict[str, Any] = {"candidates": len(candidates)}
    floats = {n for n in candidates if alone.left_float(n)}
    if floats:  # nothing to keep in float: they are
        candidates = [n for n in candidates if n not in floats]
        info["float_in_quantized"] = len(floats)
    if eval_feeds:
        info["copied"] = alone.calibrate(candidates, quantize_only, eval_feeds[0], runner)
        info["copy_distance"] = alone.distance
    order, predicted = list(candidates), {}
    if len(candidates) > measure:
        t0 = time.perf_counter()
        try:
            predicted = alone.local_errors(candidates, eval_feeds)
        except EdgeError as e:
            info["proxy_failed"] = _first_line(e)
        info["proxy_seconds"] = round(time.perf_counter() - t0, 3)
        if predicted:  # those it could not predict first: unknown, they are measured
            order = sorted(candidates, key=lambda n: -predicted.get(n, math.inf))
    top = order if not predicted else order[:max(measure, len(candidates) - len(predicted))]
    rows = layer_sensitivity(src, top, measure_fn, eval_feeds, reference_outputs, runner=runner)
    ops = {d["node"]: d["op_type"] for d in quantizable_nodes(src)}
    rest = [{"node": n, "op_type": ops[n], "salience": predicted[n], "predicted": True}
            for n in order[len(top):] if n in predicted]
    info.update(measured=len(rows), predicted=len(rest))
    return rows + rest, info


class QuantizedAlone:
    """Models with one node quantized as `quantized` (the model quantized whole) has it — its Q/DQ inputs, scales
    and quantized weights copied from there — and everything else as in `src`, the fp32 model it was made from.

    Calibration does not depend on which nodes are quantized (the ranges are the fp32 model's), so this is the
    model that re-quantizing `src` with only that node would give, made by copying a few nodes instead of running
    the quantizer (its calibration pass included) once per layer. A node it cannot map (absent, or left in float,
    in `quantized`; an input `src` does not have) is None from `chain`."""

    def __init__(self, src: str | Path, quantized: str | Path) -> None:
        self.src = Path(src)
        self.output: bool | None = True  # round the node's output too (`calibrate` decides)
        self.distance: float | None = None  # `calibrate`'s: copies from the quantizer's models, over its error
        self.base = onnx.load(str(src), load_external_data=True)
        q = onnx.load(str(quantized), load_external_data=True)
        # at the quantized model's opsets (FP8 Q/DQ need 19; the quantizer raised them, the other nodes held)
        del self.base.opset_import[:]
        self.base.opset_import.extend(q.opset_import)
        self.producer = {o: n for n in q.graph.node for o in n.output}
        self.q_inits = {i.name: i for i in q.graph.initializer}
        self.consumers = onnxgraph.consumers(q.graph)
        self.q_nodes = {n.name: n for n in q.graph.node}
        self.fp_nodes = {n.name: n for n in self.base.graph.node}
        self.known = ({i.name for i in self.base.graph.input} | {i.name for i in self.base.graph.initializer}
                      | {o for n in self.base.graph.node for o in n.output})
        self._shared: dict[Path, onnx.ModelProto] = {}

    def _base_in(self, folder: Path) -> onnx.ModelProto:
        """`src` whose initializers over 1 KB live in one SHARED_WEIGHTS file in `folder`, written there once: each
        copy written to that folder then serializes only its own few tensors. On all-MiniLM-L6-v2 (90 MB) every
        copy re-serialized and wrote the whole model: ~0.3 s of each layer's ~1.3 s measure."""
        folder = folder.resolve()
        if folder not in self._shared:
            from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

            shared = onnx.ModelProto()
            shared.CopyFrom(self.base)
            convert_model_to_external_data(shared, all_tensors_to_one_file=True, location=SHARED_WEIGHTS,
                                           size_threshold=1024, convert_attribute=False)
            self._shared[folder] = write_external_data_tensors(shared, str(folder))  # and clears their bytes
        return self._shared[folder]

    def chain(self, name: str, tag: str, output: bool = True) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
        """(the nodes that stand for `name` quantized alone, in order: Q/DQ of its inputs, a copy of it, Q/DQ of
        its output where `quantized` has them; their initializers), named with `tag` but for the last output,
        which is the node's own; activations read from `src`'s tensors. None where it cannot be mapped."""
        fn, root = self.fp_nodes.get(name), self._root(name)
        if fn is None or root is None:
            return None
        if root.name == name:  # QDQ: its weight (or second operand) must be quantized there
            w = self.producer.get(root.input[1]) if len(root.input) > 1 else None
            if w is None or w.op_type != "DequantizeLinear":
                return None
        added: list[onnx.NodeProto] = []
        inits: dict[str, onnx.TensorProto] = {}

        def const(t: str) -> str:
            if t == "" or t not in self.q_inits:
                return t
            if tag + t not in inits:
                inits[tag + t] = onnx.TensorProto()
                inits[tag + t].CopyFrom(self.q_inits[t])
                inits[tag + t].name = tag + t
            return tag + t

        def copy(node: onnx.NodeProto, inputs: list[str], j: int) -> onnx.NodeProto:
            c = onnx.NodeProto()
            c.CopyFrom(node)
            c.name = f"{tag}{j}"
            del c.input[:], c.output[:]
            c.input.extend(inputs)
            c.output.extend(f"{tag}{j}.out{k}" if o else "" for k, o in enumerate(node.output))
            return c

        memo: dict[str, str | None] = {}

        def source(t: str, depth: int = 0) -> str | None:
            """`t` in the copy: a constant, an fp32 tensor, or copies of the nodes that make it from those (Q, DQ,
            the Relu an FP8 graph puts after its DQ; DynamicQuantizeLinear, MatMulInteger and the rescaling of
            dynamic INT8); None when that reaches another compute node."""
            if t == "" or t in self.q_inits:
                return const(t)
            if t in self.known:
                return t
            if t not in memo:
                p = self.producer.get(t)
                memo[t] = None
                if p is not None and p.name not in self.fp_nodes and depth < 8:
                    ins = [source(i, depth + 1) for i in p.input]
                    if all(i is not None for i in ins):
                        added.append(copy(p, ins, len(added)))  # type: ignore[arg-type]
                        memo.update((o, c) for o, c in zip(p.output, added[-1].output) if o)
            return memo[t]

        inputs = [source(t) for t in root.input]
        if any(i is None for i in inputs) or not any(n.op_type in QUANTIZING for n in added):
            return None
        added.append(copy(root, inputs, len(added)))  # type: ignore[arg-type]
        # the quantizer rounds the node's output too where its consumer reads it through Q/DQ (as the node's
        # own output quantization when it alone is quantized): copied likewise
        qz = next((c for c in self.consumers.get(root.output[0], []) if c.op_type == "QuantizeLinear"), None)
        dq = next((c for c in self.consumers.get(qz.output[0], []) if c.op_type == "DequantizeLinear"), None) if qz else None
        if output and qz is not None and dq is not None:
            added.append(copy(qz, [added[-1].output[0], *map(const, qz.input[1:])], len(added)))
            added.append(copy(dq, [added[-1].output[0], *map(const, dq.input[1:])], len(added)))
        del added[-1].output[:]
        added[-1].output.append(fn.output[0])
        return added, list(inits.values())

    def _root(self, name: str) -> onnx.NodeProto | None:
        """What computes the node's output in `quantized`: the node itself (QDQ; its output renamed where the
        quantizer folded the activation after it into its output's Q), or the last node of what replaced it
        (dynamic INT8's rescaling Mul)."""
        fn = self.fp_nodes.get(name)
        if fn is None:
            return None
        root = self.q_nodes.get(name)
        if root is None or root.op_type != fn.op_type:
            root = self.producer.get(fn.output[0])
            if root is not None and root.name in self.fp_nodes:
                return None
        return root if root is not None and len(root.output) == 1 else None

    def left_float(self, name: str) -> bool:
        """`quantized` computes this node with its float weight (its input may be rounded by the layer before):
        keeping it in float changes nothing (what op selection keeps in float; a dynamically quantized
        model's Convs)."""
        root = self._root(name)
        w = self.producer.get(root.input[1]) if root is not None and len(root.input) > 1 else None
        return root is not None and root.name == name and (w is None or w.op_type not in QUANTIZING)

    def write(self, dst: Path, name: str, output: bool | None = None) -> bool:
        """Write `src` with just `name` quantized to `dst`; False (nothing written) where it cannot be mapped or
        `calibrate` found the copies unlike the quantizer's. `output`: round its output too (default: as
        calibrated)."""
        output = self.output if output is None else output
        if output is None:
            return False
        made = self.chain(name, "alone.", output=output)
        if made is None:
            return False
        added, inits = made
        model = onnx.ModelProto()
        model.CopyFrom(self._base_in(dst.parent))
        nodes = list(model.graph.node)
        at = next(i for i, n in enumerate(nodes) if n.name == name)
        del model.graph.node[:]
        model.graph.node.extend([*nodes[:at], *added, *nodes[at + 1:]])
        model.graph.initializer.extend(inits)
        save_model(model, dst)
        return True

    def calibrate(self, candidates: Sequence[str], quantize_only: QuantizeFn, feed: Mapping[str, np.ndarray],
                  runner: Runner, tries: int = 4, within: float = COPY_WITHIN) -> bool:
        """Check the copies against the quantizer: up to `tries` candidates quantized alone by `quantize_only`,
        each compared on `feed` with its copy with and without its output rounded, as the distance between the
        two models' outputs over the quantizer's own error (its distance from fp32). Quantizers differ there
        (onnxruntime rounds a quantized node's output too, the FP8 quantizer only its inputs): the variant with
        the smaller mean distance sets `output`, and copying is on if that mean is within `within` (else `write`
        declines and the quantizer measures every node). Candidates whose output the quantized model rounds go
        first: they tell the two apart (onnxruntime's: 0.000 with it, 0.64-0.94 without, on MobileNetV2-050).
        Where an activation is folded into the output's Q (Conv -> ReLU6), the quantizer alone rounds the output
        at the conv's own range and the copy at the activation's, as the whole model does: 0.77-1.35 apart there;
        FP8's copy with its output rounded was 47x its quantizer's error."""
        mappable = [n for n in candidates if self.chain(n, "c.", output=False) is not None]
        telling = [n for n in mappable if len(self.chain(n, "c.")[0]) > len(self.chain(n, "c.", output=False)[0])]
        self.output = None
        ref = [np.asarray(w, np.float64) for w in runner(self.src, [feed])[0]]
        dist: dict[bool, list[float]] = {True: [], False: []}
        with tempfile.TemporaryDirectory(prefix=".alone-") as tmp:
            real, copied = Path(tmp) / "real.onnx", Path(tmp) / "copied.onnx"
            for name in (telling + [n for n in mappable if n not in telling])[:tries]:
                quantize_only(self.src, real, [name])
                want = [np.asarray(w, np.float64) for w in runner(real, [feed])[0]]
                noise = math.sqrt(sum(float(((w - r) ** 2).sum()) for w, r in zip(want, ref)))
                scale = math.sqrt(sum(float((r * r).sum()) for r in ref))
                for output in (True, False):
                    self.write(copied, name, output=output)
                    got = runner(copied, [feed])[0]
                    d = math.sqrt(sum(float(((np.asarray(g, np.float64) - w) ** 2).sum()) for g, w in zip(got, want)))
                    dist[output].append(d / noise if noise > 1e-9 * scale else (0.0 if d <= 1e-9 * scale else math.inf))
                    _remove_model(copied)
        if not dist[True]:
            return False
        best = min((True, False), key=lambda o: sum(dist[o]))
        self.distance = round(sum(dist[best]) / len(dist[best]), 4)
        if self.distance <= within:
            self.output = best
        return self.output is not None

    def quantize_only(self, otherwise: QuantizeFn) -> QuantizeFn:
        """A layer_sensitivity callback: `write` for one mappable node, else `otherwise` (the real quantizer)."""

        def run(src: Path, dst: Path, nodes: list[str]) -> None:
            if len(nodes) != 1 or not self.write(dst, nodes[0]):
                otherwise(src, dst, nodes)

        return run

    def local_errors(self, nodes: Sequence[str], feeds: Feeds) -> dict[str, float]:
        """A one-pass proxy of each node's salience: 1 - cosine (mean over samples) between its fp32 output and
        what it computes quantized alone on `src`'s own fp32 activations. Every node's quantized copy sits beside
        the fp32 graph in one probe model, all run together on `feeds`: one session and one pass for all L layers.
        It sees each layer's own rounding, not how later layers amplify it, so it only screens which layers to
        measure. Nodes it cannot map are left out of the answer."""

        probe = onnx.ModelProto()
        probe.CopyFrom(self.base)
        pairs: dict[str, tuple[str, str]] = {}
        for k, name in enumerate(nodes):
            made = self.chain(name, f"probe.{k}.", output=False)
            if made is None:
                continue
            added, inits = made
            ref = added[-1].output[0]
            del added[-1].output[:]
            added[-1].output.append(f"probe.{k}.out")
            probe.graph.node.extend(added)
            probe.graph.initializer.extend(inits)
            pairs[name] = (ref, f"probe.{k}.out")
        if not pairs:
            return {}
        fetch = [t for pair in pairs.values() for t in pair]
        sums = dict.fromkeys(pairs, 0.0)
        count = 0
        for values in tensor_values(probe, fetch, feeds, what="the sensitivity proxy"):
            for name, (ref, out) in pairs.items():
                a = np.asarray(values[ref], np.float64).reshape(len(values[ref]), -1)
                b = np.asarray(values[out], np.float64).reshape(len(values[out]), -1)
                na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
                # both zero: unchanged; one zero (a layer whose output the rounding wiped out): nothing left
                cos = np.where(na * nb > 0, (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300),
                               (na == nb).astype(np.float64))
                sums[name] += float((1.0 - cos).sum())
            count += len(values[fetch[0]])
        return {n: v / max(count, 1) for n, v in sums.items()}


def float_costs(src: str | Path, quantized: str | Path, quantize: QuantizeFn, nodes: Sequence[str],
                timer: Callable[[dict[str, Path]], dict[str, float]]) -> tuple[dict[str, float], float, float]:
    """(milliseconds that keeping each of `nodes` alone in float adds to the whole `quantized` model, that
    model's own milliseconds, `src`'s): each variant written by `quantize(src, dst, [node])` and all timed
    together with `src` and `quantized` by `timer` (interleaved, so they see the same machine). A cost below
    zero is noise: 0."""
    with tempfile.TemporaryDirectory(prefix=".float-cost-") as tmp:
        paths = {"": Path(quantized), SOURCE: Path(src)}
        for i, n in enumerate(nodes):
            paths[n] = Path(tmp) / f"float{i}.onnx"
            quantize(Path(src), paths[n], [n])
        ms = timer(paths)
    return {n: max(ms[n] - ms[""], 0.0) for n in nodes}, ms[""], ms[SOURCE]


def affordable(ranked: Sequence[Mapping[str, Any]], base_ms: float, source_ms: float) -> int:
    """How many of `ranked` (the fallback's order) can be kept in float before the model is estimated to be no
    faster than its source: the quantized model's `base_ms` plus each kept layer's "float_cost_ms" (a layer not
    timed costs the timed ones' mean), against `source_ms`. Costs timed one layer at a time add up only roughly
    (neighbours kept together share their conversions), so this is an estimate, and a bound the fallback stops
    at, not a choice: the pipeline times what it keeps anyway. Why: on the demo pruned 25% (AVX2 kernels), one
    cold run kept 12 of its 13 layers in float to reach the tolerance, and the model that took minutes to find
    was 0.87x fp32."""
    timed = [float(r["float_cost_ms"]) for r in ranked if r.get("float_cost_ms") is not None]
    mean = sum(timed) / len(timed) if timed else 0.0
    total = base_ms
    for k, r in enumerate(ranked):
        cost = r.get("float_cost_ms")
        total += mean if cost is None else float(cost)
        if total >= source_ms:
            return k
    return len(ranked)


def rank_by_cost(sensitivities: list[dict[str, Any]], costs: Mapping[str, float], floor_ms: float) -> list[dict[str, Any]]:
    """The fallback's order: layers with a measured float cost by salience per millisecond of it (a cost under
    `floor_ms`, the timing's noise, counts as `floor_ms`), most first; then the others as they were. Each timed
    row gets its "float_cost_ms"."""
    timed = [dict(r, float_cost_ms=round(costs[r["node"]], 5)) for r in sensitivities
             if r.get("salience") is not None and r["node"] in costs]
    timed.sort(key=lambda r: -r["salience"] / max(r["float_cost_ms"], floor_ms))
    names = {r["node"] for r in timed}
    return timed + [r for r in sensitivities if r["node"] not in names]


def _remove_model(path: Path) -> None:
    for p in (path, path.parent / (path.name + ".data")):
        if p.exists():
            p.unlink()


def _schedule(n: int, growth: str) -> list[int]:
    """Exclusion counts to try in order: 0, 1, 2, 3, ... or 0, 1, 2, 4, 8, ..., n."""
    if growth == "linear":
        return list(range(n + 1))
    counts, k = [0], 1
    while k < n:
        counts.append(k)
        k *= 2
    return counts + [n]


def fallback(
    src: str | Path,
    dst: str | Path,
    quantize: QuantizeFn,
    sensitivities: list[dict[str, Any]],
    eval_feeds: Feeds,
    reference: Outputs | None,
    tolerance: float,
    metric: str = "cosine_min",
    *,
    runner: Runner = onnx_outputs,
    evaluate: Evaluate | None = None,
    growth: str = "auto",
    reference_model: str | Path | None = None,
    max_excluded: int | None = None,
    max_why: str = "",
) -> dict[str, Any]:
    """Keep the most sensitive layers in fp32, as few as reach the tolerance; write that model to dst.

    `quantize(src, dst, exclude)` writes the model quantized except for the named nodes. The error compared
    with `tolerance` is metric_error(fidelity, metric) (or, with `evaluate`, the drop of the user's score).
    growth: "linear" adds one layer per step; "doubling" adds 1, 2, 4, ... then bisects between the last
    failing and the first passing count (assuming more exclusions never hurt); "auto" is linear up to
    LINEAR_UP_TO candidates. `reference_model` (default: src) is what the error is measured against, e.g. the
    unpruned fp32 model when src was pruned first: the tolerance is then on the whole chain. `max_excluded`
    (say `affordable`'s answer, with `max_why` saying so in the note) caps the layers kept in float: beyond it the
    model would not pay for being quantized, so the search stops there. When nothing passes — even with every ranked layer excluded, which can only happen
    when the quantizer touches more than the ranked layers or the evaluation is noisy — dst is not written and
    the result says so (within_tolerance False).
    """
    src, dst = Path(src), Path(dst)
    if tolerance < 0 or not math.isfinite(tolerance):
        raise UsageError(f"tolerance {tolerance}: must be a finite number >= 0")
    if evaluate is None:
        metric_error({"cosine_min": 1.0, "cosine_mean": 1.0, "rel_l2": 0.0, "top1_agreement": 1.0,  # validates
                      "next_token_agreement": 1.0, "perplexity_increase": 0.0}, metric)
    ranked = [r for r in sensitivities if r.get("salience") is not None]
    if growth == "auto":
        growth = "linear" if len(ranked) <= LINEAR_UP_TO else "doubling"
    if growth not in ("linear", "doubling"):
        raise UsageError(f"growth {growth!r}: one of auto, linear, doubling")
    limit = len(ranked) if max_excluded is None else max(0, min(max_excluded, len(ranked)))
    scorer = _Scorer(Path(reference_model) if reference_model else src, eval_feeds, reference, runner, evaluate,
                     metric)
    steps: list[dict[str, Any]] = []
    tried: dict[int, dict[str, Any]] = {}

    def attempt(k: int, work: Path) -> dict[str, Any]:
        if k not in tried:
            t0 = time.perf_counter()
            path = work / f"exclude{k}.onnx"
            try:
                quantize(src, path, [r["node"] for r in ranked[:k]])
                fid = scorer(path)
            finally:
                _remove_model(path)
            err = scorer.error(fid, metric)
            tried[k] = {"excluded_count": k, "error": err, "within_tolerance": err <= tolerance, "fidelity": fid,
                        "seconds": round(time.perf_counter() - t0, 3)}
            steps.append(tried[k])
        return tried[k]

    best: int | None = None
    with tempfile.TemporaryDirectory(prefix=".fallback-") as tmp:
        work = Path(tmp)
        last_fail = -1
        for k in [c for c in _schedule(len(ranked), growth) if c < limit] + [limit]:
            if attempt(k, work)["within_tolerance"]:
                best = k
                break
            last_fail = k
        if best is not None and growth == "doubling":
            lo, hi = last_fail, best  # lo fails (or -1), hi passes
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if attempt(mid, work)["within_tolerance"]:
                    hi = mid
                else:
                    lo = mid
            best = hi

    what = "drop of the user's score" if evaluate is not None else metric
    if best is None:
        final = tried[limit]
        if limit < len(ranked):
            note = (f"keeping more than {limit} of the {len(ranked)} ranked layers in float would leave the model no "
                    f"faster than its source{' (' + max_why + ')' if max_why else ''}, and with {limit} the error "
                    f"is {final['error']:.4g} > tolerance {tolerance:g}: stopped there, nothing was written")
        else:
            note = (f"even with all {len(ranked)} ranked layers in fp32 the error is {final['error']:.4g} > "
                    f"tolerance {tolerance:g}: the quantizer changes more than these layers, or the evaluation "
                    f"is not deterministic; nothing was written")
        return {
            "within_tolerance": False, "path": None, "metric": what, "tolerance": tolerance,
            "excluded": _explain(ranked, limit, tried, what, tolerance),
            "fidelity": final["fidelity"], "error": final["error"], "steps": steps, "note": note,
            **({"max_excluded": limit} if limit < len(ranked) else {}),
        }
    quantize(src, dst, [r["node"] for r in ranked[:best]])
    return {
        "within_tolerance": True, "path": str(dst), "metric": what, "tolerance": tolerance,
        "excluded": _explain(ranked, best, tried, what, tolerance),
        "fidelity": tried[best]["fidelity"], "error": tried[best]["error"], "steps": steps,
    }


def _explain(ranked: list[dict[str, Any]], k: int, tried: Mapping[int, dict[str, Any]], what: str,
             tolerance: float) -> list[dict[str, Any]]:
    """Why each excluded layer is in fp32: its rank, its own salience, and the error without excluding it."""
    out = []
    for i, r in enumerate(ranked[:k]):
        before = tried.get(i)
        how = "its own output's 1 - cosine, predicted in one pass" if r.get("predicted") else "quantized alone"
        why = f"sensitivity rank {i + 1} of {len(ranked)}: {how}, salience {r['salience']:.4g}"
        if r.get("rel_l2") is not None:
            why += f" (rel_l2 {r['rel_l2']:.4g})"
        if r.get("float_cost_ms") is not None:
            why += f", {r['float_cost_ms']:.3f} ms in float (ranked by salience per ms)"
        if before is not None and not before["within_tolerance"]:
            scope = "every layer" if i == 0 else f"all but the {i} layer(s) ranked before it"
            why += f"; quantizing {scope} gave {what} error {before['error']:.4g} > tolerance {tolerance:g}"
        else:
            why += f"; needed to bring {what} error within tolerance {tolerance:g}"
        out.append({"node": r["node"], "op_type": r["op_type"], "salience": r["salience"], "why": why})
    return out
