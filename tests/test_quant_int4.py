"""Weight-only INT4 (MatMulNBits): uniform 4-bit, salience-driven 8-bit/float under a size budget, CLI errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.cli import main
from compress.evaluate.compare import fidelity, onnx_outputs
from compress.quantization.int4 import MB, average_bits, quantizable_layers, quantize_int4, stored_bits

D_IN, HIDDEN, D_OUT, SEQ = 64, 128, 64, 8


def _mlp(path: Path, outliers: bool = False) -> Path:
    """x[1, SEQ, 64] -> MatMul fc1 -> Relu -> MatMul fc2 -> Relu -> Gemm-free MatMul fc3: three 2-D weights.

    outliers: one row of fc2's weight in each block of 32 made 100x larger, on input channels fc1 never drives
    (their fc1 columns are zero): big weights times zero activations, harmless in fp32, but each 4-bit block
    holding one gets a step too coarse for the rest. fc2 becomes the layer 4 bits hurt most, by far."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((D_IN, HIDDEN), dtype=np.float32) / np.sqrt(D_IN)
    w2 = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) / np.sqrt(HIDDEN)
    w3 = rng.standard_normal((HIDDEN, D_OUT), dtype=np.float32) / np.sqrt(HIDDEN)
    if outliers:
        dead = [0, 40, 80, 120]
        w1[:, dead] = 0.0
        w2[dead, :] = 100.0
    w1, w2, w3 = (w.astype(np.float32) for w in (w1, w2, w3))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["a1"], name="r1"),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
             helper.make_node("MatMul", ["a2", "w3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, D_IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, D_OUT])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, SEQ, D_IN), dtype=np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return _mlp(tmp_path_factory.mktemp("i4") / "mlp.onnx")


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory) -> Path:
    return _mlp(tmp_path_factory.mktemp("i4s") / "mlp_outliers.onnx", outliers=True)


def test_uniform_int4_is_matmulnbits_smaller_and_close(plain, tmp_path):
    out = tmp_path / "u4.onnx"
    rep = quantize_int4(plain, out, _feeds(4, 0), _feeds(8, 1))
    model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 3 and ops["MatMul"] == 0
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"} == {4}
    assert [r["bits"] for r in rep["layers"]] == [4, 4, 4] and rep["upgrades"] == []
    fp32_w = 4 * (D_IN * HIDDEN + HIDDEN * HIDDEN + HIDDEN * D_OUT)
    q_w = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)  # packed weights, scales, zero points
    assert 4.0 <= fp32_w / q_w <= 7.0
    assert q_w == sum(r["bytes"] for r in rep["layers"])  # the allocator's byte model is MatMulNBits' layout
    assert rep["avg_bits"] == 4.0  # nominal, the papers' convention
    assert rep["stored_bits"] == pytest.approx(4 + (32 + 4) / 32)  # block 32: one fp32 scale, one 4-bit zero point
    assert rep["fidelity"]["cosine_min"] > 0.98  # random Gaussian weights, three layers deep, round-to-nearest
    assert rep["fidelity"] == fidelity(onnx_outputs(plain, _feeds(8, 1)), onnx_outputs(out, _feeds(8, 1)))


def test_salient_layer_gets_more_bits_within_avg_bits(sensitive, tmp_path):
    layers = quantizable_layers(onnx.load(str(sensitive)))
    n = sum(l.elements for l in layers)
    avg = 4 + (HIDDEN * HIDDEN * 4 + 8) / n  # nominal bits: room for fc2 to go 8-bit (4 more bits each), not more
    out = tmp_path / "mixed.onnx"
    rep = quantize_int4(sensitive, out, _feeds(4, 0), _feeds(8, 1), avg_bits=avg)
    bits = {r["node"]: r["bits"] for r in rep["layers"]}
    assert bits == {"fc1": 4, "fc2": 8, "fc3": 4}
    sal = {r["node"]: r["salience"] for r in rep["layers"]}
    assert sal["fc2"] > 10 * max(sal["fc1"], sal["fc3"])
    assert "salience rank 1" in next(r["why"] for r in rep["layers"] if r["node"] == "fc2")
    assert rep["avg_bits"] <= avg and rep["avg_bits"] == pytest.approx(4 + HIDDEN * HIDDEN * 4 / n)
    assert rep["avg_bits"] == average_bits(layers, bits)
    total = sum(r["bytes"] for r in rep["layers"])
    assert rep["stored_bits"] == pytest.approx(8 * total / n) == stored_bits(layers, bits, 32)
    uniform = quantize_int4(sensitive, tmp_path / "u4.onnx", _feeds(4, 0), _feeds(8, 1))
    assert rep["fidelity"]["cosine_mean"] > uniform["fidelity"]["cosine_mean"]


