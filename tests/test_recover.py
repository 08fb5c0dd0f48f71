"""Distillation recovers fidelity on held-out inputs, leaves the teacher alone, and fails safely; --finetune hooks."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.core.errors import InputError, ModelError, UsageError
from compress.evaluate.compare import fidelity, torch_outputs
from compress.pruning.recover import distill, load_finetune, run_finetune
from compress.zoo import resnet_tiny


def _batches(seed: int, count: int, size: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(size, 3, 32, 32, generator=gen)} for _ in range(count)]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.fixture()
def teacher():
    return resnet_tiny()


@pytest.fixture()
def calib():
    return _batches(1, 4, 8)


@pytest.fixture()
def held_out():
    return _batches(2, 2, 16)


def _pruned(teacher: torch.nn.Module) -> torch.nn.Module:
    student = copy.deepcopy(teacher)
    tp.pruner.MetaPruner(student, torch.randn(1, 3, 32, 32), importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=0.5, ignored_layers=[student.fc]).step()
    return student


def _perturbed(teacher: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * p.std().nan_to_num(1.0) * torch.randn(p.shape, generator=gen))
    return student


def test_distilling_a_pruned_student_improves_held_out_fidelity(teacher, calib, held_out):
    student = _pruned(teacher)
    teacher_state = _state(teacher)
    bn_stats = {k: v for k, v in _state(student).items() if "running" in k}
    ref = torch_outputs(teacher, held_out)
    before = fidelity(ref, torch_outputs(student, held_out))
    seen_steps, losses = [], []
    res = distill(student, teacher, calib, steps=100, lr=1e-3, after_step=lambda m: seen_steps.append(m),
                  on_step=lambda i, loss: losses.append((i, loss)))
    after = fidelity(ref, torch_outputs(student, held_out))
    assert res["steps"] == 100 and res["stopped"] == "steps" and res["lr"] == 1e-3
    assert res["loss_last"] < 0.5 * res["loss_first"]
    assert after["cosine_mean"] > before["cosine_mean"] + 0.1, (before, after)
    assert after["rel_l2"] < 0.8 * before["rel_l2"], (before, after)
    _assert_same_state(_state(teacher), teacher_state)  # the teacher never trains
    assert not teacher.training and not student.training
    # eval mode throughout: BatchNorm statistics are not re-estimated on the small calibration set
    _assert_same_state({k: v for k, v in _state(student).items() if "running" in k}, bn_stats)
    assert len(seen_steps) == 100 and all(m is student for m in seen_steps)
    assert [i for i, _ in losses] == list(range(1, 101)) and losses[0][1] == res["loss_first"]


def test_default_learning_rate_also_helps(teacher, calib, held_out):
    student = _perturbed(teacher)
    ref = torch_outputs(teacher, held_out)
    before = fidelity(ref, torch_outputs(student, held_out))
    distill(student, teacher, calib, steps=60)
    after = fidelity(ref, torch_outputs(student, held_out))
    assert after["rel_l2"] < before["rel_l2"] and after["cosine_mean"] > before["cosine_mean"]


def test_time_budget_is_respected(teacher, calib):
    student = _perturbed(teacher)
    start = time.perf_counter()
    res = distill(student, teacher, calib, steps=100_000, time_budget_s=0.4)
    elapsed = time.perf_counter() - start
    assert res["stopped"] == "time_budget" and 1 <= res["steps"] < 100_000
    assert res["seconds"] <= 0.4 + 0.25 and elapsed < 0.4 + 0.5


def test_training_mode_is_restored_and_teacher_untouched_in_train_mode(teacher, calib):
    student = _perturbed(teacher).train()
    teacher.train()
    state = _state(teacher)
    distill(student, teacher, calib, steps=3)
    assert student.training and teacher.training
    _assert_same_state(_state(teacher), state)  # train() mode would have updated BN stats had it run in it


def test_diverging_loss_raises_and_restores_the_student(teacher, calib):
    student = _perturbed(teacher)
    before = _state(student)
    with pytest.raises(ModelError, match="diverged|non-finite") as exc:
        distill(student, teacher, calib, steps=50, lr=1e10)
    assert "\n" not in str(exc.value)
    _assert_same_state(_state(student), before)


def test_nan_producing_student_raises_and_is_restored(teacher, calib):
    student = _perturbed(teacher)
    with torch.no_grad():
        student.fc.bias[0] = float("nan")
    before = _state(student)
    with pytest.raises(ModelError, match="not finite before distillation"):
        distill(student, teacher, calib, steps=10)
    _assert_same_state(_state(student), before)


def test_forward_failure_is_a_model_error_and_restores(teacher, calib):
    student = _perturbed(teacher)
    before = _state(student)
    bad = calib[:1] + [{"image": torch.randn(2, 5, 32, 32)}]  # wrong channel count in the second batch
    with pytest.raises(ModelError, match="forward"):
        distill(student, teacher, bad, steps=10)
    _assert_same_state(_state(student), before)


def test_bad_arguments(teacher, calib):
    with pytest.raises(UsageError, match="shares weights"):
        distill(teacher, teacher, calib, steps=1)
    with pytest.raises(UsageError):
        distill(_perturbed(teacher), teacher, [], steps=1)
    with pytest.raises(UsageError):
        distill(_perturbed(teacher), teacher, calib, steps=1, lr=-1.0)


FINETUNE_FILE = """
import torch
from torch import nn
from torch import nn

