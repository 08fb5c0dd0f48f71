"""Example and calibration inputs, keyed by the model's forward() parameter names.

`--input-shape` gives shapes (random data, for export and profiling only); `--calib DATA.npz` gives real
samples (first axis = samples) and is what quantization must use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from compress.core import InputError, UsageError, warn
from compress.data import npz_members, read_rows
from compress.models.loading import LoadedModel
from compress.models.shapes import ShapeArg, parse_input_shape, require_one_input_source


def load_calib(path: str | Path, max_samples: int | None = None, *,
               keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read an .npz of named arrays (no pickles) whose first axis is the sample axis, lazily.

    Calibration sets reach 100+ GB, so nothing is read whole: the .npy headers are checked first (numeric dtype,
    a sample axis, equal sample counts), then a member stored uncompressed (np.savez) is memory-mapped in place
    and costs memory only for the rows touched; a compressed one (np.savez_compressed) is decompressed up to
    `max_samples` rows and no further. `keys`: check and return only these arrays (CalibReader ignores arrays
    that are not graph inputs, whatever they hold). The arrays are read-only.
    """
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-calib {max_samples}: must be at least 1")
    p = _calib_file(path)
    members = npz_members(p, str(path))
    if keys is not None:
        wanted = set(keys)
        members = {k: m for k, m in members.items() if k in wanted}
    if not members:
        raise InputError(f"{path} holds no arrays")
    counts = {}
    for k, m in members.items():
        if len(m.shape) < 1 or m.dtype.kind not in "fiub":
            raise InputError(f"{path}: array {k!r} must be numeric with a leading sample axis (got dtype {m.dtype}, shape {m.shape})")
        counts[k] = m.shape[0]
    if len(set(counts.values())) != 1:
        raise InputError(f"{path}: arrays disagree on the number of samples: {counts}")
    if next(iter(counts.values())) == 0:
        raise InputError(f"{path}: no samples")
    arrays = read_rows(p, members, max_samples, str(path))
    check_finite(arrays, str(path))
    return arrays


# A calibration or evaluation array is scanned in chunks of about this many bytes: bounded memory on files of
# any size (the rows a run reads are scanned once, a memory-mapped member page by page).
_SCAN_BYTES = 64 << 20


def check_finite(arrays: dict[str, np.ndarray], shown: str) -> None:
    """NaN or Inf in calibration or evaluation data is an error, not a model: an INT8 model calibrated on it
    gets a NaN scale (measured: top-1 agreement with fp32 fell to 16% with exit 0). Names the file, the array
    and the first bad sample."""
    for key, a in arrays.items():
        if a.dtype.kind != "f" or a.size == 0:
            continue
        step = max(1, _SCAN_BYTES // max(1, a[:1].nbytes))
        for start in range(0, a.shape[0], step):
            chunk = np.asarray(a[start:start + step])
            ok = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
            if not ok.all():
                i = start + int(np.argmin(ok))
                raise InputError(f"{shown}: array {key!r} holds NaN or Inf in sample {i}; calibration and "
                                 "evaluation data must be finite")


def _calib_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"calibration file {path} not found")
    return p


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an .npz, from its .npy headers alone (InputError when it is not one)."""
    return list(npz_members(_calib_file(path), str(path)))


def check_calib_names(calib: dict[str, np.ndarray], loaded: LoadedModel, source: str) -> None:
    names = loaded.input_names
    unknown = [k for k in calib if k not in names]
    if unknown:
        raise InputError(f"{source}: {', '.join(map(repr, unknown))} not an input of the model; its inputs are {', '.join(names) or '(none)'}")
    missing = [k for k in loaded.required_inputs if k not in calib]
    if missing:
        raise InputError(f"{source}: missing required input(s) {', '.join(missing)}")


def example_inputs(loaded: LoadedModel, shapes: Iterable[ShapeArg] = (), calib: dict[str, np.ndarray] | None = None,
                   batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for one forward pass, in forward() order: from the calibration data when given, else random."""
    if calib is not None:
        ordered = [n for n in loaded.input_names if n in calib]
        return {n: _tensor(calib[n][:batch]) for n in ordered}
    shapes = list(shapes)
    if not shapes:
        raise UsageError("give --input-shape or --calib so the model can be run")
    named = _name_shapes(loaded, shapes)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in loaded.input_names:
        if name in named:
            arg = named[name]
            out[name] = dummy_tensor(name, arg.shape, arg.dtype or _default_dtype(name), loaded.config, gen)
    return out


def calib_samples(calib: dict[str, np.ndarray], names: list[str], start: int = 0, count: int = 1) -> list[dict[str, torch.Tensor]]:
    """Single-sample feeds (batch 1) from the calibration data, samples start..start+count-1."""
    n = next(iter(calib.values())).shape[0]
    return [{k: _tensor(calib[k][i:i + 1]) for k in names} for i in range(start, min(n, start + count))]


