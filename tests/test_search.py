"""`compress search` and `compress sweep`: the search space, the pick, early stopping, and small real searches on
an embedded Ray (a few trials of a tiny model: what CI can afford)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress.core.errors import InputError, UsageError
from compress.tuning import SearchSettings
from compress.tuning.space import label, normalise, space_for, trial_seed
from compress.tuning.study import recommend
from compress.tuning.sweep import cells, load_sweep
from compress.tuning.trials import Hopeless, objective
from compress.zoo import encoder_tiny, resnet_tiny
from devices.loader import load_profile

# A model that only runs with all of its channels: every pruned trial crashes (in the prune stage's fidelity
# check), the unpruned ones finish. What a user's model with a hard-coded shape assertion does.
CHANNEL_CHECK = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, image):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn(self.conv(image))))))  # conv is the first: kept
        if x.shape[1] != 32:
            raise RuntimeError("this model needs all 32 channels")
        return self.fc(x.mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net()
'''


def _cli(*args: str, cwd: Path | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_COMPRESS_CACHE": str(cache)} if cache is not None else None
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env=env)


def _variant(name: str, p50: float, fid: float, settings: str = "s") -> dict:
    return {"name": name, "latency_ms": {"p50": p50}, "fidelity": {"top1_agreement": fid}, "settings": settings}


def test_pick_is_the_most_faithful_within_the_budget_or_the_fastest_above_the_floor():
    cands = [_variant("fp32", 10.0, 1.0), _variant("a:int8", 3.0, 0.97), _variant("b:int8", 2.0, 0.95),
             _variant("c:pruned", 1.0, 0.80)]
    best, why = recommend(cands, budget=4.0, floor=0.9, scored=False, goal="fidelity")
    assert best["name"] == "a:int8" and "most faithful" in why and "4 ms budget" in why
    best, why = recommend(cands, budget=4.0, floor=0.9, scored=False, goal="speed")
    assert best["name"] == "b:int8" and "fastest" in why
    best, _ = recommend(cands, budget=None, floor=0.9, scored=False, goal="speed")
    assert best["name"] == "b:int8"
    best, why = recommend(cands, budget=0.5, floor=0.9, scored=False)
    assert best is None and "no model met the 0.5 ms budget" in why and "c:pruned" in why
    best, why = recommend(cands, budget=4.0, floor=0.99, scored=False)
    assert best is None and "reached 0.99" in why and "a:int8" in why


def test_objective_orders_trials_as_the_pick_does():
    within = [objective(f, None, p, 4.0, 0.9, "fidelity") for f, p in ((0.97, 3.0), (0.95, 2.0))]
    over = [objective(f, None, p, 4.0, 0.9, "fidelity") for f, p in ((1.0, 4.5), (1.0, 40.0))]
    assert within[0] > within[1] > max(over) and over[0] > over[1]  # over budget: below all within, by excess
    fast = objective(0.95, 3.0, 2.0, None, 0.9, "speed")
    slow = objective(0.97, 1.5, 3.0, None, 0.9, "speed")
    below = [objective(f, 5.0, 1.0, None, 0.9, "speed") for f in (0.85, 0.5)]
    assert fast > slow > 0 > below[0] > below[1]
    assert objective(None, None, None, None, None, "fidelity") < min(below + over)


def test_hopeless_stopper_stops_only_a_pruned_model_below_the_floor():
    stop = Hopeless(0.9)
    assert stop("t", {"stage": "pruned", "fidelity": 0.85}) is True
    assert stop("t", {"stage": "pruned", "fidelity": 0.95}) is False
    assert stop("t", {"stage": "done", "fidelity": 0.5}) is False  # a finished trial is reported, not stopped
    assert Hopeless(None)("t", {"stage": "pruned", "fidelity": 0.1}) is False


def test_space_fits_the_model_and_device():
    host = load_profile("host")
    cnn = space_for(resnet_tiny(), host, 0.5)
    assert cnn.importances[0] == "l2" and "bn_scale" in cnn.importances and "random" not in cnn.importances
    assert "bn_scale" not in space_for(encoder_tiny(), host, 0.5).importances  # no BatchNorm to score
    assert cnn.quants == (["none", "int8", "fp8"] if host.fp8 else ["none", "int8"])
    assert cnn.start() == {"prune": 0.0, "importance": "l2", "quant": "int8", "method": "minmax", "fallback": 1.0}
    with pytest.raises(UsageError, match="no FP8 hardware"):
        space_for(resnet_tiny(), load_profile("rpi4-cortex-a72"), 0.5, ["fp8"])
    with pytest.raises(UsageError, match="--prune-max 1"):
        space_for(resnet_tiny(), host, 1.0)


def test_configs_normalise_label_and_seed_stably():
    a = normalise({"prune": 0.30000000000000004, "importance": "lamp", "quant": "none", "method": "entropy", "fallback": 0.5})
    assert a == {"prune": 0.3, "importance": "lamp", "quant": "none"}  # unused keys dropped
    assert label({"prune": 0.0, "importance": "l2", "quant": "int8", "method": "minmax", "fallback": 0.0}) == \
        "prune 0, int8, minmax, no fallback"
    assert trial_seed({"prune": 0.30000000000000004, "quant": "none"}, 1) == trial_seed({"prune": 0.3, "quant": "none"}, 1)
    assert trial_seed({"prune": 0.3, "quant": "none"}, 1) != trial_seed({"prune": 0.3, "quant": "none"}, 2)


def test_settings_checks():
    with pytest.raises(UsageError, match="give --eval"):
        SearchSettings(model="m", max_accuracy_drop=0.01).check()
    with pytest.raises(UsageError, match="must be > 0 ms"):
        SearchSettings(model="m", latency_budget_ms=0).check()
    assert SearchSettings(model="m", min_fidelity=0.97).tolerance() == pytest.approx(0.03)
    assert SearchSettings(model="m", latency_budget_ms=5).goal() == "fidelity"
    assert SearchSettings(model="m").goal() == "speed"


def test_sweep_file_is_validated_and_its_paths_resolved(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "sweep.yaml"
    f.write_text("models:\n  - model: compress.zoo:resnet_tiny\n    calib: data/c.npz\n  - model: net.py:build\n"
                 "    input_shape: ['1,3,8,8']\ndevices: [host]\ngrid:\n  prune: [0.0, 0.5]\n  quant: [none, int8]\n")
    sweep = load_sweep(f)
    assert sweep.models[0].calib == str(tmp_path / "sub" / "data" / "c.npz")
    assert sweep.models[1].model == f"{tmp_path / 'sub' / 'net.py'}:build"
    grid = cells(sweep)
    assert len(grid) == 2 * 1 * 4 and {(c["prune"], c["quant"]) for c in grid} == {(0.0, "none"), (0.0, "int8"),
                                                                                  (0.5, "none"), (0.5, "int8")}
    for text, message in (("models: []\n", "field 'models'"),
                          ("models:\n  - model: m\n    input_shape: ['1']\ngrid:\n  ratio: [1]\n", "unknown key 'ratio'"),
                          ("models:\n  - model: m\n", "give either input_shape or calib"),
                          ("models: [\n", "not valid YAML|YAML")):
        f.write_text(text)
        with pytest.raises(InputError, match=message):
            load_sweep(f)
    r = _cli("sweep", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("search")
    (d / "net.py").write_text(CHANNEL_CHECK)
    r = _cli("search", f"{d / 'net.py'}:build", "--input-shape", "1,3,16,16", "--trials", "3", "--seed", "4",
             "--runs", "3", "--prune-max", "0.5", "--latency-budget", "1000", "--min-fidelity", "0.5",
             "--json", str(d / "s.json"), "-o", str(d / "out"),
             cache=d / "cache")  # set up before the per-test cache: its own, never ~/.cache's
    return d, r


def test_search_reports_crashed_trials_and_recommends_a_finished_one(searched):
    d, r = searched
    assert r.returncode == 0, r.stderr
    out = d / "out"
    s = json.loads((out / "search.json").read_text())
    assert json.loads((d / "s.json").read_text()) == s
    trials = s["trials"]
    assert len(trials) == 3
    first = next(t for t in trials if t["config"] == {"prune": 0.0, "quant": "int8", "method": "minmax", "fallback": 1.0})
    assert first["status"] == "done"  # the starting point is compress run's default
    crashed = [t for t in trials if t["status"] == "crashed"]
    assert crashed, "seed 4 should try a pruning that removes channels"
    for t in crashed:
        assert t["config"]["prune"] > 0 and "needs all 32 channels" in t["error"]
    for t in trials:  # a pruned trial that finished removed nothing (channels round to the device's multiple)
        if t["status"] == "done" and t["config"]["prune"] > 0:
            rep = json.loads(Path(t["report"]).read_text())
            assert rep["stages"]["prune"]["structural"]["params_ratio"] == 1.0
    assert s["recommended"] and s["recommended"] in s["pareto"]
    best = json.loads((out / "best" / "report.json").read_text())  # compress run's own report format
    assert {v["name"] for v in best["variants"]} >= {"fp32"} and best["schema"]
    assert Path(s["best_onnx"]).exists()
    md = (out / "search.md").read_text()
    assert "crashed" in md and "needs all 32 channels" in md and "## Pareto set" in md
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "needs all 32 channels" in r.stdout and "Traceback" not in r.stderr
    assert not list((out / "trials").glob(".*partial*"))


def test_search_refuses_to_overwrite_and_resumes(searched):
    d, _ = searched
    r = _cli("search", f"{d / 'net.py'}:build", "--input-shape", "1,3,16,16", "--trials", "3", "-o", str(d / "out"))
    assert r.returncode == 2 and "--resume" in r.stderr
    before = json.loads((d / "out" / "search.json").read_text())
    r = _cli("search", f"{d / 'net.py'}:build", "--input-shape", "1,3,16,16", "--trials", "3", "--seed", "4",
             "--runs", "3", "--prune-max", "0.5", "--latency-budget", "1000", "--min-fidelity", "0.5", "--resume",
             "-o", str(d / "out"))
    assert r.returncode == 0, r.stderr
    after = json.loads((d / "out" / "search.json").read_text())
    assert [t["id"] for t in after["trials"]] == [t["id"] for t in before["trials"]]  # nothing rerun
    assert [t["status"] for t in after["trials"]] == [t["status"] for t in before["trials"]]
    r = _cli("search", f"{d / 'net.py'}:build", "--input-shape", "1,3,16,16", "--resume", "-o", str(d / "fresh"))
    assert r.returncode == 2 and "no search to continue" in r.stderr


def test_sweep_runs_every_cell_into_one_table(tmp_path):
    (tmp_path / "sw.yaml").write_text("models:\n  - model: compress.zoo:resnet_tiny\n    input_shape: ['1,3,32,32']\n"
                                      "devices: [host]\ngrid:\n  quant: [none, int8]\nruns: 3\n")
    r = _cli("sweep", str(tmp_path / "sw.yaml"), "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert [c["status"] for c in s["cells"]] == ["done", "done"]
    assert sorted(c["final"]["name"] for c in s["cells"]) == ["fp32", "int8"]
    for c in s["cells"]:
        assert c["recommended"] in ("fp32", "int8") and c["p50_ms"] > 0 and Path(c["report"]).exists()
    md = (tmp_path / "o" / "sweep.md").read_text()
    assert md.count("| compress.zoo:resnet_tiny | host |") == 2 and "sweep.png" in md


def _ray_processes() -> list[str]:
    """The embedded Ray's own processes (their command lines name its temp folder), from /proc."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "edge-compress-ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "default_worker" in cmd):
                found.append(cmd[:120])
    return found


def test_sigterm_stops_a_search_like_ctrl_c(tmp_path):
    """SIGTERM mid-search (issue 16): exit 143 and one line (Ray's driver prints a 16-line stack dump on its own),
    Ray's processes gone, no trial's partial folder left; finished trials stay for --resume."""
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "search", "compress.zoo:resnet_tiny",
                             "--input-shape", "1,3,32,32", "--trials", "3", "--runs", "3", "-o", str(out)],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "trials").glob(".*.partial-*")) if (out / "trials").is_dir() else []:
            break  # a trial is building its variants
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("warning:", "progress:"))]
    assert lines == ["error: terminated by SIGTERM"], stderr
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes() == []