def in_place(model, batches):
    assert isinstance(batches, list) and "image" in batches[0]
    with torch.no_grad():
        model.fc.bias.fill_(1.5)
    model.train()  # a training loop may leave it so

def replace(model, batches):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

def broken(model, batches):
    raise ValueError("out of labels\\nsecond line")

def not_a_model(model, batches):
    return 42
"""


@pytest.fixture()
def finetune_file(tmp_path):
    path = tmp_path / "tune.py"
    path.write_text(FINETUNE_FILE)
    return path


def test_finetune_in_place_and_replacement(finetune_file, teacher, calib):
    fn = load_finetune(f"{finetune_file}:in_place")
    out = run_finetune(fn, teacher, calib)
    assert out is teacher and not out.training and torch.all(teacher.fc.bias == 1.5)
    new = run_finetune(load_finetune(f"{finetune_file}:replace"), teacher, calib)
    assert isinstance(new, torch.nn.Sequential) and not new.training


def test_finetune_failures_are_one_line_model_errors(finetune_file, teacher, calib):
    with pytest.raises(ModelError, match="finetune broken raised ValueError: out of labels$"):
        run_finetune(load_finetune(f"{finetune_file}:broken"), teacher, calib)
    with pytest.raises(ModelError, match="returned int"):
        run_finetune(load_finetune(f"{finetune_file}:not_a_model"), teacher, calib)


def test_load_finetune_specs(finetune_file):
    assert callable(load_finetune("compress.zoo:resnet_tiny"))  # module:fn form
    with pytest.raises(UsageError):
        load_finetune("no_colon_here")
    with pytest.raises(ModelError, match="--finetune .*no_such_fn"):
        load_finetune(f"{finetune_file}:no_such_fn")
    with pytest.raises(InputError, match="--finetune"):
        load_finetune(f"{finetune_file.parent / 'missing.py'}:fn")


def test_training_that_makes_things_worse_is_undone(teacher, calib):
    student = _perturbed(teacher, scale=0.001)  # already almost the teacher: a large step can only hurt
    before = _state(student)
    res = distill(student, teacher, calib, steps=10, lr=0.05)
    assert res["restored"] and res["loss_after"] == res["loss_before"] and res["steps"] == 10
    _assert_same_state(_state(student), before)
    res = distill(student, teacher, calib, steps=10, lr=1e-5)
    assert not res["restored"] and res["loss_after"] < res["loss_before"]


def test_batchnorm_statistics_are_reestimated_from_the_calibration_samples():
    from compress.pruning.recover import recalibrate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4), nn.BatchNorm1d(4)).eval()
    bn = net[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as after pruning the channels before it
    bn.running_var.fill_(9.0)
    batches = [{"input": torch.randn(1, 3, 8, 8) * 2 + 1} for _ in range(64)]  # batch 1: merged to 2 x 32
    x = torch.cat([b["input"] for b in batches])
    with torch.no_grad():
        feats = net[0](x)
    res = recalibrate_batchnorm(net, batches)
    assert res == {"layers": 2, "samples": 64} and not net.training and not bn.training
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.1  # put back for any later training


def test_batchnorm_left_as_it_was_when_it_cannot_be_estimated():
    from compress.pruning.recover import recalibrate_batchnorm

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    before = {k: v.clone() for k, v in net[2].state_dict().items()}
    res = recalibrate_batchnorm(net, [{"input": torch.randn(1, 4)}])  # one value per channel: no variance
    assert res["layers"] == 0 and "more than 1 value" in res["skipped"]
    for k, v in net[2].state_dict().items():
        assert torch.equal(v, before[k])


# --- augmented views and early stopping (issue 17) --------------------------------------------------------------


def test_augmented_views_keep_shapes_padding_and_the_batch_vocabulary():
    from compress.pruning.recover import augment_batch

    gen = torch.Generator().manual_seed(0)
    img = torch.rand(8, 3, 32, 32)
    ids = torch.randint(5, 50, (4, 16))
    ids[:, 12:] = 0
    mask = (ids != 0).long()
    a = augment_batch({"image": img, "input_ids": ids, "attention_mask": mask}, gen)
    assert a["image"].shape == img.shape and a["image"].dtype == img.dtype and not torch.equal(a["image"], img)
    assert torch.equal(a["attention_mask"], mask)  # a mask is left as it is
    assert torch.equal(a["input_ids"] == 0, ids == 0)  # padding stays padding
    assert set(a["input_ids"].unique().tolist()) <= set(ids.unique().tolist())  # ids of the batch only
    assert 0 < int((a["input_ids"] != ids).sum()) < ids.numel() // 4  # ~10% of the tokens replaced
    b = augment_batch({"image": img}, torch.Generator().manual_seed(0))
    assert torch.equal(b["image"], augment_batch({"image": img}, torch.Generator().manual_seed(0))["image"])  # seeded


def test_validation_keeps_the_best_weights_and_records_the_curve(teacher, calib, held_out):
    """With validation batches: a curve of (seconds, loss, agreement) and the weights of its lowest loss, never worse
    than where it started on those batches; a learning rate far too high stops early instead of running on."""
    from compress.pruning.recover import _calib_loss, _output_weights, _teacher_targets

    val = _batches(5, 2, 8)
    student = _pruned(teacher)
    targets = _teacher_targets(teacher, val)
    weights = _output_weights(_teacher_targets(teacher, calib))  # distill scales outputs by the training batches
    before = _calib_loss(student, val, targets, weights)
    res = distill(student, teacher, calib, steps=400, lr=1e-3, augment=True, validation=val, eval_every=20)
    curve = res["curve"]
    assert res["augmented"] and res["validation_samples"] == 16 and curve[0][0] == 0.0 and len(curve) >= 3
    assert curve[0][1] == pytest.approx(before, rel=1e-5)
    assert _calib_loss(student, val, targets, weights) == pytest.approx(min(c[1] for c in curve), rel=1e-5)
    assert min(c[1] for c in curve) < before
    wild = _pruned(teacher)
    res = distill(wild, teacher, calib, steps=5000, lr=0.5, augment=True, validation=val, eval_every=10, patience=3)
    assert res["stopped"] == "early" and res["steps"] < 5000
    assert _calib_loss(wild, val, targets, weights) <= before * 1.0001  # the start, or better, was kept


def test_a_plateau_takes_the_rate_down_its_decay_before_training_stops(teacher, calib):
    """With augmentation, patience running out does not stop training at the rate it has: the rest of the cosine
    decay runs within ANNEAL of the steps, then it stops (a student equal to its teacher never improves)."""
    import copy

    from compress.pruning.recover import ANNEAL

    twin = copy.deepcopy(teacher)
    res = distill(twin, teacher, calib, steps=200, lr=1e-3, augment=True, validation=_batches(5, 1, 8), eval_every=5,
                  patience=2)
    start = res["annealed_from"]["step"]
    assert res["stopped"] == "early" and 100 <= start < 200 - int(ANNEAL * 200)  # from half the budget on
    assert res["steps"] == start + int(ANNEAL * 200)


def test_feature_hints_match_the_main_blocks_and_leave_no_hooks_behind(teacher, calib):
    """Hints go to a model's blocks (not its stem's conv/bn/relu), and the teacher and student keep no hook."""
    from compress.pruning.recover import _block_names
    from compress.zoo import encoder_tiny

    assert _block_names(teacher) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert _block_names(encoder_tiny()) == ["layers.0", "layers.1"]
    student = _pruned(teacher)
    res = distill(student, teacher, calib, steps=30, lr=1e-3, augment=True, validation=_batches(5, 1, 8), eval_every=10)
    assert res["loss_before"] > 0.3  # far from the teacher (0.71 measured): hints on
    assert res["feature_hints"] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    for m in (*teacher.modules(), *student.modules()):
        assert not m._forward_hooks


def test_weights_run_channels_last_and_come_back_as_they_were(teacher, calib):
    """Distillation runs the convolutions channels-last (~1.5x the steps in a time budget) and hands both
    models back in the layout they came in: the teacher is the user's model, the student is exported next."""
    from compress.pruning.recover import channels_last

    student = _pruned(teacher)
    convs = [m.weight for m in (*teacher.modules(), *student.modules()) if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    state = _state(teacher)
    with channels_last(teacher, student):
        seen = [w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs]
    assert convs and all(seen)
    distill(student, teacher, calib, steps=20, lr=1e-3, augment=True, validation=_batches(5, 1, 8), eval_every=5)
    assert all(p.is_contiguous() for p in (*teacher.parameters(), *student.parameters()))
    _assert_same_state(_state(teacher), state)
    already = copy.deepcopy(teacher).to(memory_format=torch.channels_last)  # a user's channels-last model stays so
    kept = [m.weight for m in already.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    with channels_last(already):
        pass
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in kept)