def _tensor(part: np.ndarray) -> torch.Tensor:
    """A tensor of these samples; read-only (memory-mapped) data is copied, as torch does not take it."""
    arr = np.ascontiguousarray(part)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _name_shapes(loaded: LoadedModel, shapes: list[ShapeArg]) -> dict[str, ShapeArg]:
    names = loaded.input_names
    named: dict[str, ShapeArg] = {}
    unnamed = [s for s in shapes if s.name is None]
    if len(unnamed) > 1:
        raise UsageError("several --input-shape values without names; write them as NAME=SHAPE (inputs: " + ", ".join(names) + ")")
    for s in shapes:
        name = s.name
        if name is None:
            if not names:
                raise UsageError("the model's forward() takes no named inputs")
            name = names[0]
        if name not in names:
            raise UsageError(f"--input-shape names {name!r}, which is not an input of the model; its inputs are {', '.join(names)}")
        if name in named:
            raise UsageError(f"--input-shape gives {name!r} twice")
        named[name] = ShapeArg(name, s.shape, s.dtype)
    # Text models run with an attention mask; add it as Optimum does when only the ids were given.
    if loaded.kind == "hf" and "input_ids" in named and "attention_mask" in names and "attention_mask" not in named:
        named["attention_mask"] = ShapeArg("attention_mask", named["input_ids"].shape, "int64")
    missing = [n for n in loaded.required_inputs if n not in named]
    if missing:
        raise UsageError(f"no --input-shape for required input(s) {', '.join(missing)} (give NAME=SHAPE for each)")
    return named


def _default_dtype(name: str) -> str:
    return "int64" if name.endswith("_ids") or "mask" in name else "float32"


def dummy_tensor(name: str, shape: tuple[int, ...], dtype: str, config: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Random data that a real model accepts: token ids below the vocabulary size, masks of ones."""
    tdtype = getattr(torch, dtype)
    if tdtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(tdtype)
    if tdtype == torch.bool or "mask" in name:
        return torch.ones(shape, dtype=tdtype)
    high = {"input_ids": int(config.get("vocab_size", 100)), "token_type_ids": int(config.get("type_vocab_size", 1))}.get(name, 2)
    if name == "position_ids":
        return torch.arange(shape[-1], dtype=tdtype).expand(shape).contiguous()
    return torch.randint(0, max(high, 1), shape, generator=gen, dtype=tdtype)


def calib_batches(calib: dict[str, np.ndarray], names: list[str], batch_size: int = 8, start: int = 0,
                  stop: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Samples start..stop of the calibration data as batches of up to batch_size, in forward() order."""
    n = next(iter(calib.values())).shape[0]
    stop = n if stop is None else min(stop, n)
    return [{k: _tensor(calib[k][i:min(i + batch_size, stop)]) for k in names}
            for i in range(start, stop, batch_size)]


def random_batches(loaded: LoadedModel, example: dict[str, torch.Tensor], count: int, batch_size: int = 8,
                   seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Synthetic batches shaped like the example (batch axis = batch_size), for when no --calib is given.

    Only a stand-in: weights tuned or scored on random inputs fit random inputs, so callers warn.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        out.append({k: dummy_tensor(k, (batch_size, *v.shape[1:]), str(v.dtype).removeprefix("torch."), loaded.config, gen)
                    for k, v in example.items()})
    return out


@dataclass
class Prepared:
    """Everything a compression stage needs to run the model: an example, batches to tune on, batches to judge."""

    example: dict[str, torch.Tensor]
    train: list[dict[str, torch.Tensor]]
    held_out: list[dict[str, torch.Tensor]]
    info: dict[str, Any]


def prepare_inputs(loaded: LoadedModel, input_shapes: Iterable[str] = (), calib: str | None = None,
                   max_samples: int | None = None) -> Prepared:
    """Example, tuning and held-out batches from --calib (a quarter held out when there are 8+ samples), or
    random ones shaped by --input-shape with a loud warning: scores and recovery tuned on noise fit noise.

    max_samples (--max-calib): read at most this many samples; the batches are built in memory from all of them."""
    require_one_input_source(list(input_shapes), calib)
    shapes = [parse_input_shape(s) for s in input_shapes]
    data = load_calib(calib, max_samples=max_samples) if calib else None
    if data is not None:
        check_calib_names(data, loaded, calib)
    example = example_inputs(loaded, shapes, data)
    names = list(example)
    if data is None:
        warn("no --calib: channel scores, recovery and fidelity use random inputs, which say little about "
             "real data; pass --calib with real samples (an .npz, an image folder, a text file or an hf: dataset)")
        train = random_batches(loaded, example, count=8)
        held = random_batches(loaded, example, count=2, seed=99)
        return Prepared(example, train, held, {"source": "random", "samples": 0, "train_samples": 64, "held_out": True})
    n = next(iter(data.values())).shape[0]
    cut = n - max(1, n // 4) if n >= 8 else n
    train = calib_batches(data, names, start=0, stop=cut)
    held = calib_batches(data, names, start=cut) if cut < n else train
    return Prepared(example, train, held, {"source": calib, "samples": n, "train_samples": cut, "held_out": cut < n})
