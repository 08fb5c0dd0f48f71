"""MODEL forms, weights files and input parsing."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from compress.core.errors import EdgeError, InputError, ModelError, UsageError
from compress.models.inputs import check_calib_names, example_inputs, load_calib, parse_input_shape
from compress.models.loading import load_model
from compress.zoo import resnet_tiny


def test_module_factory_loads_in_eval_mode():
    lm = load_model("compress.zoo:resnet_tiny")
    assert lm.kind == "factory" and not lm.module.training
    assert lm.input_names == ["image"] and lm.required_inputs == ["image"]


def test_file_factory_imports_siblings(model_file):
    lm = load_model(f"{model_file}:build")
    assert lm.module.conv.out_channels == 6 and lm.input_names == ["pixels"]


@pytest.mark.parametrize("spec,err,text", [
    ("no_such_pkg.models:build", ModelError, "no module named 'no_such_pkg.models'"),
    ("compress.zoo:nope", ModelError, "has no factory 'nope'"),
    ("just_a_name", UsageError, "must be"),
    ("model.onnx", UsageError, "already ONNX"),
    ("missing/file.py:build", InputError, "not found"),
])
def test_bad_model_specs(spec, err, text):
    with pytest.raises(err, match=text):
        load_model(spec)


def test_file_factory_errors(model_file):
    with pytest.raises(ModelError, match="callables there: .*build"):
        load_model(f"{model_file}:nope")
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        load_model(f"{model_file}:not_a_model")
    with pytest.raises(ModelError, match="raised ValueError: no such checkpoint"):
        load_model(f"{model_file}:broken")


def _other_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    m = resnet_tiny()
    for p in m.parameters():
        p.data.normal_()
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_safetensors_and_pt_weights_load(tmp_path):
    state = _other_weights()
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        lm = load_model("compress.zoo:resnet_tiny", weights=str(tmp_path / f))
        assert torch.equal(lm.module.fc.weight, state["fc.weight"])


def test_mismatched_weights_are_a_clear_error(tmp_path):
    from compress.zoo import encoder_tiny

    save_file(encoder_tiny().state_dict(), tmp_path / "enc.safetensors")
    with pytest.raises(InputError, match=r"do not fit the model: \d+ missing .*\d+ unexpected"):
        load_model("compress.zoo:resnet_tiny", weights=str(tmp_path / "enc.safetensors"))
    state = resnet_tiny().state_dict()
    state["fc.weight"] = torch.zeros(5, state["fc.weight"].shape[1])
    state["fc.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "five.pt")
    with pytest.raises(InputError, match=r"shape mismatches \(fc.weight: file \[5, 64\] vs model \[10, 64\]"):
        load_model("compress.zoo:resnet_tiny", weights=str(tmp_path / "five.pt"))


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": _Evil(str(marker))}, f)
    # sanity: plain pickle would run it
    with pytest.raises(InputError, match="refusing to unpickle|not a readable torch checkpoint"):
        load_model("compress.zoo:resnet_tiny", weights=str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_truncated_and_wrong_weight_files(tmp_path):
    save_file(resnet_tiny().state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a valid safetensors"):
        load_model("compress.zoo:resnet_tiny", weights=str(tmp_path / "cut.safetensors"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(InputError, match="expected .safetensors"):
        load_model("compress.zoo:resnet_tiny", weights=str(tmp_path / "w.txt"))
    with pytest.raises(InputError, match="not found"):
        load_model("compress.zoo:resnet_tiny", weights=str(tmp_path / "none.pt"))


def test_hf_folder_loads_with_safetensors_only(bert_folder, tmp_path):
    lm = load_model(str(bert_folder))
    assert lm.kind == "hf" and lm.input_names[:2] == ["input_ids", "attention_mask"]
    ex = example_inputs(lm, [parse_input_shape("input_ids=2,16")])
    assert set(ex) == {"input_ids", "attention_mask"}  # the mask is added for text models
    assert int(ex["input_ids"].max()) < 500 and ex["attention_mask"].dtype == torch.int64
    (tmp_path / "config.json").write_text((bert_folder / "config.json").read_text())
    with pytest.raises(InputError, match="no .safetensors weights"):
        load_model(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(empty))


@pytest.mark.parametrize("text,name,shape,dtype", [
    ("1,3,224,224", None, (1, 3, 224, 224), None),
    ("input_ids=1,128", "input_ids", (1, 128), None),
    ("input_ids=1,128:int64", "input_ids", (1, 128), "int64"),
    ("1x3x32x32", None, (1, 3, 32, 32), None),
])
def test_parse_input_shape(text, name, shape, dtype):
    arg = parse_input_shape(text)
    assert (arg.name, arg.shape, arg.dtype) == (name, shape, dtype)


@pytest.mark.parametrize("text", ["", "1,,3", "a,b", "1,0,3", "x=1:float7", "1,-3", "=1,2", "1,3:"])
def test_malformed_input_shapes(text):
    with pytest.raises(UsageError, match="--input-shape"):
        parse_input_shape(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_input_shape_parser_never_crashes(text):
    try:
        arg = parse_input_shape(text)
    except UsageError:
        return
    assert all(d >= 1 for d in arg.shape)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=4))
def test_input_shape_roundtrip(dims):
    assert parse_input_shape(",".join(map(str, dims))).shape == tuple(dims)


def test_calib_validation(tmp_path):
    lm = load_model("compress.zoo:encoder_tiny")
    good = {"input_ids": np.ones((4, 8), np.int64), "attention_mask": np.ones((4, 8), np.int64)}
    np.savez(tmp_path / "good.npz", **good)
    data = load_calib(tmp_path / "good.npz")
    check_calib_names(data, lm, "good.npz")
    ex = example_inputs(lm, calib=data)
    assert list(ex) == ["input_ids", "attention_mask"] and ex["input_ids"].shape == (1, 8)

    np.savez(tmp_path / "wrongkey.npz", ids=good["input_ids"], attention_mask=good["attention_mask"])
    with pytest.raises(InputError, match="'ids' not an input of the model; its inputs are input_ids, attention_mask"):
        check_calib_names(load_calib(tmp_path / "wrongkey.npz"), lm, "wrongkey.npz")
    np.savez(tmp_path / "missing.npz", input_ids=good["input_ids"])
    with pytest.raises(InputError, match="missing required input"):
        check_calib_names(load_calib(tmp_path / "missing.npz"), lm, "missing.npz")
    np.savez(tmp_path / "counts.npz", input_ids=good["input_ids"], attention_mask=good["attention_mask"][:3])
    with pytest.raises(InputError, match="disagree on the number of samples"):
        load_calib(tmp_path / "counts.npz")
    np.savez(tmp_path / "obj.npz", input_ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError):
        load_calib(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_calib(tmp_path / "junk.npz")


def test_all_errors_are_edge_errors():
    for cls in (InputError, ModelError, UsageError):
        assert issubclass(cls, EdgeError)


def test_hf_folder_whose_weights_do_not_match_its_config_is_refused(bert_folder, tmp_path):
    """Missing or unexpected tensors used to export a partly random model with exit 0 (issue 16)."""
    from safetensors.torch import load_file, save_file

    from compress.core import ModelError

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text((bert_folder / "config.json").read_text())
    sd = load_file(str(bert_folder / "model.safetensors"))
    dropped = sorted(k for k in sd if k.endswith("query.weight"))[0]
    del sd[dropped]
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "do not match config.json" in msg
    assert f"missing: {dropped}" in msg and "unexpected: extra.weight" in msg
    r = subprocess.run([sys.executable, "-m", "compress.cli", "export", str(folder), "--input-shape",
                        "input_ids=1,8:int64", "-o", str(tmp_path / "m.onnx")], capture_output=True, text=True,
                       timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("warning:", "progress:"))]
    assert r.returncode == 1 and len(lines) == 1 and "do not match config.json" in lines[0], r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_hf_folder_with_tied_weights_loads(tmp_path):
    """A causal LM's head is tied to its input embedding and not stored: that is not a missing weight."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    lm = load_model(str(tmp_path))
    head, emb = lm.module.lm_head.weight, lm.module.transformer.wte.weight
    assert head.data_ptr() == emb.data_ptr()
