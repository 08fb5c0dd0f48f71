"""An ONNX file exported elsewhere (plain torch.onnx.export with dynamic axes, no metadata of ours): profiling
refuses to guess its sequence length and takes --input-shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.zoo.encoder import encoder_tiny


@pytest.fixture(scope="module")
def dynamic_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("foreign") / "enc.onnx"
    ids, mask = torch.randint(0, 1000, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    torch.onnx.export(encoder_tiny(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["out"], dynamic_axes=axes, dynamo=False)
    return path


def _profile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", "profile", *args], capture_output=True, text=True,
                          timeout=300)


def test_a_symbolic_sequence_length_is_an_error_naming_the_flag(dynamic_encoder):
    r = _profile(str(dynamic_encoder), "--runs", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "input 'input_ids' [batch, seq] has a symbolic dimension seq (axis 1)" in r.stderr
    assert "--input-shape input_ids=1,N" in r.stderr


def test_input_shape_fixes_the_symbolic_dimensions(dynamic_encoder):
    r = _profile(str(dynamic_encoder), "--runs", "3", "--input-shape", "input_ids=2,48",
                 "--input-shape", "attention_mask=2,48", "--json", "-")
    assert r.returncode == 0, r.stderr
    timed = {i["name"]: i["shape"] for i in json.loads(r.stdout)["inputs"]}
    assert timed == {"input_ids": [2, 48], "attention_mask": [2, 48]}


@pytest.mark.parametrize("args, message", [
    (["--input-shape", "1,48"], "without a name"),
    (["--input-shape", "tokens=1,48"], "not an input of"),
    (["--input-shape", "input_ids=1,48"], "'attention_mask'"),  # the other input still has no length
])
def test_input_shape_errors(dynamic_encoder, args, message):
    r = _profile(str(dynamic_encoder), "--runs", "3", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", "run", *args], capture_output=True, text=True,
                          timeout=600)


def test_compress_run_takes_the_onnx_file_with_input_shapes(dynamic_encoder, tmp_path):
    import onnx

    from export import get_metadata

    r = _run(str(dynamic_encoder), "--input-shape", "input_ids=1,32", "--input-shape", "attention_mask=1,32",
             "--runs", "3", "--no-op-select", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["fp32", "int8"]
    fp32 = rep["variants"][0]
    assert fp32["macs"] > 0 and fp32["parity"] is None  # counted from the graph; nothing was exported
    meta = get_metadata(onnx.load(str(tmp_path / "out" / "fp32.onnx")))
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"input_ids": [1, 32], "attention_mask": [1, 32]}
    assert not get_metadata(onnx.load(str(dynamic_encoder)))  # the user's file is left as it was


@pytest.mark.parametrize("args, message", [
    (["--prune", "0.3"], "pruning needs the PyTorch model"),
    (["--weights", "w.safetensors"], "holds its weights"),
])
def test_compress_run_on_onnx_refuses_what_needs_torch(dynamic_encoder, tmp_path, args, message):
    r = _run(str(dynamic_encoder), "--input-shape", "input_ids=1,8", *args, "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_compress_run_on_an_onnx_export_scores_as_its_torch_model(tmp_path):
    """The demo CNN exported by plain torch.onnx.export, run on the same data: fp32 accuracy and INT8 built."""
    from compress.zoo.shapes import make_shapes, shapes_resnet

    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(shapes_resnet(), (x,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    cx, _ = make_shapes(32, 5)
    ex, ey = make_shapes(64, 6)
    import numpy as np

    np.savez(tmp_path / "calib.npz", image=cx)
    np.savez(tmp_path / "eval.npz", image=ex, y=ey)
    common = ["--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--runs", "3", "--no-op-select"]
    a = _run(str(path), *common, "-o", str(tmp_path / "onnx"))
    b = _run("compress.zoo:shapes_resnet", *common, "--quant", "none", "-o", str(tmp_path / "torch"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("onnx", "torch"))
    assert ra["variants"][0]["accuracy"] == pytest.approx(rb["variants"][0]["accuracy"], abs=1e-9)
    assert ra["variants"][1]["name"] == "int8" and ra["variants"][1]["accuracy"] > 0.5
    assert ra["model"] == str(path)


def test_a_hub_id_loads_from_the_local_cache_offline(bert_folder, tmp_path):
    """org/name resolved from $HF_HUB_CACHE (a snapshot laid out as huggingface_hub keeps one), never fetched."""
    import os
    import shutil

    snap = tmp_path / "hub" / "models--acme--tiny-bert" / "snapshots" / "0123abcd"
    shutil.copytree(bert_folder, snap)
    (tmp_path / "hub" / "models--acme--tiny-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-bert" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "compress.cli", "export", "acme/tiny-bert", "--input-shape", "input_ids=1,8"]
    r = subprocess.run([*cmd, "-o", str(tmp_path / "m.onnx")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").is_file()
    r = subprocess.run([*cmd[:4], "acme/not-cached", *cmd[5:], "-o", str(tmp_path / "n.onnx")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 1 and "not in the local Hugging Face cache" in r.stderr and "huggingface-cli download" in r.stderr


def test_search_takes_an_onnx_model_and_an_image_folder(tmp_path):
    """compress search on a plain ONNX export: no pruning dimension, the PNG folder read once into OUTDIR/data,
    every trial built from it."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(_tiny_cnn(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "compress.cli", "search", str(path), "--calib", str(tmp_path / "imgs"),
                        "--trials", "2", "--runs", "3", "--min-fidelity", "0.5", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "search.json").read_text())
    assert {t["config"].get("prune", 0.0) for t in s["trials"]} == {0.0} and len(s["trials"]) == 2
    assert len(list((out / "data").rglob("calib.npz"))) == 1 and not list(tmp_path.glob(".edge-data-*"))
    rep = json.loads(Path(s["trials"][0]["report"]).read_text())
    assert rep["calibration"]["samples"] == 8


