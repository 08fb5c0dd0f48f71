"""--calib/--eval as a folder of images: DIR/*.png, or DIR/CLASS/*.jpg (ImageNet's layout: a class per
subfolder, labels in sorted order, as torchvision's ImageFolder numbers them).

Decoded with Pillow and pre-processed as the model's own config says, else as the flags say, else as timm and
torchvision evaluate ImageNet models: the shorter side resized to size / crop_pct (0.875), a center crop to
the size, pixels scaled to [0, 1], normalised by mean/std, channels first unless the model's input shape puts
them last. Where each setting came from is in the source's notes (and the report).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from compress.core import InputError, UsageError, first_line
from compress.data.options import IMAGENET_MEAN, IMAGENET_STD
from compress.data.registry import DataSource, Sample, register
from compress.data.text import TEXT_INPUTS

DEFAULT_CROP_PCT = 0.875  # timm's and torchvision's ImageNet evaluation (256 -> 224)
# where a pre-processing setting can come from, as the notes name them
PRETRAINED_CFG, HF_FILE, FLAGS = "the model's pretrained_cfg", "preprocessor_config.json", "the flags"
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # HF preprocessor_config's "resample" codes


def image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@register
class ImageFolder(DataSource):
    kind = "images"
    form = "DIR/ of images, or DIR/CLASS/*.jpg for labels (decoded with Pillow)"

    @classmethod
    def claims(cls, spec: str) -> bool:
        p = Path(spec).expanduser()
        return p.is_dir() and not spec.startswith("hf:")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.root = Path(self.spec).expanduser()
        self.files, self.classes = _list_images(self.root, self.shown)
        self.plan = image_plan(self.inputs, self.opts, self.shown)
        self.notes += self.plan.notes
        if self.classes:
            self.notes.append(f"{len(self.classes)} classes from subfolder names, labelled 0..{len(self.classes) - 1} "
                              f"in sorted order ({', '.join(self.classes[:5])}{', ...' if len(self.classes) > 5 else ''})")
        self.skipped: list[str] = []

    def count(self) -> int:
        return len(self.files)

    def samples(self, limit: Optional[int]) -> Iterator[Sample]:
        done = 0
        for path, label in self.files:
            if limit is not None and done >= limit:
                break
            try:
                arr = self.plan.apply(_decode(path, self.plan.channels))
            except InputError as e:
                if not self.opts.skip_bad:
                    raise InputError(f"{self.shown}: {e} (--skip-bad skips such files)") from e
                self.skipped.append(str(path))
                continue
            done += 1
            yield Sample({self.plan.name: arr}, label)
        if self.skipped:
            self.notes.append(f"skipped {len(self.skipped)} unreadable file(s) (--skip-bad), e.g. {self.skipped[0]}")

    def info(self) -> dict[str, Any]:
        return {**super().info(), "files": len(self.files), "classes": self.classes,
                "preprocess": self.plan.describe()}


def _list_images(root: Path, shown: str) -> tuple[list[tuple[Path, Optional[int]]], list[str]]:
    """(path, label) of every image, sorted; labels from class subfolders when the images are in them."""
    exts = image_extensions()

    def images_in(d: Path) -> list[Path]:
        with os.scandir(d) as it:
            return sorted(Path(e.path) for e in it if e.is_file() and Path(e.name).suffix.lower() in exts)

    top = images_in(root)
    subdirs = sorted(Path(e.path) for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if top and subdirs and any(images_in(d) for d in subdirs):
        raise InputError(f"{shown}: holds images both directly and in subfolders; use DIR/*.jpg (no labels) or "
                         "DIR/CLASS/*.jpg (a folder per class), not both")
    if top:
        return [(p, None) for p in top], []
    classes, files = [], []
    for d in subdirs:
        found = images_in(d)
        if found:
            files += [(p, len(classes)) for p in found]
            classes.append(d.name)
    if not files:
        raise InputError(f"{shown}: no images (looked for {', '.join(sorted(exts)[:8])}, ... in it and in its subfolders)")
    return files, classes


def _decode(path: Path, channels: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return decode_pil(im, channels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # Pillow's decoders raise all of these
        raise InputError(f"{path} is not a readable image ({first_line(e)})") from e


def decode_pil(im: Any, channels: int) -> Any:
    """A decoded Pillow image in the model's colour mode (RGB, or L for one channel)."""
    return im.convert("L" if channels == 1 else "RGB")


