"""--calib/--eval from the user's own data (compress.data): image folders, text files and Hugging Face datasets
built here on the fly, against .npz files built by hand from the same pixels and tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.core.errors import InputError, UsageError
from compress.data import DataOptions, ModelInputs, open_source, resolve_data
from compress.models.inputs import load_calib

PIL = pytest.importorskip("PIL.Image")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
IMAGE_MODEL = ModelInputs(names=("image",), required=("image",), shapes={"image": (None, 3, 16, 16)})


def _pixels(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _image_folder(root: Path, pixels: np.ndarray, labels: list[int] | None = None) -> Path:
    for i, img in enumerate(pixels):
        sub = root / f"class{labels[i]}" if labels is not None else root
        sub.mkdir(parents=True, exist_ok=True)
        PIL.fromarray(img).save(sub / f"{i:03d}.png")
    return root


def _by_hand(pixels: np.ndarray) -> np.ndarray:
    """What the model takes: [0, 1] pixels normalised per channel, channels first."""
    x = (pixels.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return x.transpose(0, 3, 1, 2)


def test_image_folder_gives_the_hand_built_tensors_and_class_labels(tmp_path):
    pixels = _pixels(6, 16, 16)
    labels = [0, 1, 0, 1, 1, 0]
    root = _image_folder(tmp_path / "imgs", pixels, labels)
    opts = DataOptions(mean=MEAN, std=STD, crop_pct=1.0)
    r = resolve_data(str(root), IMAGE_MODEL, opts, tmp_path, labels=True, option="--eval")
    data = load_calib(r.path)
    # files sorted within sorted class folders: class0 holds 0, 2, 5 and class1 1, 3, 4
    order = [0, 2, 5, 1, 3, 4]
    np.testing.assert_allclose(data["image"], _by_hand(pixels[order]), atol=1e-6)
    assert data["y"].tolist() == [0, 0, 0, 1, 1, 1]
    assert r.info["classes"] == ["class0", "class1"] and r.info["preprocess"]["size"] == [16, 16]
    assert any("size 16x16 from the model's input shape; crop_pct 1.0, mean (0.5, 0.4, 0.3), std (0.2, 0.25, 0.3) "
               "from the flags" in n for n in r.info["notes"])


def test_image_folder_resizes_the_shorter_side_then_center_crops(tmp_path):
    pixels = _pixels(2, 40, 30, seed=1)
    root = _image_folder(tmp_path / "imgs", pixels)
    r = resolve_data(str(root), IMAGE_MODEL, DataOptions(mean=MEAN, std=STD, crop_pct=0.5,
                                                         interpolation="bicubic"), tmp_path, max_samples=1)
    got = load_calib(r.path)["image"]
    im = PIL.fromarray(pixels[0]).resize((32, 42), PIL.Resampling.BICUBIC)  # 30 -> 16/0.5 = 32, 40 -> 42
    ref = np.asarray(im.crop((8, 13, 24, 29)))[None]
    assert got.shape == (1, 3, 16, 16)  # --max-calib read one
    np.testing.assert_allclose(got, _by_hand(ref), atol=1e-6)


def test_image_size_comes_from_the_model_config_and_defaults_are_said(tmp_path):
    root = _image_folder(tmp_path / "imgs", _pixels(1, 20, 20))
    model = ModelInputs(names=("x",), required=("x",), pretrained_cfg={"input_size": (3, 8, 8), "crop_pct": 1.0})
    src = open_source(str(root), model, DataOptions())
    assert src.plan.size == (8, 8) and src.plan.crop_pct == 1.0
    assert any("mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), interpolation bilinear from defaults" in n
               and "--mean" in n for n in src.notes)  # ImageNet's, said so
    with pytest.raises(UsageError, match="--image-size"):
        open_source(str(root), ModelInputs(names=("x",), required=("x",)), DataOptions())


def test_a_bad_image_is_named_or_skipped_and_counted(tmp_path):
    root = _image_folder(tmp_path / "imgs", _pixels(3, 16, 16))
    (root / "001.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"001\.png is not a readable image.*--skip-bad"):
        resolve_data(str(root), IMAGE_MODEL, DataOptions(), tmp_path / "a")
    r = resolve_data(str(root), IMAGE_MODEL, DataOptions(skip_bad=True), tmp_path / "b")
    assert load_calib(r.path)["image"].shape[0] == 2
    assert any("skipped 1 unreadable" in n for n in r.info["notes"])


def test_folder_with_no_images_and_unknown_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        open_source(str(tmp_path / "empty"), IMAGE_MODEL, DataOptions())
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="not a data source this tool reads"):
        open_source(str(tmp_path / "data.bin"), IMAGE_MODEL, DataOptions())
    with pytest.raises(InputError, match="not found"):
        open_source(str(tmp_path / "missing.npz"), IMAGE_MODEL, DataOptions())


def test_a_single_array_feeds_a_single_input_model_whatever_its_key(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "one.npz", pixels=x)
    np.save(tmp_path / "one.npy", x)
    for name in ("one.npz", "one.npy"):
        r = resolve_data(str(tmp_path / name), IMAGE_MODEL, DataOptions(), tmp_path / name.replace(".", "_"))
        np.testing.assert_array_equal(load_calib(r.path)["image"], x)
        assert any("the model's" in n and "'image'" in n for n in r.info["notes"])
    np.savez(tmp_path / "named.npz", image=x)  # keyed by the input: read in place, nothing written
    assert resolve_data(str(tmp_path / "named.npz"), IMAGE_MODEL, DataOptions(), tmp_path).path == str(tmp_path / "named.npz")
    two = ModelInputs(names=("a", "b"), required=("a", "b"))
    with pytest.raises(InputError, match="one input"):
        open_source(str(tmp_path / "one.npz"), two, DataOptions())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A real (word-level) Hugging Face fast tokenizer saved to a folder, as a model folder holds one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


TEXT_MODEL = ModelInputs(names=("input_ids", "attention_mask"), required=("input_ids", "attention_mask"))
LINES = ["the cat sat on the mat", "a dog ran far away", "the dog sat", "cat", "zebra on a mat"]


def _tokens_by_hand(folder: Path, lines: list[str], seq_len: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder)(lines, padding="max_length", truncation=True, max_length=seq_len,
                                                return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def test_text_file_is_tokenized_with_the_model_tokenizer(tokenizer_dir, tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("\n".join(LINES[:3]) + "\n\n" + "\n".join(LINES[3:]) + "\n")  # a blank line is not a sample
    opts = DataOptions(tokenizer=str(tokenizer_dir), seq_len=8)
    r = resolve_data(str(txt), TEXT_MODEL, opts, tmp_path)
    got, ref = load_calib(r.path), _tokens_by_hand(tokenizer_dir, LINES, 8)
    assert set(got) == {"input_ids", "attention_mask"}
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert got["input_ids"][4, 0] == 1  # "zebra": the tokenizer's [UNK]


def test_jsonl_and_csv_columns_with_labels(tokenizer_dir, tmp_path):
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(LINES)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("label,sentence\n" + "".join(f"{r['label']},{r['sentence']}\n" for r in rows))
    ref = _tokens_by_hand(tokenizer_dir, LINES, 6)
    for name in ("d.jsonl", "d.csv"):
        r = resolve_data(str(tmp_path / name), TEXT_MODEL, DataOptions(tokenizer=str(tokenizer_dir), seq_len=6),
                         tmp_path / name.replace(".", "_"), labels=True, option="--eval")
        got = load_calib(r.path)
        np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
        assert got["y"].tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(InputError, match="--column"):
        resolve_data(str(tmp_path / "d.jsonl"), TEXT_MODEL, DataOptions(tokenizer=str(tokenizer_dir), column="body"),
                     tmp_path)


def test_text_without_a_tokenizer_says_how_to_give_one(tmp_path):
    (tmp_path / "s.txt").write_text("the cat\n")
    with pytest.raises(UsageError, match="--tokenizer"):
        open_source(str(tmp_path / "s.txt"), TEXT_MODEL, DataOptions())


def test_hf_dataset_on_disk_gives_what_the_folder_and_text_give(tokenizer_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    pixels = _pixels(4, 16, 16, seed=3)
    ds = datasets.Dataset.from_dict({"img": [PIL.fromarray(p) for p in pixels], "label": [1, 0, 1, 0]},
                                    features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)}))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "imgds"))
    r = resolve_data(f"hf:{tmp_path / 'imgds'}", IMAGE_MODEL, DataOptions(mean=MEAN, std=STD, crop_pct=1.0), tmp_path,
                     labels=True, option="--eval")
    got = load_calib(r.path)
    np.testing.assert_allclose(got["image"], _by_hand(pixels), atol=1e-6)
    assert got["y"].tolist() == [1, 0, 1, 0]
    datasets.Dataset.from_dict({"text": LINES}).save_to_disk(str(tmp_path / "txtds"))
    r = resolve_data(f"hf:{tmp_path / 'txtds'}", TEXT_MODEL, DataOptions(tokenizer=str(tokenizer_dir), seq_len=8),
                     tmp_path / "t", max_samples=3)
    np.testing.assert_array_equal(load_calib(r.path)["input_ids"], _tokens_by_hand(tokenizer_dir, LINES[:3], 8)["input_ids"])
    with pytest.raises(InputError, match="no split 'train'"):
        open_source(f"hf:{tmp_path / 'imgds'}:train", IMAGE_MODEL, DataOptions())
    with pytest.raises(InputError, match="not a saved dataset folder nor in the local"):
        open_source("hf:nobody/no-such-dataset-here", IMAGE_MODEL, DataOptions())


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", "run", *args], capture_output=True, text=True, timeout=600)


def test_compress_run_on_an_image_folder_matches_the_hand_built_npz(tmp_path):
    """The demo model, its calibration and labelled sets as PNG folders (`python -m compress.zoo.shapes images`)
    and as .npz of the same 8-bit pixels: the same variants, fidelity and accuracy."""
    subprocess.run([sys.executable, "-m", "compress.zoo.shapes", "images", "--calib", str(tmp_path / "calib"),
                    "--eval", str(tmp_path / "eval"), "--n-calib", "32", "--n-eval", "64"], check=True, capture_output=True)
    from compress.zoo.shapes import MEAN as M
    from compress.zoo.shapes import STD as S

    def npz_of(folder: Path, labelled: bool) -> Path:
        files = sorted(folder.rglob("*.png"), key=lambda p: (p.parent.name, p.name))
        px = np.stack([np.asarray(PIL.open(p).convert("RGB")) for p in files])
        x = ((px.astype(np.float32) / 255.0 - M) / S).transpose(0, 3, 1, 2).astype(np.float32)
        out = folder.with_suffix(".npz")
        if labelled:
            np.savez(out, image=x, y=np.array([int(p.parent.name[:2]) for p in files]))
        else:
            np.savez(out, image=x)
        return out

    common = ["--device", "host", "--quant", "int8", "--no-op-select", "--runs", "3", "--tolerance", "0.02"]
    a = _run("compress.zoo:shapes_resnet", "--calib", str(tmp_path / "calib"), "--eval", str(tmp_path / "eval"),
             *common, "-o", str(tmp_path / "from-folders"))
    assert a.returncode == 0, a.stderr
    b = _run("compress.zoo:shapes_resnet", "--calib", str(npz_of(tmp_path / "calib", False)),
             "--eval", str(npz_of(tmp_path / "eval", True)), *common, "-o", str(tmp_path / "from-npz"))
    assert b.returncode == 0, b.stderr
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("from-folders", "from-npz"))
    assert [v["name"] for v in ra["variants"]] == [v["name"] for v in rb["variants"]] == ["fp32", "int8"]
    for va, vb in zip(ra["variants"], rb["variants"]):
        assert va["accuracy"] == pytest.approx(vb["accuracy"], abs=1e-9)
        assert va["fidelity"]["top1_agreement"] == pytest.approx(vb["fidelity"]["top1_agreement"], abs=1e-9)
    assert ra["calibration"]["source"] == str(tmp_path / "calib") and ra["calibration"]["data"]["eval"]["kind"] == "images"
    assert not list(tmp_path.glob(".edge-data-*"))  # the read-in copies are gone
    md = (tmp_path / "from-folders" / "report.md").read_text()
    assert "## Data" in md and "(images, 64 samples read)" in md and "from the model's pretrained_cfg" in md
    assert "## Data" not in (tmp_path / "from-npz" / "report.md").read_text()  # read in place: nothing to say


def test_compress_run_on_a_text_file_in_a_model_folder_matches_the_hand_built_npz(bert_folder, tokenizer_dir, tmp_path):
    """A Hugging Face folder holding its tokenizer, calibrated from a .txt: the same report as the .npz of the
    same tokens built by hand (input_ids, attention_mask and token_type_ids, as BERT takes them)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "bert"
    shutil.copytree(bert_folder, folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    lines = [f"{a} {b} on the mat" for a in ("the", "a", "dog", "cat") for b in ("cat", "dog", "sat", "ran")]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    enc = AutoTokenizer.from_pretrained(folder)(lines, padding="max_length", truncation=True, max_length=12,
                                                return_tensors="np", return_token_type_ids=True)
    np.savez(tmp_path / "s.npz", **{k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    common = ["--device", "host", "--quant", "int8", "--no-op-select", "--runs", "3"]
    a = _run(str(folder), "--calib", str(tmp_path / "s.txt"), "--seq-len", "12", *common, "-o", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    b = _run(str(folder), "--calib", str(tmp_path / "s.npz"), *common, "-o", str(tmp_path / "b"))
    assert b.returncode == 0, b.stderr
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "b"))
    for va, vb in zip(ra["variants"], rb["variants"]):
        assert va["name"] == vb["name"]
        assert va["fidelity"]["cosine_min"] == pytest.approx(vb["fidelity"]["cosine_min"], abs=1e-6)
    notes = ra["calibration"]["data"]["calib"]["notes"]
    assert any(n.startswith("tokenized with") and str(folder) in n and "truncated to 12" in n for n in notes)


def test_compress_run_on_a_saved_dataset_matches_the_image_folder(tmp_path):
    """The same PNGs as a `datasets` dataset saved to disk (image and label columns) and as class folders: the
    same report figures."""
    datasets = pytest.importorskip("datasets")
    subprocess.run([sys.executable, "-m", "compress.zoo.shapes", "images", "--eval", str(tmp_path / "eval"),
                    "--n-eval", "48"], check=True, capture_output=True)
    files = sorted((tmp_path / "eval").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": [int(p.parent.name[:2]) for p in files]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    common = ["--device", "host", "--quant", "none", "--runs", "3"]
    a = _run("compress.zoo:shapes_resnet", "--calib", str(tmp_path / "eval"), "--eval", str(tmp_path / "eval"),
             *common, "-o", str(tmp_path / "a"))
    b = _run("compress.zoo:shapes_resnet", "--calib", f"hf:{tmp_path / 'ds'}", "--eval", f"hf:{tmp_path / 'ds'}",
             *common, "-o", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "b"))
    assert ra["variants"][0]["accuracy"] == pytest.approx(rb["variants"][0]["accuracy"], abs=1e-9)
    assert rb["calibration"]["data"]["eval"]["kind"] == "hf-dataset"


@pytest.mark.parametrize("config, by_hand", [
    # ResNet/ConvNeXt-style processors: the shorter side to 20, a 16x16 center crop, bicubic
    ({"size": {"shortest_edge": 20}, "crop_size": {"height": 16, "width": 16}, "do_center_crop": True, "resample": 3},
     lambda im: im.resize((20, 26), PIL.Resampling.BICUBIC).crop((2, 5, 18, 21))),
    # ViT-style: straight to 16x16, aspect not kept, bilinear
    ({"size": {"height": 16, "width": 16}, "do_resize": True, "resample": 2},
     lambda im: im.resize((16, 16), PIL.Resampling.BILINEAR)),
])
def test_a_hugging_face_preprocessor_config_is_followed(tmp_path, config, by_hand):
    model = tmp_path / "model"
    model.mkdir()
    (model / "preprocessor_config.json").write_text(json.dumps({**config, "image_mean": list(MEAN), "image_std": list(STD)}))
    pixels = _pixels(1, 40, 30, seed=2)  # 30 wide, 40 high
    root = _image_folder(tmp_path / "imgs", pixels)
    inputs = ModelInputs(names=("pixel_values",), required=("pixel_values",), folder=model)
    r = resolve_data(str(root), inputs, DataOptions(), tmp_path / "out")
    ref = np.asarray(by_hand(PIL.fromarray(pixels[0])))[None]
    np.testing.assert_allclose(load_calib(r.path)["pixel_values"], _by_hand(ref), atol=1e-6)
    assert any("from preprocessor_config.json" in n for n in r.info["notes"])
