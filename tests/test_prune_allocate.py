"""Per-block ratios (compress.pruning.allocate): the greedy choice, per-module ratios in prune_model, the blocks
found, and the whole allocation on a model where one block is fragile and another is cheap to cut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.core import UsageError
from compress.pruning.allocate import (
    ENOUGH,
    MAX_TIMED,
    ProbeRecovery,
    allocate,
    greedy_path,
    next_state,
    prune_units,
)
from compress.pruning.structural import prune_model
from compress.zoo import resnet_tiny


def choose(options, target):
    """The state the walk starts from: the first on the greedy path whose estimate saves `target`, else the last."""
    path = greedy_path(options)
    return next((ratios for est, ratios in path if est >= target), path[-1][1])


def test_choose_takes_the_least_loss_per_saving_until_the_target():
    options = {
        "fragile": [(0.25, 1.0, 1.0), (0.5, 2.0, 3.0)],  # 1.0 loss per ms
        "cheap": [(0.25, 1.0, 0.01), (0.5, 2.0, 0.05), (0.75, 3.0, 0.2)],  # 0.01-0.15 per ms
        "rounded": [(0.25, 0.0, 0.0), (0.5, 0.0, 0.0)],  # rounding left nothing to cut: never chosen
    }
    assert choose(options, 2.0) == {"fragile": 0.0, "cheap": 0.5, "rounded": 0.0}
    assert choose(options, 3.5) == {"fragile": 0.25, "cheap": 0.75, "rounded": 0.0}
    assert choose(options, 100.0) == {"fragile": 0.5, "cheap": 0.75, "rounded": 0.0}  # all there is
    assert choose(options, 0.0) == {"fragile": 0.0, "cheap": 0.0, "rounded": 0.0}


def test_choose_looks_past_a_ratio_that_rounding_made_free_of_savings():
    # 0.25 saves nothing (rounded back), 0.5 saves a lot for little: the step 0 -> 0.5 must be seen
    options = {"a": [(0.25, 0.0, 0.0), (0.5, 4.0, 0.1)], "b": [(0.25, 1.0, 0.5)]}
    assert choose(options, 1.0) == {"a": 0.5, "b": 0.0}


def test_greedy_path_moves_one_unit_at_a_time_with_growing_savings():
    options = {"fragile": [(0.25, 1.0, 1.0), (0.5, 2.0, 3.0)], "cheap": [(0.25, 1.0, 0.01), (0.5, 2.0, 0.05)]}
    path = greedy_path(options)
    assert [est for est, _ in path] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [r for _, r in path] == [{"fragile": 0.0, "cheap": 0.0}, {"fragile": 0.0, "cheap": 0.25},
                                    {"fragile": 0.0, "cheap": 0.5}, {"fragile": 0.25, "cheap": 0.5},
                                    {"fragile": 0.5, "cheap": 0.5}]


def test_the_walk_moves_one_state_on_a_near_miss_and_jumps_on_a_far_one():
    est = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    n = len(est)
    assert next_state(est, 4, ENOUGH * 0.9, 0, n) == 5  # a little short: one more move
    assert next_state(est, 4, ENOUGH * 1.1, 0, n) == 3  # enough: is one move less enough too?
    assert next_state(est, 2, ENOUGH * 0.4, 0, n) == 5  # far short: to the state whose estimate would do (4.5 -> 5)
    assert next_state(est, 8, ENOUGH * 2.0, 0, n) == 4  # far over: back to where the estimate says (4.0)
    assert next_state(est, 4, ENOUGH * 0.9, 4, 5) is None  # 4 short, 5 known enough: nothing between
    assert next_state(est, 2, ENOUGH * 0.4, 2, 4) == 3  # the jump stays between what is known
    assert next_state(est, 1, ENOUGH * 1.1, 0, 1) is None  # one move is enough; state 0 cuts nothing


def _widths(m: nn.Module) -> dict[str, int]:
    return {n: x.out_channels for n, x in m.named_modules() if isinstance(x, nn.Conv2d)}


def test_prune_model_takes_a_ratio_per_module():
    model = resnet_tiny()
    ex = {"image": torch.randn(1, 3, 32, 32)}
    names = {n: 0.0 for n, _ in model.named_children()} | {f"layers.{i}": 0.0 for i in range(4)}
    res = prune_model(model, ex, ratio=0.0, ratios={**names, "layers.3": 0.5})
    before, after = _widths(model), _widths(res.module)
    changed = {n for n in before if before[n] != after[n]}
    assert changed and all(n.startswith("layers.3.") for n in changed)
    assert after["layers.3.conv1"] == before["layers.3.conv1"] // 2
    assert res.ratios["layers.3"] == 0.5
    with pytest.raises(UsageError, match="no such module"):
        prune_model(model, ex, ratio=0.0, ratios={"nope": 0.5})
    with pytest.raises(UsageError, match=r"in \[0, 1\)"):
        prune_model(model, ex, ratio=0.0, ratios={"layers.3": 1.0})
    with pytest.raises(UsageError):
        prune_model(model, ex, ratio=0.0)  # 0 only with per-module ratios


def test_units_are_the_stages_and_the_other_weighted_children():
    assert list(prune_units(resnet_tiny())) == ["stem", "layers.0", "layers.1", "layers.2", "layers.3", "fc"]
    deep = nn.Sequential(nn.Conv2d(3, 8, 3), *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(40)])
    units = prune_units(deep)
    assert len(units) <= 16  # runs of consecutive blocks, the stem conv among them
    assert [n for v in units.values() for n in v] == [str(i) for i in range(41)]


class TwoBranch(nn.Module):
    """Two independent branches of the same cost: `fragile` feeds the output at 100x the weight of `cheap`, so
    cutting it costs far more accuracy for the same time saved."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def branch() -> nn.Sequential:
            s = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 3, padding=1))
            for p in s.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.1
            return s

        self.fragile, self.cheap = branch(), branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100 * self.fragile(x) + self.cheap(x)


