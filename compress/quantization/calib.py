"""Calibration inputs for onnxruntime's quantizer, as a CalibrationDataReader.

Static INT8 fixes every activation's range from these samples, so they should be real data: `--calib DATA.npz`
(keys = input names, first axis = samples). The file is read lazily by compress.models.inputs.load_calib (stored
arrays memory-mapped, compressed ones decompressed no further than `max_samples`) and sliced one feed at a
time, so calibration holds one feed in memory, not the data set (users calibrate on 100+ GB); `max_samples`
caps how many are used. Without a file the reader makes synthetic samples shaped and ranged from the input
specs the exporter stored in the model's metadata (token ids within the vocabulary seen at export, masks of
ones, floats within the example's range); ranges calibrated on those fit noise, so callers warn. Every feed
is cast to the graph input's element type (int32 ids in the file, int64 in the graph) and checked against its
static dimensions, so a mismatch is one clear InputError instead of an onnxruntime error deep inside
calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from compress.core import InputError, UsageError
from compress.core import first_line as _first_line
from compress.models import load_calib, npz_keys
from export import PAST_PREFIX, get_metadata, prefill_feeds
from runtime import unsized_axis

CalibSource = Union[str, Path, Mapping[str, np.ndarray], None]
DEFAULT_SYNTHETIC_SAMPLES = 32


class GraphInput:
    """One graph input: name, numpy dtype and dims (None where symbolic)."""

    def __init__(self, name: str, dtype: np.dtype, dims: list[Optional[int]]) -> None:
        self.name, self.dtype, self.dims = name, dtype, dims

    @property
    def batch(self) -> int:
        """Samples per feed: a static leading dim (>= 1) when the graph has one, else 1."""
        return self.dims[0] if self.dims and isinstance(self.dims[0], int) and self.dims[0] > 0 else 1


def graph_inputs(model: str | Path | onnx.ModelProto) -> list[GraphInput]:
    """The graph's fed inputs (initializers listed as inputs by old IRs are not fed)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in weights:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        out.append(GraphInput(vi.name, dtype, dims))
    return out


