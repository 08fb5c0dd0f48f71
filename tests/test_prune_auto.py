"""--prune auto: bisection over the ratio for the largest cut within the tolerance (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from compress.models import load_model, prepare_inputs
from compress.pruning import PruneOptions, prune_stage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    calib = tmp_path_factory.mktemp("auto") / "calib.npz"
    np.savez(calib, image=np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32))
    loaded = load_model("compress.zoo:resnet_tiny")
    return loaded.module, prepare_inputs(loaded, (), str(calib))


def _auto(tiny, tolerance: float):
    model, prep = tiny
    opts = PruneOptions(ratio=0.75, auto=True, tolerance=tolerance, recover_seconds=2.0, round_to=8)
    return prune_stage(model, prep, opts)


def test_a_loose_tolerance_bisects_up_to_the_largest_ratio(tiny):
    module, res = _auto(tiny, 1.0)  # everything fits: every probe moves up
    probes = res.auto["probes"]
    assert [p["ratio"] for p in probes] == [0.375, 0.5625, 0.6562, 0.7031] and all(p["within"] for p in probes)
    assert res.auto["chosen"] == 0.7031 and res.structural["ratio"] == 0.7031
    assert sum(p.numel() for p in module.parameters()) < 0.25 * sum(p.numel() for p in tiny[0].parameters())


def test_nothing_fits_a_zero_tolerance_and_the_smallest_probe_is_returned(tiny):
    module, res = _auto(tiny, 0.0)  # a random net's top-1 flips at once: no probe fits, every probe moves down
    probes = res.auto["probes"]
    assert [p["ratio"] for p in probes] == [0.375, 0.1875, 0.0938, 0.0469] and not any(p["within"] for p in probes)
    assert res.auto["chosen"] is None and res.structural["ratio"] == 0.0469
    assert all(p["loss"] > 0 for p in probes)
    assert res.fidelity.loss() == pytest.approx(probes[-1]["loss"])