def test_allocate_cuts_the_cheap_block_and_spares_the_fragile_one():
    model = TwoBranch().eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 8, 16, 16, generator=g)} for _ in range(6)]
    alloc = allocate(model, {"x": batches[0]["x"][:1]}, batches[:4], batches[4:], ratio=0.25, rounds=60, prune_first_conv=True)
    assert alloc.ratios["cheap"] > alloc.ratios["fragile"]
    assert alloc.ratios["cheap"] >= 0.5  # it took the uniform cut's saving from the cheap branch
    probes = {(p.unit, p.ratio): p for p in alloc.probes}
    assert probes[("fragile", 0.25)].loss > 10 * probes[("cheap", 0.25)].loss
    assert alloc.baseline_ms > 0 and alloc.target_ms_saved > 0
    assert alloc.to_json()["method"] == "measured" and set(alloc.to_json()["ratios"]) == {"fragile", "cheap"}
    # every timed choice is reported, and the kept one is among them with the time it saved
    assert 1 <= len(alloc.tried) <= MAX_TIMED
    kept = [t for t in alloc.to_json()["tried"] if t["ratios"] == alloc.ratios]
    assert len(kept) == 1 and kept[0]["ms_saved"] == alloc.ms_saved
    # the kept state is the least cut measured to save enough beside the uniform cut, if any did
    enough = [t for t in alloc.tried if t["share_of_uniform"] >= ENOUGH]
    if enough:
        assert kept[0] in enough and sum(kept[0]["ratios"].values()) == min(sum(t["ratios"].values()) for t in enough)


def test_probes_are_judged_after_a_short_recovery_as_the_stage_will_run_it():
    model = TwoBranch().eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 8, 16, 16, generator=g)} for _ in range(6)]
    alloc = allocate(model, {"x": batches[0]["x"][:1]}, batches[:4], batches[4:], ratio=0.25, rounds=60, prune_first_conv=True,
                     recovery=ProbeRecovery(steps=20))
    cut = [p for p in alloc.probes if p.macs_saved > 0]
    assert cut and all(p.loss_unrecovered is not None and p.loss <= p.loss_unrecovered * 1.01 + 1e-9 for p in cut)
    assert sum(p.loss < 0.9 * p.loss_unrecovered for p in cut) >= len(cut) // 2  # recovery took back part of it
    assert alloc.ratios["cheap"] > alloc.ratios["fragile"]
    assert alloc.to_json()["probe_recovery_steps"] == 20
    plain = allocate(model, {"x": batches[0]["x"][:1]}, batches[:4], batches[4:], ratio=0.25, rounds=60, prune_first_conv=True)
    assert plain.probe_recovery_steps == 0 and all(p.loss == p.loss_unrecovered for p in plain.probes)
    assert model.fragile[0].weight.shape[0] == 64  # the user's model is left as it was