class CalibReader(CalibrationDataReader):
    """Feeds for calibration, one batch (normally one sample) per get_next(); rewind() starts over.

    label: what error messages call the data (the --calib path) when `calib` is arrays already loaded from it,
    so the user reads the file's name rather than "calibration arrays".
    """

    def __init__(self, model: str | Path | onnx.ModelProto, calib: CalibSource = None, *,
                 max_samples: Optional[int] = None, seed: int = 0,
                 synthetic_samples: int = DEFAULT_SYNTHETIC_SAMPLES, label: Optional[str] = None) -> None:
        if max_samples is not None and max_samples < 1:
            raise InputError(f"max_samples {max_samples}: must be at least 1")
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        self.inputs = graph_inputs(proto)
        if not self.inputs:
            raise InputError("the model has no inputs to calibrate with")
        self._seed = seed
        self._arrays: dict[str, np.ndarray] = {}
        self.ignored: list[str] = []
        batch = max(i.batch for i in self.inputs)
        self.batch = batch
        if calib is None:
            self.source, self.path = "synthetic", None
            self.label = label or "calibration data"
            self._specs = _metadata_specs(proto)
            self._check_shapes_known()
            total = synthetic_samples
        else:
            self.source = "arrays" if isinstance(calib, Mapping) else "npz"
            self.path = None if isinstance(calib, Mapping) else str(calib)
            self.label = label or self.path or "calibration arrays"
            # feeds come in whole batches: read enough samples for one even when max_samples is smaller
            total = self._open(calib, None if max_samples is None else max(max_samples, batch), proto)
        self.count = total // batch
        if max_samples is not None:
            self.count = min(self.count, max(1, max_samples // batch))
        if self.count == 0:
            raise InputError(f"{self.label}: {total} sample(s), fewer than the graph's batch of {batch}")
        self._next = 0

    def _check_shapes_known(self) -> None:
        """Synthetic samples need every dimension but the batch: a sequence length the graph leaves symbolic and
        our metadata does not fix (a file exported elsewhere) would be calibrated, judged and timed at 1."""
        for inp in self.inputs:
            given = self._specs.get(inp.name, {}).get("shape")
            axis = unsized_axis(inp.dims, given if isinstance(given, list) and _fit_shape(given, inp.dims) == given else None)
            if axis is not None:
                raise UsageError(f"input {inp.name!r} {_dims_text(inp.dims)} has a symbolic dimension (axis {axis}) "
                                 "and no data to give it a size: pass --calib with real samples")

    # --- sources ---------------------------------------------------------------------------------------------

    def _open(self, calib: Any, cap: Optional[int], proto: onnx.ModelProto) -> int:
        shown = self.label
        wanted = [i.name for i in self.inputs]
        if isinstance(calib, Mapping):
            keys, source = list(calib), calib
        else:
            keys = npz_keys(calib)  # headers only: a file that is not an .npz of arrays fails here, naming it
            source = None
        self.ignored = [k for k in keys if k not in wanted]
        missing = [n for n in wanted if n not in keys]
        decoder = any(n.startswith(PAST_PREFIX) for n in wanted)  # an encoder's missing mask stays an error
        prefill = decoder and bool(missing) and "input_ids" in keys and all(_prefill_fills(n) for n in missing)
        if missing and not prefill:
            told = [n for n in missing if not (decoder and _prefill_fills(n))] or missing  # a decoder's: its ids
            raise InputError(f"{shown}: no array for graph input(s) {', '.join(told)} (it has {', '.join(keys) or 'none'})")
        if source is None:  # lazily: memory-mapped or decompressed up to `cap` samples, the graph inputs only
            source = load_calib(calib, max_samples=cap, keys=[n for n in wanted if n in keys])
        if prefill:  # a decoder with its KV cache: the token ids as its prefill (an empty past, a mask of ones)
            source = {**prefill_feeds(source, proto.graph.input), **{k: source[k] for k in wanted if k in keys}}
        counts = {}
        for inp in self.inputs:
            try:
                arr = np.asarray(source[inp.name])
            except Exception as e:  # a caller's mapping whose value is not an array
                raise InputError(f"{shown}: cannot read array {inp.name!r} ({_first_line(e)})") from e
            self._check_array(shown, inp, arr)
            self._arrays[inp.name] = arr
            counts[inp.name] = arr.shape[0]
        if len(set(counts.values())) != 1:
            raise InputError(f"{shown}: arrays disagree on the number of samples: {counts}")
        n = next(iter(counts.values()))
        if n == 0:
            raise InputError(f"{shown}: no samples")
        return n

    @staticmethod
    def _check_array(shown: str, inp: GraphInput, arr: np.ndarray) -> None:
        if arr.dtype.kind not in "fiub":
            raise InputError(f"{shown}: array {inp.name!r} must be numeric (got dtype {arr.dtype})")
        if arr.ndim != max(len(inp.dims), 1):
            raise InputError(f"{shown}: array {inp.name!r} has shape {list(arr.shape)}; the graph input is "
                             f"{_dims_text(inp.dims)} (the first axis of the array is the sample axis)")
        for axis, (have, want) in enumerate(zip(arr.shape[1:], inp.dims[1:]), start=1):
            if want is not None and have != want:
                raise InputError(f"{shown}: array {inp.name!r} has {have} on axis {axis}; the graph input is "
                                 f"{_dims_text(inp.dims)}")
        if inp.dtype.kind in "iub" and arr.dtype.kind == "f" and arr.size and not np.all(np.mod(arr[:8], 1) == 0):
            raise InputError(f"{shown}: array {inp.name!r} holds fractional values; the graph input is {inp.dtype}")

    # --- reader protocol -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.count

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._next >= self.count:
            return None
        feed = self.feed(self._next)
        self._next += 1
        return feed

    def rewind(self) -> None:
        self._next = 0

    def feed(self, index: int) -> dict[str, np.ndarray]:
        """Feed number `index` (samples index*batch .. +batch), cast to the graph's types."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self.source == "synthetic":
            return self._synthetic(index)
        lo, hi = index * self.batch, (index + 1) * self.batch
        out = {}
        for i in self.inputs:
            part = self._arrays[i.name][lo] if not i.dims else self._arrays[i.name][lo:hi]  # rank-0 input: a scalar
            out[i.name] = np.ascontiguousarray(np.asarray(part).astype(i.dtype, copy=False))
        return out

    def feeds(self, limit: Optional[int] = None, start: int = 0) -> list[dict[str, np.ndarray]]:
        """Feeds start .. start+limit (all by default), for fidelity checks and timing."""
        stop = self.count if limit is None else min(self.count, start + limit)
        return [self.feed(i) for i in range(start, stop)]

    def _synthetic(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self._seed, index])  # feed i is the same after rewind()
        out = {}
        for inp in self.inputs:
            spec = self._specs.get(inp.name, {})
            shape = _fit_shape(spec.get("shape"), inp.dims)
            out[inp.name] = _random_array(inp, shape, spec.get("low"), spec.get("high"), rng)
        return out

    def info(self) -> dict[str, Any]:
        return {
            "source": self.source, "path": self.path, "samples": self.count * self.batch, "feeds": self.count,
            "batch": self.batch, "synthetic": self.source == "synthetic", "ignored_arrays": list(self.ignored),
            "inputs": {i.name: {"shape": _dims_text(i.dims), "dtype": str(i.dtype)} for i in self.inputs},
        }

    def close(self) -> None:
        """Nothing to release: the file's arrays are memory maps, unmapped with the last reference to them."""


def calibration_feeds(model: Path, source: Any, seed: int, max_samples: Optional[int] = None,
                      label: Optional[str] = None) -> list[dict[str, np.ndarray]]:
    """Every feed a CalibReader gives for MODEL (at most max_samples), read once and closed."""
    reader = CalibReader(model, source, seed=seed, max_samples=max_samples, label=label)
    try:
        return [reader.feed(i) for i in range(reader.count)]
    finally:
        reader.close()


def _prefill_fills(name: str) -> bool:
    """Inputs a decoder-with-past graph's prefill fills itself when the data holds its token ids alone."""
    return name.startswith(PAST_PREFIX) or name == "attention_mask"


def _dims_text(dims: list[Optional[int]]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _metadata_specs(proto: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    meta = get_metadata(proto) or {}
    specs = {}
    for s in meta.get("inputs") or []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            specs[s["name"]] = s
    return specs


def _fit_shape(spec_shape: Any, dims: list[Optional[int]]) -> list[int]:
    """The metadata's shape where the graph agrees with it; else the graph's dims with symbolic ones as 1. A
    metadata size of 0 stands where the graph is symbolic: a decoder's empty past (its prefill)."""
    if isinstance(spec_shape, list) and len(spec_shape) == len(dims) and all(
            isinstance(s, int) and (s > 0 or s == 0 and d is None) and (d is None or s == d)
            for s, d in zip(spec_shape, dims)):
        return list(spec_shape)
    return [d if d is not None else 1 for d in dims]


def _random_array(inp: GraphInput, shape: list[int], low: Any, high: Any, rng: np.random.Generator) -> np.ndarray:
    """Random data a real model accepts: masks of ones, ids within the range seen at export, floats in range."""
    if inp.dtype.kind == "b" or "mask" in inp.name.lower():
        return np.ones(shape, dtype=inp.dtype)
    if inp.dtype.kind in "iu":
        lo = int(low) if low is not None else 0
        hi = int(high) if high is not None else max(lo, 1)
        return rng.integers(lo, max(hi, lo) + 1, size=shape).astype(inp.dtype)
    if low is not None and high is not None and high > low:
        mid, half = (low + high) / 2.0, (high - low) / 2.0
        x = mid + rng.standard_normal(shape) * (half / 3.0)  # +-3 sigma spans the range seen at export
        return np.clip(x, low, high).astype(inp.dtype)
    return rng.standard_normal(shape).astype(inp.dtype)
