"""`compress run`: report.json schema, variants, recommendation, and all-or-nothing output folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compress.core import write_manifest

VARIANT_KEYS = {"name", "onnx", "size_bytes", "params", "macs", "latency_ms", "speedup_vs_fp32", "fidelity", "simulated",
                "excluded_layers", "within_tolerance"}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_run_prune_quant_none_report(tmp_path):
    out = tmp_path / "out"
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--device", "host", "--prune", "0.5",
             "--quant", "none", "--runs", "5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["fp32", "pruned"]
    fp32, pruned = rep["variants"]
    for v in rep["variants"]:
        assert VARIANT_KEYS <= set(v)
        assert set(v["latency_ms"]) == {"p50", "p90", "p99", "mean", "std"}
        assert {"cosine_min", "cosine_mean", "rel_l2", "top1_agreement"} <= set(v["fidelity"])
        assert v["simulated"] is False and v["speedup_vs_fp32"] > 0
        sess = ort.InferenceSession(str(out / v["onnx"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["image"]
    assert pruned["params"] < 0.4 * fp32["params"] and pruned["macs"] < fp32["macs"]
    assert fp32["speedup_vs_fp32"] == 1.0 and fp32["fidelity"]["top1_agreement"] == 1.0
    assert rep["recommended"] in ("fp32", "pruned") and rep["reason"]
    assert rep["device"]["name"] == "host" and rep["host"]["arch"] in ("x86_64", "arm64")
    assert "recommended:" in r.stdout
    spent = rep["stage_seconds"]  # what the user waited for, stage by stage (issue 19)
    assert list(spent) == ["export", "prune", "profile", "judge"] and spent["prune"] > 0 and spent["profile"] > 0
    assert "stages: export" in r.stdout
    md = (out / "report.md").read_text()  # the human-readable report and its plot come with every run
    assert "Wall-clock per stage: export" in md
    assert f"**{rep['recommended']}" in md and "| pruned" in md and "](tradeoff.png)" in md
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_ignore_keeps_those_layers_at_full_width(tmp_path):
    out = tmp_path / "out"
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--prune", "0.5", "--ignore", "stem",
             "--ignore", "layers.0", "--no-recover", "--quant", "none", "--runs", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    s = rep["stages"]["prune"]["structural"]
    assert s["ignored"] == ["stem", "layers.0"]
    changed = {layer["name"] for layer in s["layers"]}
    assert changed and not any(n == "stem" or n.startswith(("stem.", "layers.0.")) for n in changed)
    assert any(n.startswith("layers.3.") for n in changed)
    assert "`layers.0`" in (out / "report.md").read_text()


def test_failed_run_leaves_output_folder_as_it_was(tmp_path):
    (tmp_path / "noisy.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Noisy(nn.Module):\n    def forward(self, x):\n        return x + torch.rand_like(x)\n\n"
        "def build():\n    return Noisy()\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier run's folder, which a failed run must leave as it was
    (out / "keep.txt").write_text("earlier results")
    write_manifest(out)
    r = _cli("run", f"{tmp_path / 'noisy.py'}:build", "--input-shape", "2,8", "--runs", "3", "-o", str(out))
    assert r.returncode == 1 and "differs from torch" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".edge-compress-run.json", "keep.txt", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noisy.py", "out"]  # no partial folders left


@pytest.mark.parametrize("args,text", [
    (["--input-shape", "1,3,32,32", "--prune", "0"], "--prune 0.0"),
    (["--input-shape", "1,3,32,32", "--prune", "half"], "neither a fraction (0.3) nor 'auto'"),
    (["--input-shape", "1,3,32,32", "--prune", "auto", "--no-recover"], "does not take --no-recover"),
    (["--input-shape", "1,3,32,32", "--quant", "fp8"], "no FP8 hardware"),
    (["--input-shape", "1,3,32,32", "--device", "nosuch"], "unknown device"),
    (["--input-shape", "1,3,32,32", "--ignore", "stem"], "is about pruning: give --prune too"),
    (["--input-shape", "1,3,32,32", "--prune", "0.5", "--ignore", "no.such.layer", "--quant", "none"],
     "--ignore 'no.such.layer' matches no module"),
])
def test_run_usage_errors(tmp_path, args, text):
    r = _cli("run", "compress.zoo:resnet_tiny", *args, "-o", str(tmp_path / "o"))
    assert r.returncode in (1, 2) and text in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_run_int8_and_simulated_fp8_variants(tmp_path):
    out = tmp_path / "q"
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--quant", "int8", "--runs", "5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["fp32", "int8"]
    int8 = rep["variants"][1]
    assert int8["simulated"] is False and int8["latency_ms"]["p50"] > 0 and int8["speedup_vs_fp32"] > 0
    assert int8["fidelity"]["cosine_mean"] > 0.98 and rep["stages"]["quantize"]["preset"]["name"]
    assert "int8" in rep["stages"]["quantize"]["op_selection"]["decision"].lower()
    out8 = tmp_path / "f"
    # --eval: a user's score decides "within tolerance"; the FP8 variant is scored under the options it needs
    (tmp_path / "score.py").write_text(
        "import numpy as np, onnxruntime as ort\n"
        "def score(path, session_options=None):\n"
        "    s = ort.InferenceSession(path, session_options, providers=['CPUExecutionProvider'])\n"
        "    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)\n"
        "    return float(s.run(None, {'image': x})[0].max())\n")
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--quant", "fp8", "--simulate", "--runs", "5",
             "--eval", f"{tmp_path / 'score.py'}:score", "--tolerance", "1000", "-o", str(out8))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out8 / "report.json").read_text())
    assert rep["tolerance_on"].startswith("drop of --eval")
    fp8 = rep["variants"][1]
    assert isinstance(rep["variants"][0]["accuracy"], float) and fp8["within_tolerance"] is True
    assert fp8["accuracy"] == pytest.approx(rep["variants"][0]["accuracy"], rel=0.2)
    assert fp8["name"] == "fp8" and fp8["simulated"] is True and fp8["latency_ms"] is None and fp8["speedup_vs_fp32"] is None
    assert fp8["fidelity"]["cosine_mean"] > 0.98
    assert rep["recommended"] == "fp32" and "simulated" in rep["reason"]


def test_rerun_reuses_finished_stages_and_force_redoes_them(tmp_path):
    base = ["run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--prune", "0.5", "--no-recover",
            "--quant", "int8", "--no-op-select", "--runs", "3"]
    first = tmp_path / "a"
    r = _cli(*base, "-o", str(first))
    assert r.returncode == 0, r.stderr
    rep = json.loads((first / "report.json").read_text())
    assert rep["cache"]["stages"] == {"export": "miss", "prune": "miss", "quantize-unpruned": "miss", "quantize": "miss"}
    assert rep["stages"]["quantize"]["fallback"]["against"] == "reference"  # the tolerance is on fp32 -> int8
    second = tmp_path / "b"
    r = _cli(*base, "-o", str(second))
    assert r.returncode == 0, r.stderr
    rep2 = json.loads((second / "report.json").read_text())
    assert rep2["cache"]["stages"] == {"export": "hit", "prune": "hit", "quantize-unpruned": "hit", "quantize": "hit"}
    for name in ("fp32.onnx", "pruned.onnx", "int8-unpruned.onnx", "int8.onnx"):  # the same artifacts, measured again
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert rep2["stages"]["prune"] == rep["stages"]["prune"]
    assert all(v["latency_ms"]["p50"] > 0 for v in rep2["variants"])
    # a changed option invalidates only what depends on it; --force redoes everything
    r = _cli(*base, "--tolerance", "0.2", "-o", str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "report.json").read_text())["cache"]["stages"] == {
        "export": "hit", "prune": "hit", "quantize-unpruned": "miss", "quantize": "miss"}
    r = _cli(*base, "--force", "-o", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp_path / "d" / "report.json").read_text())["cache"]["stages"].values()) == {"forced"}


def test_pruning_that_misses_backs_off_to_quantizing_the_unpruned_model(tmp_path):
    """Issue 17: with --prune and --quant the run also quantizes the unpruned model; when the cut costs too much
    (50% without recovery on resnet_tiny) the INT8 of the unpruned model is still there to recommend."""
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--prune", "0.5", "--no-recover",
             "--no-op-select", "--tolerance", "0.1", "--runs", "3", "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    v = {x["name"]: x for x in rep["variants"]}
    assert list(v) == ["fp32", "pruned", "int8-unpruned", "int8"]  # the final (pruned + INT8) variant stays last
    assert v["int8-unpruned"]["from"] == "fp32" and v["int8"]["from"] == "pruned"
    assert v["pruned"]["within_tolerance"] is False and v["int8"]["within_tolerance"] is False
    # INT8 of the unpruned model: per-channel weights on a random CNN stay within 10% top-1 of fp32
    assert v["int8-unpruned"]["fidelity"]["top1_agreement"] >= 0.9 and v["int8-unpruned"]["within_tolerance"]
    assert rep["recommended"] in ("fp32", "int8-unpruned")  # the faster of the two on this machine
    assert rep["reason"].endswith("the pruned model missed the tolerance: `--prune auto` finds the largest cut within it")
    assert rep["stages"]["quantize_unpruned"]["format"] == "int8" and (tmp_path / "out" / "int8-unpruned.onnx").is_file()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "### Quantize the unpruned model (the back-off)" in md
    # the pruned model is already outside the tolerance: no layer kept in float can win it back, so none is searched
    fb = rep["stages"]["quantize"]["fallback"]
    assert fb["input_error"] > 0.1 and "already outside the tolerance" in fb["skipped"] and v["int8"]["excluded_layers"] == []
    assert "not searched: the float model quantization starts from is already outside" in md
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--prune", "0.5", "--no-recover",
             "--no-op-select", "--no-backoff", "--runs", "3", "-o", "out2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x["name"] for x in json.loads((tmp_path / "out2" / "report.json").read_text())["variants"]] == [
        "fp32", "pruned", "int8"]


def test_cache_entry_without_meta_is_never_read(tmp_path):
    from compress.pipeline.stage_cache import StageCache, key_of

    cache = StageCache(tmp_path / "c")
    out = tmp_path / "m.onnx"
    key = key_of("export", ["x"])
    (tmp_path / "c" / "export" / key).mkdir(parents=True)
    (tmp_path / "c" / "export" / key / "m.onnx").write_bytes(b"half-written")
    calls = []

    def compute():
        calls.append(1)
        out.write_bytes(b"real")
        return {"ok": True}

    assert cache.run("export", key, [out], compute) == {"ok": True} and calls == [1]
    out.unlink()
    assert cache.run("export", key, [out], compute) == {"ok": True} and calls == [1]  # now a hit
    assert out.read_bytes() == b"real" and cache.events["export"] == "hit"
    assert key_of("export", ["x"]) != key_of("export", ["x", None]) != key_of("export", [["x"]])


def test_changed_code_is_a_new_cache_key(tmp_path, monkeypatch):
    """The stage cache's key holds a digest of the installation's own code, so a pulled or edited checkout
    (same version string) does not reuse what the old code wrote."""
    import shutil

    import compress.pipeline.stage_cache as sc

    top = Path(sc.__file__).resolve().parents[2]
    copy = tmp_path / "tree"
    for pkg in sc.CODE_PACKAGES:
        shutil.copytree(top / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert sc.tree_digest(copy) == sc.code_digest()
    f = copy / "compress" / "quantization" / "int8.py"
    f.write_text(f.read_text() + "\n# an edit\n")
    assert sc.tree_digest(copy) != sc.code_digest()
    before = sc.key_of("export", ["x"])
    monkeypatch.setattr(sc, "code_digest", lambda: "another checkout")
    assert sc.key_of("export", ["x"]) != before


def test_run_with_the_inc_backend(tmp_path):
    """--backend inc quantizes the torch module (pruned here: the prune stage keeps it for INC) through INC's PT2E
    path; `compress quantize`, which has only ONNX, refuses it with a usage error."""
    out = tmp_path / "inc"
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--prune", "0.25", "--no-recover",
             "--backend", "inc", "--tolerance", "0.5", "--runs", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    q = rep["stages"]["quantize"]
    assert q["backend"] == "inc" and q["quantizer"]["backend"] == "inc" and q["quantizer"]["int8_kernels"]
    int8 = rep["variants"][-1]
    pruned = next(v for v in rep["variants"] if v["name"] == "pruned")
    # judged against the pruned model it came from: how much pruning loses depends on the host's channel multiple
    # (8 on AVX2, 16 with AVX-512), and INC's full-range weights lose a little more on x86 without VNNI
    assert int8["name"] == "int8" and int8["from"] == "pruned"
    assert int8["fidelity"]["cosine_mean"] > pruned["fidelity"]["cosine_mean"] - 0.05 > 0.8
    r = _cli("quantize", str(out / "fp32.onnx"), "--backend", "inc", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "compress run" in r.stderr and not (tmp_path / "x.onnx").exists()


def test_cache_key_of_a_user_file_model_is_the_same_in_every_process(model_file):
    """A model from FILE.py:factory is imported under a generated module name; the key must not depend on it
    (Python's str hash changes per process)."""
    code = ("import sys; from compress.models.loading import load_model; from compress.pipeline.stage_cache import key_of; "
            "print(key_of('export', ['x'], [load_model(sys.argv[1]).module]))")
    keys = {subprocess.run([sys.executable, "-c", code, f"{model_file}:build"], capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)}
    assert len(keys) == 1 and len(next(iter(keys))) == 64


def test_run_int4_weight_only_under_an_avg_bits_budget(tmp_path):
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, input_ids=rng.integers(0, 1000, (24, 16)), attention_mask=np.ones((24, 16), np.int64))
    out = tmp_path / "i4"
    r = _cli("run", "compress.zoo:encoder_tiny", "--calib", str(calib), "--quant", "int4", "--avg-bits", "6",
             "--salience", "proxy", "--runs", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    fp32, int4 = rep["variants"]
    q = rep["stages"]["quantize"]
    assert int4["name"] == "int4" and int4["size_bytes"] < fp32["size_bytes"] and int4["speedup_vs_fp32"] > 0
    assert q["avg_bits"] <= 6 and q["quantizer"]["counts"]["int8"] > 0 and q["quantizer"]["salience_from"] == "proxy"
    assert int4["fidelity"]["cosine_min"] > 0.99  # half the layers 8-bit on a tiny random encoder
    sess = ort.InferenceSession(str(out / int4["onnx"]), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(out / int4["onnx"])).graph.node)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    md = (out / "report.md").read_text()
    assert "## INT4 layers above 4 bits" in md and "Weight-only INT4:** block 32, budget `--avg-bits 6`" in md
    r = _cli("run", "compress.zoo:encoder_tiny", "--calib", str(calib), "--quant", "none", "--avg-bits", "6",
             "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "--quant int4" in r.stderr and not (tmp_path / "x").exists()


def test_a_variant_with_non_finite_outputs_is_never_recommended():
    """A top-1 'agreement' of NaN outputs is no agreement: the variant is outside the tolerance and the reason
    says why (issue 16)."""
    from compress.pipeline.run import recommend
    from compress.report import Fidelity, Variant

    def variant(name, fid, speedup):
        return Variant(name=name, onnx=f"{name}.onnx", size_bytes=100, params=1, macs=1, simulated=False,
                       excluded_layers=[], speedup_vs_fp32=speedup, fidelity=fid,
                       within_tolerance=fid.within(0.01))

    clean = Fidelity(cosine_min=1.0, top1_agreement=1.0, samples=16, nonfinite_samples=0)
    broken = Fidelity(cosine_min=0.0, top1_agreement=1.0, samples=16, nonfinite_samples=3)
    assert clean.within(0.01) and not broken.within(0.5)
    name, why = recommend([variant("fp32", clean, 1.0), variant("int8", broken, 3.0)], 0.01)
    assert name == "fp32" and "int8 gives NaN or Inf outputs on 3 of 16 held-out samples" in why


CANCEL_NET = """
import torch
from torch import nn


class CancelNet(nn.Module):
    # The weakest half of conv1's channels (by L2) carry the positive part of conv2's sum: finite in fp32, and
    # log(relu(.)) of the half-pruned copy is log(0) = -inf everywhere.
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 1, bias=False)
        self.conv2 = nn.Conv2d(64, 1, 1, bias=False)
        with torch.no_grad():
            self.conv1.weight[:32].fill_(0.02)
            self.conv1.weight[32:].fill_(1.0)
            self.conv2.weight[:, :32].fill_(1.0)
            self.conv2.weight[:, 32:].fill_(-0.01)

    def forward(self, image):
        return torch.log(torch.relu(self.conv2(torch.relu(self.conv1(image)))))


def build():
    return CancelNet()
"""


def test_run_rejects_a_variant_whose_own_outputs_are_not_finite(tmp_path):
    """Through the real CLI: the pruned model gives -inf on real data; its export is still faithful (-inf where
    torch has -inf), and the run recommends fp32, saying why, with no warning leaking (issue 16)."""
    (tmp_path / "cancel.py").write_text(CANCEL_NET)
    np.savez(tmp_path / "calib.npz", image=np.random.default_rng(0).uniform(1, 10, (16, 3, 8, 8)).astype(np.float32))
    # conv1 is the first convolution, kept by default: --prune-first-conv cuts it
    r = _cli("run", "cancel.py:build", "--calib", "calib.npz", "--prune", "0.5", "--prune-first-conv", "--no-recover",
             "--quant", "none", "--runs", "3", "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    pruned = next(v for v in rep["variants"] if v["name"] == "pruned")
    assert pruned["fidelity"]["nonfinite_samples"] == 4 and pruned["within_tolerance"] is False
    assert rep["recommended"] == "fp32" and "pruned gives NaN or Inf outputs on 4 of 4 held-out samples" in rep["reason"]
    assert "pruned gives NaN or Inf outputs" in r.stdout


def test_output_that_is_a_symlink_leaves_nothing_beside_it(tmp_path):
    """-o LINK -> an earlier run folder: the link is replaced by the new folder, the folder it pointed to stays as
    it was, and no .LINK.old-* is left beside it (issue 16)."""
    base = ["run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--quant", "none", "--runs", "3"]
    earlier = tmp_path / "earlier"
    assert _cli(*base, "-o", str(earlier)).returncode == 0
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    (tmp_path / "out").symlink_to(earlier)
    r = _cli(*base, "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out").is_symlink()
    assert (tmp_path / "out" / "report.json").is_file()
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".stage-cache") == ["earlier", "out"]  # conftest's cache


UNCOUNTABLE = """
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cache = self.conv.weight * 1.0  # a non-leaf tensor: Torch-Pruning's counter cannot deep-copy it

    def forward(self, image):
        if any("FlopCounter" in type(m).__name__ for m in _get_current_dispatch_mode_stack()):
            raise RuntimeError("this forward refuses to be counted")
        return self.conv(image).mean((2, 3))


def build():
    return Net()
"""


def test_a_model_no_counter_can_count_is_counted_from_its_export(tmp_path):
    """MACs are a figure for the report: where neither Torch-Pruning's nor torch's counter runs the model, the run
    counts them on the exported graph and says so, instead of stopping (issue 19)."""
    (tmp_path / "net.py").write_text(UNCOUNTABLE)
    r = _cli("run", "net.py:build", "--input-shape", "1,3,16,16", "--quant", "none", "--runs", "3", "-o", "out",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "counting MACs failed" in r.stderr and "MACs counted from the exported ONNX graph" in r.stderr
    fp32 = json.loads((tmp_path / "out" / "report.json").read_text())["variants"][0]
    assert fp32["macs"] == 16 * 16 * 8 * 3 * 9  # the conv's, from shape inference
