"""--calib/--eval as arrays: an .npz keyed by the model's input names (read in place, lazily), or a single array
(.npy, or an .npz of one array under any name) for a model with one input, which is then that input: there is
nothing to choose, so refusing it over a key name helped nobody."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from compress.core import InputError, first_line
from compress.data.npz_rows import npz_members, read_rows
from compress.data.registry import DataSource, Sample, register


@register
class ArraySource(DataSource):
    kind = "arrays"
    form = "DATA.npz (keys = input names, first axis = samples; one array = the only input) or DATA.npy"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.lower().endswith((".npz", ".npy"))

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.path = Path(self.spec).expanduser()
        if not self.path.is_file():
            raise InputError(f"{self.shown}: not found")
        self._rename: Optional[tuple[str, str]] = None
        if self.path.suffix.lower() == ".npy":
            try:
                self._npy = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:  # not .npy, truncated, or an object array (never unpickled)
                raise InputError(f"{self.shown}: not a readable .npy of plain numbers ({first_line(e)})") from e
            self._rename = ("", self._only_input("a .npy"))
            self.notes.append(f"the array in {self.path.name} is the model's input {self._rename[1]!r}")
            return
        members = npz_members(self.path, self.shown)
        data_keys = [k for k in members if k != "y"]
        if len(data_keys) == 1 and data_keys[0] not in self.inputs.names and self.inputs.names:
            self._rename = (data_keys[0], self._only_input(f"an .npz whose one array {data_keys[0]!r} is not an input name"))
            self.notes.append(f"{self.path.name} holds one array, {data_keys[0]!r}: read as the model's only input "
                              f"{self._rename[1]!r}")

    def _only_input(self, what: str) -> str:
        names = self.inputs.required or self.inputs.names
        if len(names) != 1:
            raise InputError(f"{self.shown}: {what} can only feed a model with one input; this one takes "
                             f"{', '.join(self.inputs.names)}: save an .npz keyed by those names")
        return names[0]

    def as_is(self) -> Optional[Path]:
        return self.path if self._rename is None else None

    def count(self) -> int:
        if self.path.suffix.lower() == ".npy":
            return int(self._npy.shape[0]) if self._npy.ndim else 0
        members = npz_members(self.path, self.shown)
        return members[self._rename[0]].shape[0] if self._rename else next(iter(members.values())).shape[0]

    def samples(self, limit: Optional[int]) -> Iterator[Sample]:
        assert self._rename is not None  # read in place otherwise (as_is)
        key, name = self._rename
        if self.path.suffix.lower() == ".npy":
            arr, labels = self._npy, None
        else:
            members = npz_members(self.path, self.shown)
            wanted = {k: m for k, m in members.items() if k in (key, "y")}
            rows = read_rows(self.path, wanted, limit, self.shown)
            arr, labels = rows[key], rows.get("y")
        if arr.ndim < 1 or arr.dtype.kind not in "fiub":
            raise InputError(f"{self.shown}: the array must be numeric with a leading sample axis (got dtype "
                             f"{arr.dtype}, shape {arr.shape})")
        n = arr.shape[0] if limit is None else min(limit, arr.shape[0])
        for i in range(n):
            yield Sample({name: np.asarray(arr[i])}, None if labels is None else int(labels[i]))
