"""The core install (issue 20): a fresh venv with only `pip install .` profiles an ONNX file and refuses what needs
an extra with one line naming it. Slow (it builds a venv and installs the core from the package index), so it
is marked `install` and run by `make test-install` in CI, not by every `make test`."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.install


def test_the_core_install_profiles_and_names_the_extra_it_lacks(tmp_path, matmul_onnx):
    env_dir = tmp_path / "core"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    have = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch', 'ray', "
                           "'matplotlib', 'transformers', 'neural_compressor') if u.find_spec(m)])"],
                          capture_output=True, text=True)
    assert have.stdout.strip() == "[]", have.stdout  # the core brings none of the extras
    compress = env_dir / "bin" / "compress"
    model = matmul_onnx(tmp_path / "m.onnx")
    prof = subprocess.run([str(compress), "profile", str(model), "--runs", "10", "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert prof.returncode == 0, prof.stderr[-2000:]
    cmp = subprocess.run([str(compress), "compare", str(tmp_path / "p.json"), str(tmp_path / "p.json"),
                          "--max-regression", "5%"], capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    prune = subprocess.run([str(compress), "prune", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--ratio",
                            "0.5", "-o", str(tmp_path / "p.onnx")], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert prune.returncode == 1
    assert prune.stderr.strip() == ("error: compress prune: this needs torch, which is not installed: "
                                    "pip install 'edge-compress[torch]'")
    assert not (tmp_path / "p.onnx").exists()


def test_every_extra_named_in_the_messages_exists():
    import tomllib

    from compress.core import EXTRA_OF

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras), set(EXTRA_OF.values()) - set(extras)
    assert sys.version_info >= (3, 11)