def test_avg_bits_is_nominal_so_the_same_budget_holds_at_every_block_size(sensitive, tmp_path):
    """--avg-bits counts weight bits alone: the same budget picks the same layers at block 32 (where all-4-bit
    already stores 5.125 bits a weight) and at block 128; the stored bits are reported beside it."""
    chosen = []
    for block in (32, 128):
        rep = quantize_int4(sensitive, tmp_path / f"b{block}.onnx", _feeds(4, 0), _feeds(8, 1), avg_bits=6,
                            block_size=block)
        assert 4.0 < rep["avg_bits"] <= 6 < rep["stored_bits"]
        chosen.append({r["node"]: r["bits"] for r in rep["layers"]})
    assert chosen[0] == chosen[1] and chosen[0]["fc2"] == 8


def test_budget_mb_is_respected_and_spent_on_the_salient_layer(sensitive, tmp_path):
    all4 = quantize_int4(sensitive, tmp_path / "u4.onnx", _feeds(4, 0), _feeds(8, 1))
    layers = {l.node: l for l in quantizable_layers(onnx.load(str(sensitive)))}
    room = layers["fc2"].nbytes(8, 32) - layers["fc2"].nbytes(4, 32) + 64  # fc2 to 8 bits, nothing else
    budget = (all4["all_int4_size_bytes"] + room) / MB
    out = tmp_path / "budget.onnx"
    rep = quantize_int4(sensitive, out, _feeds(4, 0), _feeds(8, 1), budget_mb=budget)
    assert out.stat().st_size <= budget * MB and rep["size_bytes"] == out.stat().st_size
    bits = {r["node"]: r["bits"] for r in rep["layers"]}
    assert bits == {"fc1": 4, "fc2": 8, "fc3": 4}
    assert rep["fidelity"]["cosine_mean"] > all4["fidelity"]["cosine_mean"]
    huge = quantize_int4(sensitive, tmp_path / "f.onnx", _feeds(4, 0), _feeds(8, 1), budget_mb=100.0)
    assert [r["bits"] for r in huge["layers"]] == [32, 32, 32]  # above the float size is fine: nothing quantized
    assert huge["fidelity"]["cosine_min"] > 0.99999


def _run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["quantize", *args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, code, message", [
    (["--budget-mb", "1", "--avg-bits", "6"], 2, "pass one"),
    (["--avg-bits", "3"], 2, "must be in [4, 32]"),
    (["--avg-bits", "33"], 2, "must be in [4, 32]"),
    (["--block-size", "48"], 2, "--block-size 48: one of 32, 64, 128"),
    (["--budget-mb", "0.001"], 2, "below the all-4-bit size"),
    (["--tolerance", "0.01"], 2, "not --tolerance"),
])
def test_cli_errors_are_one_line(plain, tmp_path, capsys, args, code, message):
    out = tmp_path / "x.onnx"
    rc, err = _run(capsys, str(plain), "--to", "int4", "--no-measure", *args, "-o", str(out))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == code and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_cli_budget_flags_need_int4_and_a_matmul(tmp_path, capsys):
    rc, err = _run(capsys, str(_mlp(tmp_path / "m.onnx")), "--to", "int8", "--avg-bits", "6", "-o", str(tmp_path / "x.onnx"))
    assert rc == 2 and "--to int4" in err
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "relu.onnx"))
    rc, err = _run(capsys, str(tmp_path / "relu.onnx"), "--to", "int4", "--no-measure", "-o", str(tmp_path / "y.onnx"))
    assert rc == 1 and "no MatMul or Gemm with a constant 2-D float weight" in err


