"""A source's samples written once to an uncompressed .npz: every command reads that lazily (memory-mapped,
compress.data.npz_rows), and the stage cache keys it by content, so a folder of images that has not changed
reuses finished stages.

Each input is first written row by row into its own .npy (memory-mapped: one sample in memory at a time), then
the .npy files are stored in the .npz uncompressed (numpy writes a mapped array in chunks) and removed: the
disk holds the data twice for a moment, memory never holds it whole. The zip's member dates are numpy's
fixed ones, so the same samples give the same bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from compress.core import InputError, check_interrupted
from compress.data.registry import DataSource

Progress = Callable[[int, int], None]  # (samples written, total)


def materialize(source: DataSource, dst: Path, limit: Optional[int], labels: bool = False,
                on_progress: Progress = lambda done, total: None) -> tuple[int, float]:
    """Write the first `limit` samples of `source` to `dst` (.npz keyed by input name, plus 'y' with `labels`);
    returns (samples, seconds). Samples must agree in shape and dtype, labelled data must have every label."""
    t0 = time.perf_counter()
    total = source.count() if limit is None else min(limit, source.count())
    if total < 1:
        raise InputError(f"{source.shown}: no samples")
    work = dst.parent / f".{dst.name}.rows"
    work.mkdir(exist_ok=False)
    maps: dict[str, np.memmap] = {}
    try:
        n = 0
        for sample in source.samples(total):
            check_interrupted()
            if n == 0:
                for i, (k, a) in enumerate(sample.inputs.items()):  # numbered: an input name may hold '/' or ':'
                    maps[k] = np.lib.format.open_memmap(work / f"{i}.npy", mode="w+", dtype=a.dtype, shape=(total, *a.shape))
                if labels:
                    maps["y"] = np.lib.format.open_memmap(work / "y.npy", mode="w+", dtype=np.int64, shape=(total,))
            if n >= total:
                break
            for k, m in maps.items():
                if k == "y":
                    continue
                a = sample.inputs.get(k)
                if a is None or a.shape != m.shape[1:] or a.dtype != m.dtype:
                    got = "nothing" if a is None else f"{a.dtype}{list(a.shape)}"
                    raise InputError(f"{source.shown}: sample {n} gives {k!r} as {got}, the first gave "
                                     f"{m.dtype}{list(m.shape[1:])}: every sample must have the same shape")
                m[n] = a
            if labels:
                if sample.label is None:
                    raise InputError(f"{source.shown}: sample {n} has no label; --eval needs one per sample "
                                     "(class folders, or a label column)")
                maps["y"][n] = sample.label
            n += 1
            if n % 64 == 0 or n == total:
                on_progress(n, total)
        if n < total:  # skipped files, or fewer lines than counted
            if n == 0:
                raise InputError(f"{source.shown}: no readable samples")
            for i, k in enumerate(list(maps)):
                trimmed = np.lib.format.open_memmap(work / f"{i}.part.npy", mode="w+", dtype=maps[k].dtype,
                                                    shape=(n, *maps[k].shape[1:]))
                trimmed[:] = maps[k][:n]
                maps[k] = trimmed
        for m in maps.values():
            m.flush()
        np.savez(dst, **maps)
    finally:
        maps.clear()
        for p in work.glob("*"):
            p.unlink()
        work.rmdir()
    return n, time.perf_counter() - t0
