"""Export: verified parity, names from forward(), dynamic batch, fallback, metadata, external data, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress.core.errors import ModelError
from compress.models.inputs import example_inputs, parse_input_shape
from compress.models.loading import load_model
from export.metadata import read_metadata
from export.onnx_export import export_onnx


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess, sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def test_cnn_with_residuals_exports_with_parity(tmp_path):
    lm = load_model("compress.zoo:resnet_tiny")
    ex = example_inputs(lm, [parse_input_shape("1,3,64,64")])
    res = export_onnx(lm.module, ex, tmp_path / "r.onnx", source="compress.zoo:resnet_tiny")
    assert res.exporter == "dynamo" and res.opset == 18 and res.parity["ok"]
    sess, out = _run(tmp_path / "r.onnx", ex)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    with torch.no_grad():
        ref = lm.module(**ex).numpy()
    np.testing.assert_allclose(out[0], ref, rtol=1e-3, atol=1e-4)
    meta = read_metadata(tmp_path / "r.onnx")
    assert meta["source"] == "compress.zoo:resnet_tiny" and meta["opset"] == 18
    assert meta["inputs"] == [{"name": "image", "shape": [1, 3, 64, 64], "dtype": "float32", "low": pytest.approx(meta["inputs"][0]["low"]), "high": pytest.approx(meta["inputs"][0]["high"])}]
    assert meta["parity"]["max_abs_err"] == res.parity["max_abs_err"] < 1e-3


def test_two_input_encoder_dynamic_batch(tmp_path):
    lm = load_model("compress.zoo:encoder_tiny")
    ex = example_inputs(lm, [parse_input_shape("input_ids=1,16"), parse_input_shape("attention_mask=1,16")])
    res = export_onnx(lm.module, ex, tmp_path / "e.onnx", dynamic_batch=True)
    assert res.parity["cases"] == 2  # batch 1 and a doubled batch
    model = onnx.load(str(tmp_path / "e.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)
    feeds = {"input_ids": torch.randint(0, 1000, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.int64)}
    feeds["attention_mask"][1, 10:] = 0
    _, out = _run(tmp_path / "e.onnx", feeds)
    with torch.no_grad():
        ref = lm.module(**feeds).numpy()
    np.testing.assert_allclose(out[0], ref, atol=1e-5)


def test_hf_bert_folder_output_names_follow_model_output(bert_folder, tmp_path):
    lm = load_model(str(bert_folder))
    ex = example_inputs(lm, [parse_input_shape("input_ids=1,16")])
    res = export_onnx(lm.module, ex, tmp_path / "b.onnx")
    assert res.outputs == ["last_hidden_state", "pooler_output"] and res.parity["ok"]
    sess = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]


class DataDependent(nn.Module):
    """Branches on a tensor value: torch.export cannot capture it, TorchScript tracing can."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > -1e9:
            return y.relu()
        return y


def test_falls_back_to_torchscript_when_dynamo_fails(tmp_path):
    torch.manual_seed(0)
    ex = {"x": torch.randn(2, 4)}
    res = export_onnx(DataDependent().eval(), ex, tmp_path / "d.onnx")
    assert res.exporter == "torchscript"
    assert res.attempts[0]["exporter"] == "dynamo" and res.attempts[0]["error"]
    assert read_metadata(tmp_path / "d.onnx")["exporter"] == "torchscript"


def test_low_opset_uses_torchscript(tmp_path):
    lm = load_model("compress.zoo:resnet_tiny")
    ex = example_inputs(lm, [parse_input_shape("1,3,32,32")])
    res = export_onnx(lm.module, ex, tmp_path / "o17.onnx", opset=17)
    assert (res.exporter, res.opset) == ("torchscript", 17)
    assert onnx.load(str(tmp_path / "o17.onnx")).opset_import[0].version == 17