class _Plan:
    """The pre-processing, settled once from the flags, the model's config and its input shape."""

    def __init__(self, name: str, size: tuple[int, int], crop_pct: float, mean: tuple[float, ...],
                 std: tuple[float, ...], interpolation: str, channels: int, channels_last: bool, dtype: str,
                 notes: list[str], squash: bool = False) -> None:
        self.name, self.size, self.crop_pct, self.mean, self.std = name, size, crop_pct, mean, std
        self.interpolation, self.channels, self.channels_last, self.dtype, self.notes = (
            interpolation, channels, channels_last, dtype, notes)
        self.squash = squash  # resized to the size exactly, aspect not kept (HF processors with size height/width)

    def describe(self) -> dict[str, Any]:
        return {"input": self.name, "size": list(self.size), "crop_pct": None if self.squash else self.crop_pct,
                "resize": "to the size (aspect not kept)" if self.squash else "shorter side, then center crop",
                "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation,
                "layout": "HWC" if self.channels_last else "CHW", "dtype": self.dtype}

    def apply(self, im: Any) -> np.ndarray:
        from PIL import Image

        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC}[self.interpolation]
        h, w = self.size
        if self.squash:
            nh, nw = h, w
        elif h == w:  # the shorter side to size / crop_pct, as timm and torchvision's Resize(int) do
            scale = math.floor(h / self.crop_pct)
            iw, ih = im.size
            nw, nh = (scale, max(1, int(scale * ih / iw))) if iw <= ih else (max(1, int(scale * iw / ih)), scale)
        else:
            nh, nw = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        if (nw, nh) != im.size:
            im = im.resize((nw, nh), resample)
        top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
        if (nw, nh) != (w, h):
            im = im.crop((left, top, left + w, top + h))
        arr = np.asarray(im)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if self.dtype == "uint8":
            out = arr
        else:
            out = (arr.astype(np.float32) / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            out = out.astype(self.dtype)
        return np.ascontiguousarray(out if self.channels_last else out.transpose(2, 0, 1))


def image_plan(inputs: Any, opts: Any, shown: str) -> _Plan:
    names = inputs.required or inputs.names
    image_inputs = [n for n in names if n not in TEXT_INPUTS]
    if len(image_inputs) != 1:
        raise InputError(f"{shown}: a folder of images feeds a model with one image input; this one takes "
                         f"{', '.join(inputs.names) or '(none)'}")
    name = image_inputs[0]
    shape = inputs.shapes.get(name, ())
    cfg = dict(inputs.pretrained_cfg)
    hf = _hf_preprocessor(inputs.folder)
    notes: list[str] = []
    channels_last = len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3)
    c = (shape[-1] if channels_last else shape[1]) if len(shape) == 4 else None
    channels = int(c) if c in (1, 3) else 3
    size, where = _size(opts, cfg, hf, shape, channels_last)
    if size is None:
        raise UsageError(f"{shown}: the image size is not known from the model; give --image-size H[,W] (or "
                         "--input-shape with the full shape)")
    origin: dict[str, list[str]] = {where: [f"size {size[0]}x{size[1]}"]}  # source -> the settings it gave

    def pick(flag: Any, *found: tuple[Any, str], default: Any, what: str) -> Any:
        value, src = next(((v, s) for v, s in ((flag, FLAGS), *found) if v is not None),
                          (default, "defaults, timm's ImageNet evaluation (the flags --crop-pct, --mean, --std, "
                                    "--interpolation set them)"))
        origin.setdefault(src, []).append(f"{what} {_short(value)}")
        return value

    crop = pick(opts.crop_pct, (cfg.get("crop_pct"), PRETRAINED_CFG), (hf.get("crop_pct"), HF_FILE),
                default=DEFAULT_CROP_PCT, what="crop_pct")
    mean = pick(opts.mean, (cfg.get("mean"), PRETRAINED_CFG), (hf.get("image_mean"), HF_FILE), default=IMAGENET_MEAN,
                what="mean")
    std = pick(opts.std, (cfg.get("std"), PRETRAINED_CFG), (hf.get("image_std"), HF_FILE), default=IMAGENET_STD,
               what="std")
    interp = pick(opts.interpolation, (cfg.get("interpolation"), PRETRAINED_CFG),
                  (_PIL_RESAMPLE.get(hf.get("resample", -1)), HF_FILE), default="bilinear", what="interpolation")
    notes.append("images pre-processed with " + "; ".join(f"{', '.join(v)} from {k}" for k, v in origin.items()))
    if interp not in ("nearest", "bilinear", "bicubic"):
        interp = "bicubic" if "cubic" in str(interp) else "bilinear"
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"{shown}: --mean/--std need {channels} value(s), one per channel")
    dtype = inputs.dtypes.get(name, "float32")
    squash = bool(hf.get("squash")) and opts.crop_pct is None and cfg.get("crop_pct") is None and where == HF_FILE
    if squash:
        notes.append(f"resized to {size[0]}x{size[1]} without keeping the aspect, as {HF_FILE} says (no crop)")
    return _Plan(name, size, float(crop), mean, std, interp, channels, channels_last, dtype, notes, squash)


