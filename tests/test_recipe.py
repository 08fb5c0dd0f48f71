"""`compress run --config RECIPE.yaml`: options from a file (flag names as keys, paths relative to the file), flags
overriding it, and the run's resolved options in report.json repeating the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_a_recipe_from_a_reports_options_repeats_a_flag_driven_run(tmp_path):
    work = tmp_path / "proj"
    work.mkdir()
    images = np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32)
    np.savez(work / "calib.npz", image=images)
    flags = _cli("run", "compress.zoo:resnet_tiny", "--calib", "calib.npz", "--device", "host", "--prune", "0.25",
                 "--no-recover", "--quant", "none", "--runs", "5", "--no-tune-threads", "-o", "by-flags", cwd=work)
    assert flags.returncode == 0, flags.stderr
    first = _report(work / "by-flags")
    recipe = dict(first["recipe"])
    assert recipe["prune"] == 0.25 and recipe["tune-threads"] is False and recipe["calib"] == str(work / "calib.npz")
    recipe["output"] = "again"  # relative to the recipe's folder, wherever the command runs from
    (work / "recipes").mkdir()
    (work / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    again = _cli("run", "--config", str(work / "recipes" / "tiny.yaml"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    second = _report(work / "recipes" / "again")
    assert {**second["recipe"], "output": None} == {**first["recipe"], "output": None}
    assert [v["name"] for v in second["variants"]] == [v["name"] for v in first["variants"]] == ["fp32", "pruned"]
    assert second["stages"]["prune"]["structural"] == first["stages"]["prune"]["structural"]
    assert [v["params"] for v in second["variants"]] == [v["params"] for v in first["variants"]]


def test_flags_override_the_file_and_paths_are_the_files(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    np.savez(folder / "calib.npz", image=np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32))
    (folder / "r.yaml").write_text("model: compress.zoo:resnet_tiny\ncalib: calib.npz\nquant: none\nruns: 5\n"
                                   "no-tune-threads: true\noutput: out\n")
    r = _cli("run", "--config", str(folder / "r.yaml"), "--runs", "3", "-o", str(tmp_path / "mine"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = _report(tmp_path / "mine")["recipe"]
    assert rec["runs"] == 3 and rec["output"] == str(tmp_path / "mine") and rec["calib"] == str(folder / "calib.npz")
    assert rec["tune-threads"] is False and not (folder / "out").exists()


def test_bad_recipes_are_one_line_usage_errors(tmp_path):
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("model: compress.zoo:resnet_tiny\nprnue: 0.3\n")
    r = _cli("run", "--config", str(bad_key), "--input-shape", "1,3,32,32", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "no option prnue" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad_value = tmp_path / "v.yaml"
    bad_value.write_text("model: compress.zoo:resnet_tiny\ninput-shape: 1,3,32,32\nprune: lots\noutput: o\n")
    r = _cli("run", "--config", str(bad_value))
    assert r.returncode == 2 and "--prune" in r.stderr
    not_yaml = tmp_path / "n.yaml"
    not_yaml.write_text("- just\n- a list\n")
    r = _cli("run", "--config", str(not_yaml))
    assert r.returncode == 1 and "mapping" in r.stderr
    assert not (tmp_path / "o").exists()
