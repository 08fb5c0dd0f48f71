"""--calib and --eval DATA for every command (and API call) that takes them: the data flags parsed into
DataOptions, and the sources read into .npz files that live in a folder beside the output for the run."""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from compress.core import UsageError
from compress.data.options import DataOptions
from compress.data.registry import ModelInputs
from compress.data.resolve import read_option


def data_opts(image_size: Optional[str] = None, crop_pct: Optional[float] = None, mean: Optional[str] = None,
              std: Optional[str] = None, interpolation: Optional[str] = None, seq_len: Optional[int] = None,
              tokenizer: Optional[str] = None, column: Optional[str] = None,
              label_column: str = DataOptions.default("label_column"), skip_bad: bool = False) -> DataOptions:
    """The data flags as DataOptions (comma lists parsed, ranges checked)."""
    size = _floats("--image-size", image_size)
    if size is not None and (len(size) not in (1, 2) or any(v != int(v) for v in size)):
        raise UsageError(f"--image-size {image_size}: one or two whole numbers, H[,W]")
    opts = DataOptions(image_size=None if size is None else (int(size[0]), int(size[-1])), crop_pct=crop_pct,
                       mean=_floats("--mean", mean), std=_floats("--std", std), interpolation=interpolation,
                       seq_len=seq_len, tokenizer=tokenizer, column=column, label_column=label_column, skip_bad=skip_bad)
    opts.check()
    return opts


def data_opts_of(kwargs: Mapping[str, Any]) -> DataOptions:
    """data_opts from the data flags among an API function's keyword arguments (its locals()): every command that
    reads --calib/--eval DATA takes the same ten, by the same names, and this is the one place that lists them."""
    return data_opts(**{name: kwargs[name] for name in inspect.signature(data_opts).parameters if name in kwargs})


def _floats(flag: str, text: Optional[str]) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text}: comma-separated numbers") from None


@dataclass
class UserData:
    calib: Optional[str] = None  # an .npz keyed by input names
    eval: Optional[str] = None  # an .npz with 'y', or the user's FILE.py:FN unchanged
    info: dict[str, Any] = field(default_factory=dict)  # {"calib": ..., "eval": ...}: what each source did
    calib_name: Optional[str] = None  # the user's --calib

    def describe(self, calibration: dict[str, Any]) -> dict[str, Any]:
        """A stage's calibration record naming the user's data (not the .npz it was read into), with what reading
        it did."""
        if self.calib_name:
            calibration["source"] = self.calib_name
        if self.info:
            calibration["data"] = self.info
        return calibration


@contextlib.contextmanager
def user_data(inputs: ModelInputs, opts: DataOptions, near: Path, calib: Optional[str] = None,
              eval_spec: Optional[str] = None, max_calib: Optional[int] = None) -> Iterator[UserData]:
    """--calib and --eval as .npz paths, for the duration of the block; what had to be written lives in a
    hidden folder in `near` (the output's folder: the same disk, and removed however the block ends)."""
    near.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edge-data-", dir=near) as tmp:
        out = UserData(eval=eval_spec, calib_name=calib)
        for flag, spec, labels in (("calib", calib, False), ("eval", eval_spec, True)):
            r = read_option(spec, inputs, opts, Path(tmp), labels=labels, max_samples=None if labels else max_calib)
            if r is not None:
                setattr(out, flag, r.path)
                if r.info:
                    out.info[flag] = r.info
        yield out