def test_quick_export_tries_torchscript_first_and_falls_back_to_dynamo(tmp_path, monkeypatch):
    import export.onnx_export as oe

    lm = load_model("compress.zoo:resnet_tiny")
    ex = example_inputs(lm, [parse_input_shape("1,3,32,32")])
    res = export_onnx(lm.module, ex, tmp_path / "q.onnx", exporter="quick")
    assert res.exporter == "torchscript" and [a["exporter"] for a in res.attempts] == ["torchscript"]

    def broken(*a, **k):
        raise RuntimeError("tracing failed")

    monkeypatch.setitem(oe._EXPORTERS, "torchscript", broken)
    res = export_onnx(lm.module, ex, tmp_path / "q2.onnx", exporter="quick")
    assert res.exporter == "dynamo" and res.attempts[0] == {"exporter": "torchscript", "error": "RuntimeError: tracing failed"}


class Noisy(nn.Module):
    """Random in forward: torch and onnxruntime draw different numbers, so parity must fail."""

    def forward(self, x):
        return x + torch.rand_like(x)


def test_parity_failure_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "sub" / "n.onnx"
    with pytest.raises(ModelError, match="differs from torch"):
        export_onnx(Noisy(), {"x": torch.zeros(2, 8)}, out)
    assert not out.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_existing_output_survives_a_failed_export(tmp_path):
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"previous result")
    with pytest.raises(ModelError):
        export_onnx(Noisy(), {"x": torch.zeros(2, 8)}, out)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]


def test_large_models_use_external_data(tmp_path):
    lm = load_model("compress.zoo:resnet_tiny")
    ex = example_inputs(lm, [parse_input_shape("1,3,32,32")])
    res = export_onnx(lm.module, ex, tmp_path / "x.onnx", external_data_threshold=1)
    data = tmp_path / "x.onnx.data"
    assert res.external_data and data.exists() and data.stat().st_size > 200_000
    assert (tmp_path / "x.onnx").stat().st_size < 100_000
    _, out = _run(tmp_path / "x.onnx", ex)
    with torch.no_grad():
        np.testing.assert_allclose(out[0], lm.module(**ex).numpy(), rtol=1e-3, atol=1e-4)
    assert read_metadata(tmp_path / "x.onnx")["parity"]["ok"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_export_json_and_calib(tmp_path):
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, input_ids=rng.integers(0, 1000, (5, 12)), attention_mask=np.ones((5, 12), np.int64))
    r = _cli("export", "compress.zoo:encoder_tiny", "--calib", str(calib), "--json", "-", "-o", str(tmp_path / "enc.onnx"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["parity"]["cases"] == 4 and summary["parity"]["ok"]  # sample 0 plus three more
    assert [i["name"] for i in summary["inputs"]] == ["input_ids", "attention_mask"]
    assert (tmp_path / "enc.onnx").exists()


@pytest.mark.parametrize("args,code,text", [
    (["compress.zoo:resnet_tiny", "-o", "m.onnx"], 2, "either --input-shape or --calib"),
    (["compress.zoo:resnet_tiny", "--input-shape", "1,3,a", "-o", "m.onnx"], 2, "--input-shape '1,3,a'"),
    (["compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "-o", "m.txt"], 2, "must end in .onnx"),
    (["compress.zoo:nothing", "--input-shape", "1,3,32,32", "-o", "m.onnx"], 1, "has no factory 'nothing'"),
    (["compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--weights", "w.pt", "-o", "w.pt"], 2, "is also an input"),
])
def test_cli_export_errors_are_one_line(tmp_path, args, code, text):
    (tmp_path / "w.pt").write_bytes(b"x")
    r = _cli("export", *args, cwd=tmp_path)
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert text in r.stderr and "Traceback" not in r.stderr
    assert len(lines) == 1 or code == 2  # click's usage errors add a 'Usage:' line
    assert not (tmp_path / "m.onnx").exists()


def test_parity_accepts_the_same_non_finite_values_and_nothing_else():
    """-inf where torch has -inf is exact (a model may compute log(0)); NaN or Inf anywhere else is a mismatch."""
    from export.parity import compare

    ref = np.array([1.0, -np.inf, np.nan, 2.0], dtype=np.float32)
    assert compare([ref], [ref.copy()], ["y"], 1e-4, 1e-3)[0].ok
    for bad in ([1.0, np.inf, np.nan, 2.0], [1.0, -np.inf, 0.0, 2.0], [1.0, 5.0, np.nan, 2.0], [1.5, -np.inf, np.nan, 2.0]):
        assert not compare([ref], [np.array(bad, dtype=np.float32)], ["y"], 1e-4, 1e-3)[0].ok, bad
