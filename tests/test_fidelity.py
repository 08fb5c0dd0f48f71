"""Fidelity figures with known answers: identical, orthogonal perturbations, sign flips, zeros, NaN/inf, batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from compress.core.errors import ModelError
from compress.evaluate.compare import fidelity, onnx_outputs, torch_outputs
from export.onnx_export import export_onnx


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_identical_outputs_are_perfect():
    logits = _rng().normal(size=(20, 10)).astype(np.float32)
    hidden = _rng(1).normal(size=(20, 4, 8)).astype(np.float32)
    f = fidelity([logits, hidden], [logits.copy(), hidden.copy()])
    assert f["cosine_min"] == pytest.approx(1.0) and f["cosine_mean"] == pytest.approx(1.0)
    assert f["rel_l2"] == 0.0 and f["top1_agreement"] == 1.0 and f["samples"] == 20 and f["nonfinite_samples"] == 0


def test_orthogonal_perturbation_gives_analytic_cosine_and_rel_l2():
    # cand = ref + e with e orthogonal to ref per sample and ||e|| = a ||ref||: cos = 1/sqrt(1+a^2), rel_l2 = a.
    ref = _rng().normal(size=(16, 32))
    noise = _rng(1).normal(size=(16, 32))
    noise -= (np.einsum("ij,ij->i", noise, ref) / np.einsum("ij,ij->i", ref, ref))[:, None] * ref
    a = 0.3
    noise *= (a * np.linalg.norm(ref, axis=1) / np.linalg.norm(noise, axis=1))[:, None]
    f = fidelity([ref], [ref + noise])
    assert f["cosine_min"] == pytest.approx(1 / math.sqrt(1 + a * a), abs=1e-12)
    assert f["cosine_mean"] == pytest.approx(1 / math.sqrt(1 + a * a), abs=1e-12)
    assert f["rel_l2"] == pytest.approx(a, abs=1e-12)


def test_scaling_and_sign_flip():
    ref = _rng().normal(size=(8, 5))
    doubled = fidelity([ref], [2 * ref])
    assert doubled["cosine_min"] == pytest.approx(1.0) and doubled["rel_l2"] == pytest.approx(1.0)
    assert doubled["top1_agreement"] == 1.0
    flipped = fidelity([ref], [-ref])
    assert flipped["cosine_mean"] == pytest.approx(-1.0) and flipped["rel_l2"] == pytest.approx(2.0)


def test_cosine_spans_all_outputs_of_a_sample():
    # Per sample the concatenation is [a, b] with a = (1,1,1), b = (1); the candidate flips b:
    # cos = (|a|^2 - |b|^2) / (|a|^2 + |b|^2) = (3 - 1) / 4, rel_l2 = ||2b|| / ||[a, b]|| = 2 / 2.
    a = np.ones((6, 3))
    b = np.ones((6, 1, 1))
    f = fidelity([a, b], [a, -b])
    assert f["cosine_min"] == pytest.approx(0.5) and f["cosine_mean"] == pytest.approx(0.5)
    assert f["rel_l2"] == pytest.approx(1.0)


def test_top1_agreement_counts_changed_predictions_and_needs_classifier_shape():
    ref = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]] * 5.0  # [8, 4] one-hot-ish logits
    cand = ref.copy()
    cand[[1, 6], :] = cand[[1, 6], ::-1]  # two samples now predict another class
    assert fidelity([ref], [cand])["top1_agreement"] == pytest.approx(6 / 8)
    seq = _rng().normal(size=(4, 7, 10))
    assert fidelity([seq], [seq])["top1_agreement"] is None  # 3-D: not a classifier output
    single = _rng().normal(size=(4, 1))
    assert fidelity([single], [single])["top1_agreement"] is None  # one class: argmax means nothing
    assert fidelity([seq, ref[:4]], [seq, ref[:4]])["top1_agreement"] is None  # only the FIRST output counts


def test_batches_are_concatenated_and_torch_and_numpy_agree():
    ref = _rng().normal(size=(12, 6)).astype(np.float32)
    cand = ref + 0.1 * _rng(1).normal(size=(12, 6)).astype(np.float32)
    whole = fidelity([ref], [cand])
    batched = fidelity([[ref[:5]], [ref[5:9]], [ref[9:]]], [[cand[:5]], [cand[5:9]], [cand[9:]]])
    as_torch = fidelity([[torch.from_numpy(ref[:5])], [torch.from_numpy(ref[5:])]], [torch.from_numpy(cand)])
    assert batched["samples"] == whole["samples"] == as_torch["samples"] == 12
    for key in ("cosine_min", "cosine_mean", "rel_l2", "top1_agreement"):
        assert batched[key] == pytest.approx(whole[key], rel=1e-12)
        assert as_torch[key] == pytest.approx(whole[key], rel=1e-12)


def test_zero_vectors():
    ref = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    cand = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    f = fidelity([ref], [cand])
    assert f["cosine_min"] == 0.0 and f["cosine_mean"] == pytest.approx(1 / 3)  # both zero -> 1; one zero -> 0
    zero = np.zeros((3, 2))
    assert fidelity([zero], [zero])["rel_l2"] == 0.0
    assert fidelity([zero], [cand])["rel_l2"] is None  # ||cand|| / 0 is not a number


def test_non_finite_candidate_is_json_safe():
    ref = _rng().normal(size=(4, 3))
    cand = ref.copy()
    cand[1, 0] = np.nan
    cand[2, 2] = np.inf
    f = fidelity([ref], [cand])
    assert f["cosine_min"] == 0.0 and f["cosine_mean"] == pytest.approx(0.5)  # the two broken samples count 0
    assert f["rel_l2"] is None and f["nonfinite_samples"] == 2
    assert f["top1_agreement"] <= 0.5  # broken samples never agree
    json.dumps(f, allow_nan=False)


def test_float32_extremes_do_not_overflow_cosine():
    big = np.full((2, 4), 3e38, dtype=np.float32)
    assert fidelity([big], [big])["cosine_min"] == pytest.approx(1.0)


def test_mismatches_are_model_errors():
    a = np.zeros((4, 3))
    with pytest.raises(ModelError, match="shape"):
        fidelity([a], [np.zeros((4, 2))])
    with pytest.raises(ModelError, match="outputs"):
        fidelity([a], [a, a])
    with pytest.raises(ModelError, match="no reference outputs"):
        fidelity([], [a])
    with pytest.raises(ModelError, match="number of samples"):
        fidelity([a, np.zeros((5, 1))], [a, np.zeros((5, 1))])


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.drop(torch.relu(self.body(x))) * mask
        return {"logits": self.head(h), "hidden": h}


def test_torch_outputs_run_eval_without_changing_the_model():
    torch.manual_seed(0)
    model = _TwoHeads().train()
    batches = [{"x": torch.randn(3, 6), "mask": torch.ones(3, 8)} for _ in range(2)]
    first, second = torch_outputs(model, batches), torch_outputs(model, batches)
    assert model.training  # restored
    assert [[o.shape for o in b] for b in first] == [[(3, 3), (3, 8)], [(3, 3), (3, 8)]]
    assert fidelity(first, second)["rel_l2"] == 0.0  # dropout off: deterministic
    with pytest.raises(ModelError, match="batch 0"):
        torch_outputs(model, [{"x": torch.randn(3, 5), "mask": torch.ones(3, 8)}])


def test_onnx_outputs_match_torch_and_feed_only_graph_inputs(tmp_path):
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    example = {"x": torch.randn(2, 6), "mask": torch.ones(2, 8)}
    export_onnx(model, example, tmp_path / "m.onnx", exporter="torchscript", opset=17, dynamic_batch=True)
    batches = [{"x": torch.randn(n, 6), "mask": torch.ones(n, 8), "not_an_input": torch.zeros(1)} for n in (3, 5)]
    ort_out = onnx_outputs(tmp_path / "m.onnx", batches)
    assert [o.shape for o in ort_out[1]] == [(5, 3), (5, 8)]
    f = fidelity(torch_outputs(model, [{k: b[k] for k in ("x", "mask")} for b in batches]), ort_out)
    assert f["cosine_min"] > 0.99999 and f["rel_l2"] < 1e-5 and f["top1_agreement"] == 1.0 and f["samples"] == 8
    with pytest.raises(ModelError, match="mask"):
        onnx_outputs(tmp_path / "m.onnx", [{"x": torch.randn(1, 6)}])
    with pytest.raises(ModelError, match="cannot load"):
        onnx_outputs(tmp_path / "missing.onnx", batches)


def test_language_model_outputs_are_judged_by_next_token_agreement_and_perplexity():
    """Logits [N, T, V] of known tokens: uniform logits have perplexity V; logits that put all the mass on the
    true next token have perplexity 1; one flipped arg-max among the judged positions costs exactly its share;
    padded positions count for nothing; the tolerance rule then bounds 1 - next-token agreement."""
    from compress.evaluate import judged

    n, t, v = 3, 6, 11
    ids = _rng(2).integers(0, v, size=(n, t))
    uniform = np.zeros((n, t, v), np.float32)
    sure = np.full((n, t, v), -30.0, np.float32)
    sure[np.arange(n)[:, None], np.arange(t - 1)[None], ids[:, 1:]] = 30.0
    f = fidelity([sure], [uniform], tokens=[{"input_ids": ids}])
    assert f["reference_perplexity"] == pytest.approx(1.0, abs=1e-9)
    assert f["perplexity"] == pytest.approx(v, rel=1e-9) and f["token_positions"] == n * (t - 1)
    flipped = sure.copy()
    flipped[1, 2] = -flipped[1, 2]  # that position's arg-max is another token now
    mask = np.ones((n, t), np.int64)
    mask[2, 3:] = 0  # the third row is padded after 3 tokens: it predicts 2 next tokens, not 5
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    f = fidelity([[sure[:2]], [sure[2:]]], [[flipped[:2]], [flipped[2:]]], tokens=batches)
    assert f["token_positions"] == 5 + 5 + 2 and f["next_token_agreement"] == pytest.approx(11 / 12)
    assert f["perplexity"] > 1.5 and judged(f) == ("next_token", pytest.approx(1 / 12))
    assert "next_token_agreement" not in fidelity([sure], [flipped])  # not asked for: the cosine rule stands
    # real text: the perplexity's relative increase is judged (flatter predictions on real text cost perplexity)
    f = fidelity([sure], [sure / 10], tokens=[{"input_ids": ids}], real_tokens=True)
    assert f["next_token_agreement"] == 1.0 and f["perplexity_increase"] == pytest.approx(f["perplexity"] - 1.0)
    assert judged(f) == ("perplexity", pytest.approx(f["perplexity"] - 1.0)) and f["perplexity"] > 1.01
    assert judged(fidelity([sure / 10], [sure], tokens=[{"input_ids": ids}], real_tokens=True)) == ("perplexity", 0.0)
    bad = flipped.copy()
    bad[0, 0, 0] = np.nan
    f = fidelity([sure], [bad], tokens=[{"input_ids": ids}])
    assert f["perplexity"] is None and f["nonfinite_samples"] == 1