def test_cli_writes_a_mixed_model(sensitive, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(sensitive), "--to", "int4", "--avg-bits", "6", "--no-measure", "-o", str(out)])
    assert e.value.code in (0, None)
    text = capsys.readouterr().out
    assert "above 4 bits: fc2" in text and "synthetic" not in text
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["MatMulNBits"] >= 2


def test_proxy_salience_ranks_like_the_measurement_in_one_pass(sensitive, tmp_path):
    from compress.quantization.int4 import proxy_salience, rtn_error

    w = np.random.default_rng(3).standard_normal((70, 5))
    e = rtn_error(w, 4, 32)
    assert e.shape == w.shape and np.abs(e).max() <= (w.max() - w.min()) / 15  # at most one step of the widest block
    assert np.allclose(rtn_error(np.round(w * 2) / 2, 8, 32), 0, atol=0.01)  # a coarse grid survives 8 bits nearly
    layers = quantizable_layers(onnx.load(str(sensitive)))
    proxy = proxy_salience(onnx.load(str(sensitive)), layers, _feeds(4, 0), 32)
    assert max(proxy, key=proxy.get) == "fc2" and proxy["fc2"] > 10 * max(proxy["fc1"], proxy["fc3"])
    layer_budget = {l.node: l for l in layers}
    room = layer_budget["fc2"].nbytes(8, 32) - layer_budget["fc2"].nbytes(4, 32) + 64
    all4 = quantize_int4(sensitive, tmp_path / "u4.onnx", _feeds(4, 0), _feeds(8, 1))
    budget = (all4["all_int4_size_bytes"] + room) / MB
    measured = quantize_int4(sensitive, tmp_path / "m.onnx", _feeds(4, 0), _feeds(8, 1), budget_mb=budget)
    fast = quantize_int4(sensitive, tmp_path / "p.onnx", _feeds(4, 0), _feeds(8, 1), budget_mb=budget,
                         salience_from="proxy")
    assert [r["bits"] for r in fast["layers"]] == [r["bits"] for r in measured["layers"]] == [4, 8, 4]
    assert fast["salience_from"] == "proxy" and "predicted" in fast["layers"][1]["why"]


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_written_weights_are_the_rounding_the_proxy_models(tmp_path, block, bits):
    """MatMulNBits (fp32 compute) gives x @ (w - rtn_error(w)): the proxy's error model is the file's. Block 128
    over fc1's K=64 is one block per column, the odd count that onnxruntime's RTN-config path fails to pack."""
    from compress.quantization.int4 import rtn_error, weight_only

    src = _mlp(tmp_path / "m.onnx", outliers=True)
    model = onnx.load(str(src))
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = tmp_path / "q.onnx"
    onnx.save(weight_only(model, {"fc1": bits, "fc2": 32, "fc3": 32}, block, accuracy_level=0), str(out))
    x = _feeds(1, 0)[0]["x"]
    h = np.maximum(np.maximum(x @ (w["w1"] - rtn_error(w["w1"], bits, block)), 0) @ w["w2"], 0)
    got = onnx_outputs(out, [{"x": x}])[0]
    assert np.allclose(np.asarray(got).reshape(-1), (h @ w["w3"]).reshape(-1), atol=1e-5)


def test_matmul_of_two_activations_is_not_a_layer_whatever_produces_them():
    """Attention's Q @ K^T where K comes from a Concat with the KV cache (a decoder exported with past): the
    Concat's int `axis` was read as a Transpose perm and crashed; such a MatMul has no weight and is skipped."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Concat", ["past", "k"], ["k_all"], axis=1, name="cat"),
         helper.make_node("MatMul", ["q", "k_all"], ["scores"], name="qk"),
         helper.make_node("MatMul", ["scores", "w"], ["y"], name="proj")],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
              for n, s in (("q", [4, 8]), ("past", [8, 2]), ("k", [8, 6]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [w])
    layers = quantizable_layers(helper.make_model(g))
    assert [(l.node, l.k, l.n) for l in layers] == [("proj", 8, 8)]
