"""Rows of an .npz without reading it whole: calibration sets reach 100+ GB, while a run needs a few samples.

A member stored uncompressed (np.savez) is memory-mapped in place and costs memory only for the rows touched;
a compressed one (np.savez_compressed) is decompressed in bounded chunks, up to the rows asked for and no
further. Everything is checked from the .npy headers first, and a damaged file of any kind is one InputError
naming it: zipfile, zlib and numpy's header parser each fail in their own ways.
"""

from __future__ import annotations

import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from compress.core import InputError, first_line

_LOCAL_HEADER = 30  # bytes in a zip member's local file header, before its name and extra field
_LOCAL_MAGIC = b"PK\x03\x04"
_READ_CHUNK = 16 << 20  # bytes per read from a compressed member


@dataclass(frozen=True)
class Member:
    """One .npy member of an .npz, described by its header alone: nothing of its data has been read."""

    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    data_start: int  # the .npy header's length: where the data starts within the member

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def npz_members(p: Path, shown: str) -> dict[str, Member]:
    """Every member's .npy header; InputError for anything that is not a zip of .npy arrays."""
    members: dict[str, Member] = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not a .npy array")
                key = info.filename[:-len(".npy")]
                if key in members:
                    raise ValueError(f"array {key!r} is stored twice")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:  # 3.0 only adds utf-8 field names, i.e. structured dtypes, which are no use here
                        raise ValueError(f"array {key!r} has .npy format version {version[0]}.{version[1]}, not 1.0 or 2.0")
                    if any(d < 0 for d in shape):
                        raise ValueError(f"array {key!r} has a negative dimension {shape}")
                    members[key] = Member(key, info, tuple(shape), bool(fortran), dtype, f.tell())
    except Exception as e:  # zipfile, zlib and numpy's header parser fail with many types on a damaged file
        raise InputError(f"{shown} is not a readable .npz of plain arrays ({first_line(e)})") from e
    return members


def _member_array(p: Path, fh: BinaryIO, size: int, zf: zipfile.ZipFile, m: Member, max_samples: int | None,
                  shown: str) -> np.ndarray:
    """The first `max_samples` rows (all without a cap) of a member: mapped in place when it is stored
    uncompressed, else decompressed up to those rows."""
    rows = m.shape[0] if max_samples is None else min(max_samples, m.shape[0])
    truncated = InputError(f"{shown}: array {m.key!r} is truncated (shape {list(m.shape)}, dtype {m.dtype} needs "
                           f"{m.nbytes} bytes; the member holds {max(m.info.file_size - m.data_start, 0)})")
    if m.info.file_size < m.data_start + m.nbytes:
        raise truncated
    try:
        if m.info.compress_type == zipfile.ZIP_STORED and not m.info.flag_bits & 0x1:  # stored, not encrypted
            if m.info.compress_size < m.data_start + m.nbytes:
                raise truncated
            # the local header's name and extra field may differ from the central directory's: read its own
            fh.seek(m.info.header_offset)
            head = fh.read(_LOCAL_HEADER)
            if len(head) != _LOCAL_HEADER or head[:4] != _LOCAL_MAGIC:
                raise ValueError(f"no local header for member {m.info.filename!r}")
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            offset = m.info.header_offset + _LOCAL_HEADER + name_len + extra_len + m.data_start
            if offset + m.nbytes > size:
                raise truncated
            order = "F" if m.fortran else "C"
            if m.nbytes == 0:
                return np.empty((rows, *m.shape[1:]), dtype=m.dtype, order=order)
            # Fortran order: a row is spread over the whole array, so map it all and take a view of the rows
            shape = m.shape if m.fortran else (rows, *m.shape[1:])
            mapped = np.memmap(p, dtype=m.dtype, mode="r", offset=offset, shape=shape, order=order)
            return mapped[:rows].view(np.ndarray)
        return _read_member(zf, m, rows, truncated)
    except InputError:
        raise
    except Exception as e:  # a damaged compressed stream (zlib, CRC), or an array too large for memory
        raise InputError(f"{shown}: cannot read array {m.key!r} ({first_line(e)})") from e


def _read_member(zf: zipfile.ZipFile, m: Member, rows: int, truncated: InputError) -> np.ndarray:
    """The first `rows` rows of a compressed member, decompressed in chunks and no further than needed."""
    out = np.empty((rows, *m.shape[1:]), dtype=m.dtype, order="F" if m.fortran else "C")
    if out.size == 0:
        return out
    with zf.open(m.info) as f:
        f.read(m.data_start)  # the .npy header, already parsed
        if not m.fortran or rows == m.shape[0]:  # the rows are a prefix of the data
            if not _read_exact(f, out.reshape(-1, order="A").view(np.uint8)):
                raise truncated
            return out
        # Fortran order: the data is prod(shape[1:]) runs of shape[0] values; keep the first `rows` of each
        n, inner = m.shape[0], math.prod(m.shape[1:])
        flat = out.reshape((rows, inner), order="F")
        per = max(1, _READ_CHUNK // max(n * m.dtype.itemsize, 1))
        for start in range(0, inner, per):
            k = min(per, inner - start)
            chunk = np.empty(n * k, dtype=m.dtype)
            if not _read_exact(f, chunk.view(np.uint8)):
                raise truncated
            flat[:, start:start + k] = chunk.reshape((n, k), order="F")[:rows]
    return out


def _read_exact(f: BinaryIO, buf: np.ndarray) -> bool:
    """Fill the byte array `buf` from `f`, a bounded chunk at a time; False when the stream ends first."""
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        got = f.readinto(view[pos:pos + _READ_CHUNK])
        if not got:
            return False
        pos += got
    return True


def read_rows(p: Path, members: dict[str, Member], max_samples: int | None, shown: str) -> dict[str, np.ndarray]:
    """The first `max_samples` rows (all without a cap) of each member, read-only."""
    try:
        size = p.stat().st_size
        fh = open(p, "rb")
        zf = zipfile.ZipFile(fh)
    except (OSError, zipfile.BadZipFile) as e:  # replaced or removed since its headers were read
        raise InputError(f"{shown} is not a readable .npz of plain arrays ({first_line(e)})") from e
    with fh, zf:
        return {k: _member_array(p, fh, size, zf, m, max_samples, shown) for k, m in members.items()}
