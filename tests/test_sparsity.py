"""Sparsity: exact zero counts, 2:4 groups along input channels, untouched input/protected layers, plain weights
that export, smaller zipped files, and masks that survive distillation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress.core.errors import ModelError, UsageError
from compress.pruning.recover import distill
from compress.pruning.sparsity import SPARSITY_NOTE, apply_sparsity, zipped_size
from compress.zoo import resnet_tiny
from export.onnx_export import export_onnx

COVERED = (nn.Conv2d, nn.Linear)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, COVERED)}


def _groups_of_4(w: torch.Tensor) -> torch.Tensor:
    """Independent of the implementation: Conv [o, i, kh, kw] -> [o, kh, kw, i], then runs of 4 along i."""
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(-1, 4)


@pytest.fixture()
def model():
    return resnet_tiny()


def test_unstructured_layer_scope_zeroes_the_ratio_in_every_layer(model):
    original = _state(model)
    res = apply_sparsity(model, 0.5, "unstructured")
    _ = [torch.testing.assert_close(v, original[k], rtol=0, atol=0) for k, v in model.state_dict().items()]  # input untouched
    assert res.module is not model and res.skipped == []
    assert {entry["name"] for entry in res.layers} == set(_layers(model))
    for name, layer in _layers(res.module).items():
        w, w0 = layer.weight.detach(), _layers(model)[name].weight.detach()
        zeros = int((w == 0).sum())
        assert abs(zeros - 0.5 * w.numel()) <= 1, name
        kept = w != 0
        torch.testing.assert_close(w[kept], w0[kept], rtol=0, atol=0)  # survivors keep their values
        assert w0[~kept].abs().max() <= w0[kept].abs().min()  # and they are the largest magnitudes
    assert res.sparsity == pytest.approx(0.5, abs=1e-4)


def test_global_scope_hits_the_ratio_overall_not_per_layer(model):
    res = apply_sparsity(model, 0.7, "unstructured", scope="global")
    total = sum(e["params"] for e in res.layers)
    assert abs(res.sparsity * total - 0.7 * total) <= 1
    per_layer = [e["sparsity"] for e in res.layers]
    assert max(per_layer) - min(per_layer) > 0.05  # magnitudes compared across layers


def test_2_4_keeps_two_of_every_four_input_channels(model):
    res = apply_sparsity(model, 0.5, "2:4")
    assert res.skipped == [{"name": "stem.0", "reason": "input channels per group (3) not divisible by 4"}]
    layers = _layers(res.module)
    covered = [e["name"] for e in res.layers]
    assert "fc" in covered and "stem.0" not in covered and len(covered) == len(layers) - 1
    for name in covered:
        w, w0 = layers[name].weight.detach(), _layers(model)[name].weight.detach()
        zeros_per_group = (_groups_of_4(w) == 0).sum(dim=1)
        assert torch.all(zeros_per_group == 2), name
        groups, groups0 = _groups_of_4(w).abs(), _groups_of_4(w0).abs()
        kept_min = groups.masked_fill(groups == 0, float("inf")).min(dim=1).values
        dropped_max = groups0.masked_fill(groups != 0, 0).max(dim=1).values
        assert torch.all(dropped_max <= kept_min), name  # the 2 largest of each group survive
    torch.testing.assert_close(layers["stem.0"].weight, _layers(model)["stem.0"].weight, rtol=0, atol=0)
    assert res.sparsity == pytest.approx(0.5)
    assert res.to_json()["pattern"] == "2:4"


def test_ignored_and_protected_layers_stay_dense(model):
    res = apply_sparsity(model, 0.5, "unstructured", ignore=["layers.0", "*.downsample.*"], protect=["fc"])
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert reasons["layers.0.conv1"] == reasons["layers.0.conv2"] == "ignored"
    assert reasons["layers.1.downsample.0"] == "ignored" and reasons["fc"] == "protected"
    dense_layers, sparse_layers = _layers(model), _layers(res.module)
    for name in reasons:
        torch.testing.assert_close(sparse_layers[name].weight, dense_layers[name].weight, rtol=0, atol=0)
    assert all(e["name"] not in reasons for e in res.layers)


def test_plain_weights_and_json(model):
    res = apply_sparsity(model, 0.5, "unstructured")
    assert res.module.state_dict().keys() == model.state_dict().keys()  # no weight_orig / weight_mask left
    assert all(type(m.weight) is nn.Parameter for m in _layers(res.module).values())
    assert not any(hasattr(m, "weight_mask") or m._forward_pre_hooks for m in res.module.modules())
    data = json.loads(json.dumps(res.to_json()))
    assert data["sparsity"] == pytest.approx(0.5, abs=1e-4) and data["note"] == SPARSITY_NOTE
    assert {"name", "shape", "sparsity"} <= set(data["layers"][0])
    assert "onnxruntime" in SPARSITY_NOTE and "TensorRT" in SPARSITY_NOTE and "2:4" in SPARSITY_NOTE


def test_bad_arguments(model):
    with pytest.raises(UsageError, match="2:4"):
        apply_sparsity(model, 0.6, "2:4")
    with pytest.raises(UsageError, match="global"):
        apply_sparsity(model, 0.5, "2:4", scope="global")
    with pytest.raises(UsageError):
        apply_sparsity(model, 1.0, "unstructured")
    with pytest.raises(UsageError):
        apply_sparsity(model, 0.5, "4:8")
    with pytest.raises(UsageError, match="'layers.9'"):
        apply_sparsity(model, 0.5, ignore=["layers.9"])
    with pytest.raises(ModelError, match="no Conv/Linear"):
        apply_sparsity(model, 0.5, ignore=["*"])


def test_sparse_export_zips_smaller(model, tmp_path):
    example = {"image": torch.randn(1, 3, 32, 32)}
    sparse = apply_sparsity(model, 0.5, "unstructured")
    export_onnx(model, example, tmp_path / "dense.onnx")
    export_onnx(sparse.module, example, tmp_path / "sparse.onnx")
    dense_zip, sparse_zip = zipped_size(tmp_path / "dense.onnx"), zipped_size(tmp_path / "sparse.onnx")
    raw = (tmp_path / "dense.onnx").stat().st_size
    assert abs((tmp_path / "sparse.onnx").stat().st_size - raw) < 0.05 * raw  # stored dense: same file size
    assert sparse_zip < 0.8 * dense_zip, (sparse_zip, dense_zip)


def test_zipped_size_counts_external_data(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"\x00" * 1000)
    alone = zipped_size(onnx_file)
    (tmp_path / "m.onnx.data").write_bytes(torch.randn(10_000).numpy().tobytes())
    assert zipped_size(onnx_file) > alone + 30_000  # float noise barely compresses


def test_masks_survive_distillation_with_after_step(model):
    calib = [{"image": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    res = apply_sparsity(model, 0.5, "2:4")
    distill(res.module, model, calib, steps=20, lr=1e-3, after_step=res.after_step)
    for name, mask in res.masks.items():
        assert torch.all(res.module.get_submodule(name).weight[~mask] == 0), name
    res.refresh()
    assert res.sparsity == pytest.approx(0.5)
    # Without re-applying, Adam moves the zeros: the masks are what keeps them.
    loose = apply_sparsity(model, 0.5, "2:4")
    distill(loose.module, model, calib, steps=5, lr=1e-3)
    loose.refresh()
    assert loose.sparsity < 0.45


def test_reapply_on_another_copy_and_mismatch(model):
    res = apply_sparsity(model, 0.5, "unstructured")
    other = resnet_tiny()
    res.reapply(other)
    assert int((other.fc.weight == 0).sum()) == int((res.module.fc.weight == 0).sum())
    with pytest.raises(ModelError):
        res.reapply(nn.Sequential(nn.Linear(2, 2)))
