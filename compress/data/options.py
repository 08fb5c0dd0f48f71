"""How DATA arguments become model inputs: pre-processing of images and text, one set of defaults (the CLI reads
them from here)."""

from __future__ import annotations

from typing import Optional

from compress.core import Options, UsageError

# ImageNet's, as torchvision's and timm's pretrained models use; said in the report when nothing else is known
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataOptions(Options):
    image_size: Optional[tuple[int, int]] = None  # (height, width) after the crop; None: from the model
    crop_pct: Optional[float] = None  # resize the shorter side to size / crop_pct, then center-crop (timm's eval)
    mean: Optional[tuple[float, ...]] = None  # per channel, on pixels scaled to [0, 1]
    std: Optional[tuple[float, ...]] = None
    interpolation: Optional[str] = None  # "bilinear", "bicubic", "nearest"; None: the model's, else bilinear
    seq_len: Optional[int] = None  # tokens per text sample; None: from --input-shape, else 128
    tokenizer: Optional[str] = None  # a folder with the tokenizer; None: the model's own folder
    column: Optional[str] = None  # the text or image column of a .jsonl/.csv or dataset
    label_column: str = "label"
    skip_bad: bool = False  # a file that cannot be decoded is skipped (and counted) instead of an error

    def check(self) -> None:
        if self.image_size is not None and min(self.image_size) < 1:
            raise UsageError(f"--image-size {self.image_size}: must be positive")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise UsageError(f"--crop-pct {self.crop_pct}: must be in (0, 1]")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UsageError("--std: every value must be positive")
        if self.seq_len is not None and self.seq_len < 1:
            raise UsageError(f"--seq-len {self.seq_len}: must be at least 1")
        if self.interpolation not in (None, "bilinear", "bicubic", "nearest"):
            raise UsageError(f"--interpolation {self.interpolation}: one of bilinear, bicubic, nearest")