def _short(v: Any) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")" if isinstance(v, (list, tuple)) else str(v)


def _size(opts: Any, cfg: dict[str, Any], hf: dict[str, Any], shape: tuple[Optional[int], ...],
          channels_last: bool) -> tuple[Optional[tuple[int, int]], str]:
    if opts.image_size is not None:
        return tuple(opts.image_size), FLAGS  # type: ignore[return-value]
    if cfg.get("input_size"):
        c_h_w = cfg["input_size"]
        return (int(c_h_w[-2]), int(c_h_w[-1])), PRETRAINED_CFG
    if hf.get("size"):
        return hf["size"], HF_FILE
    if len(shape) == 4:
        h, w = (shape[1], shape[2]) if channels_last else (shape[2], shape[3])
        if h and w:
            return (int(h), int(w)), "the model's input shape"
    return None, ""


def _hf_preprocessor(folder: Optional[Path]) -> dict[str, Any]:
    """A Hugging Face preprocessor_config.json's mean/std/size/crop, in this module's terms ({} when absent)."""
    if folder is None or not (folder / HF_FILE).is_file():
        return {}
    p = folder / HF_FILE
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({first_line(e)})") from e
    out: dict[str, Any] = {k: raw[k] for k in ("image_mean", "image_std", "resample") if k in raw}
    crop, size = raw.get("crop_size"), raw.get("size")

    def hw(v: Any) -> Optional[tuple[int, int]]:
        if isinstance(v, int):
            return (v, v)
        if isinstance(v, dict) and "height" in v and "width" in v:
            return (int(v["height"]), int(v["width"]))
        if isinstance(v, dict) and "shortest_edge" in v:
            return (int(v["shortest_edge"]),) * 2  # type: ignore[return-value]
        return None

    cropped = bool(raw.get("do_center_crop", crop is not None)) and crop is not None
    final = hw(crop) if cropped else hw(size)
    if final:
        out["size"] = final
        resized = hw(size)
        out["crop_pct"] = min(1.0, final[0] / resized[0]) if resized and cropped else 1.0
        # {"height", "width"} without a crop: HF's processors (ViT, ...) resize to it exactly, aspect not kept
        out["squash"] = not cropped and isinstance(size, dict) and "height" in size
    return out