def _tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()


def test_sweep_reads_a_models_image_folder_once_for_its_cells(tmp_path):
    """A sweep model whose calib is a PNG folder (with its pre-processing under data:): read once into
    OUTDIR/data, every cell calibrated from it."""
    import numpy as np
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "sw.yaml").write_text(
        "models:\n  - model: compress.zoo:resnet_tiny\n    calib: imgs\n    data: {image_size: [32, 32], crop_pct: 1.0}\n"
        "devices: [host]\ngrid:\n  quant: [none, int8]\nruns: 3\n")
    r = subprocess.run([sys.executable, "-m", "compress.cli", "sweep", str(tmp_path / "sw.yaml"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert [c["status"] for c in s["cells"]] == ["done", "done"]
    (npz,) = (tmp_path / "o" / "data").rglob("*.npz")
    for c in s["cells"]:
        rep = json.loads(Path(c["report"]).read_text())
        assert rep["calibration"]["source"] == str(npz) and rep["calibration"]["samples"] == 8
    assert not list(tmp_path.glob(".edge-data-*"))


def test_quantize_needs_real_samples_for_a_symbolic_sequence_length(dynamic_encoder, tmp_path):
    import numpy as np

    cmd = [sys.executable, "-m", "compress.cli", "quantize", str(dynamic_encoder), "--to", "int8", "--no-measure"]
    r = subprocess.run([*cmd, "-o", str(tmp_path / "a.onnx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "symbolic dimension (axis 1)" in r.stderr and "--calib" in r.stderr
    assert not (tmp_path / "a.onnx").exists()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", input_ids=rng.integers(0, 1000, (8, 24)), attention_mask=np.ones((8, 24), np.int64))
    r = subprocess.run([*cmd, "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "b.onnx")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("opset", [11, 12])
def test_an_old_opset_is_upgraded_for_per_channel_int8(opset, tmp_path):
    """Issue 19: a CNN at opset 11/12 (torch's TorchScript exporter, as PaddleOCR's models ship) quantizes: the
    preprocessed copy is upgraded to opset 13, which per-channel Q/DQ needs; the source file is not touched."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from compress.quantization.int8 import quantize_int8
    from compress.zoo import resnet_tiny
    from devices import load_profile

    src, dst = tmp_path / f"op{opset}.onnx", tmp_path / "int8.onnx"
    torch.onnx.export(resnet_tiny().eval(), (torch.randn(1, 3, 32, 32),), str(src), opset_version=opset, dynamo=False,
                      input_names=["image"])
    before = src.read_bytes()
    calib = {"image": np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)}
    result = quantize_int8(src, dst, load_profile("host"), calib, tune=False)
    assert result["preprocess"]["opset"] == {"from": opset, "to": 13} and result["preset"]["per_channel"]
    assert src.read_bytes() == before
    assert next(o.version for o in onnx.load(str(dst)).opset_import if o.domain in ("", "ai.onnx")) >= 13
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"image": calib["image"][:1]})
    assert result["fidelity_calibration"]["cosine_min"] > 0.99
