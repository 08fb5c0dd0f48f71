"""--calib/--eval as a Hugging Face `datasets` dataset: `hf:PATH_OR_NAME[:split][:column]`, a dataset saved
with `save_to_disk`, or one in the local cache (`load_dataset` offline: nothing is downloaded). An image column
goes through the image folder's pre-processing, a text column through the model's tokenizer; a `label` column
(or --label-column) gives --eval its labels. Rows are read one at a time from its Arrow files (memory-mapped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional

from compress.core import InputError, UsageError, first_line
from compress.data.images import decode_pil, image_plan
from compress.data.registry import DataSource, Sample, register
from compress.data.text import TEXT_COLUMNS, Tokenize

PREFIX = "hf:"
SPLITS = ("train", "validation", "test")  # tried in order when the dataset has several and none is named


@register
class HubDataset(DataSource):
    kind = "hf-dataset"
    form = "hf:NAME_OR_PATH[:split][:column] (a Hugging Face dataset saved to disk or cached; offline)"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith(PREFIX)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name, split, column = _parse(self.spec[len(PREFIX):], self.shown)
        self.ds = _load(name, split, self.shown, self.notes)
        column = column or self.opts.column
        feats = self.ds.features
        if column is None:
            column = next((c for c, f in feats.items() if type(f).__name__ == "Image"), None) or \
                next((c for c in TEXT_COLUMNS if c in feats), None)
        if column is None or column not in feats:
            raise InputError(f"{self.shown}: no {'column ' + repr(column) if column else 'image or text column'} "
                             f"(columns: {', '.join(feats)}); name one as hf:NAME:split:COLUMN or with --column")
        self.column = column
        self.is_image = type(feats[column]).__name__ == "Image"
        self.label_column = self.opts.label_column if self.opts.label_column in feats else None
        if self.is_image:
            self.plan = image_plan(self.inputs, self.opts, self.shown)
            self.notes += self.plan.notes
        else:
            self.encode = Tokenize(self.inputs, self.opts, self.shown, self.notes)
        self.notes.append(f"column {column!r}" + (f", labels from {self.label_column!r}" if self.label_column else ""))

    def count(self) -> int:
        return len(self.ds)

    def samples(self, limit: Optional[int]) -> Iterator[Sample]:
        if self.is_image:
            for value, label in self._rows(limit):
                yield Sample({self.plan.name: self.plan.apply(decode_pil(value, self.plan.channels))}, label)
        else:
            yield from self.encode.stream((str(value), label) for value, label in self._rows(limit))

    def _rows(self, limit: Optional[int]) -> Iterator[tuple[Any, Optional[int]]]:
        """(the column's value, its label or None) per row, one row read at a time."""
        n = len(self.ds) if limit is None else min(limit, len(self.ds))
        rows = self.ds.select_columns([self.column] + ([self.label_column] if self.label_column else []))
        for i in range(n):
            row = rows[i]
            label = row.get(self.label_column) if self.label_column else None
            yield row[self.column], None if label is None else int(label)


def _offline(datasets: Any) -> None:
    """Never a download, a cached copy or an error: both libraries read their offline switches when imported,
    so they are set on the loaded modules too (the environment, for anything imported later)."""
    import huggingface_hub.constants as hub_constants

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True


def _parse(rest: str, shown: str) -> tuple[str, Optional[str], Optional[str]]:
    parts = rest.split(":")
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"{shown}: write it as hf:NAME_OR_PATH[:split][:column]")
    return parts[0], (parts[1] or None) if len(parts) > 1 else None, (parts[2] or None) if len(parts) > 2 else None


def _load(name: str, split: Optional[str], shown: str, notes: list[str]) -> Any:
    try:
        import datasets
    except ImportError:
        raise UsageError("hf: data sources need the datasets library: pip install 'edge-compress[data]'") from None
    datasets.disable_progress_bars()
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            _offline(datasets)
            ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError) as e:  # offline, a dataset not cached is a "connection" error
        raise InputError(f"{shown}: {name} is not a saved dataset folder nor in the local Hugging Face cache "
                         f"({first_line(e)}); fetch it first where there is a network: "
                         f"python -c \"import datasets; datasets.load_dataset('{name}')\"") from e
    except Exception as e:  # datasets raises many kinds for a damaged or foreign folder, or offline misses
        raise InputError(f"{shown}: cannot load {name} ({type(e).__name__}: {first_line(e)}); it must be a "
                         "folder written by Dataset.save_to_disk, or a dataset in the local cache") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = next((s for s in SPLITS if s in ds), None) if len(ds) > 1 else next(iter(ds))
            if split is None:
                raise InputError(f"{shown}: splits {', '.join(ds)}; name one as hf:{name}:SPLIT")
            notes.append(f"split {split!r}")
        if split not in ds:
            raise InputError(f"{shown}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    elif split is not None and path.is_dir():
        notes.append(f"a single dataset: split {split!r} ignored")
    return ds
