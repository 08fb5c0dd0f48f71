"""One registry of data sources for --calib and --eval: what a DATA argument names (an .npz, an image folder, a
text file, a Hugging Face dataset) and how its samples become the model's inputs.

A source is a class that claims the argument (`claims`), counts its samples without reading them, and yields
them one at a time (`samples`), each a dict of the model's inputs (no batch axis) and, for labelled data, its
label: nothing is loaded whole, so a dataset of any size costs the memory of one sample (plus what the
writer maps). As onnxruntime's quantizer registry maps an op type to its quantizer, `open_source` maps an
argument to the first registered source that claims it, in registration order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from compress.data.options import DataOptions


@dataclass(frozen=True)
class ModelInputs:
    """What a source must produce: the model's input names in order, which are required, what is known of each
    one's shape (None for a dimension not fixed; the first is the batch) and dtype, and where the model's own
    pre-processing lives (a Hugging Face folder's tokenizer and preprocessor_config.json, timm's
    `pretrained_cfg`)."""

    names: tuple[str, ...]
    required: tuple[str, ...] = ()
    shapes: dict[str, tuple[Optional[int], ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    folder: Optional[Path] = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    decoder: bool = False  # an ONNX decoder with its KV cache: data gives its prefill's token ids, not the past


@dataclass
class Sample:
    inputs: dict[str, np.ndarray]  # one sample of each input the source produces, no batch axis
    label: Optional[int] = None


class DataSource(ABC):
    """One kind of DATA argument. Subclasses set `kind` and `form` (a line of --help) and register themselves."""

    kind: str = ""
    form: str = ""

    def __init__(self, spec: str, inputs: ModelInputs, opts: DataOptions, shown: str) -> None:
        self.spec, self.inputs, self.opts, self.shown = spec, inputs, opts, shown
        self.notes: list[str] = []  # what the source decided for the user (pre-processing, keys), for the report

    @classmethod
    @abstractmethod
    def claims(cls, spec: str) -> bool:
        """Whether this argument is this kind of source (cheap: the name and what is on disk, no decoding)."""

    @abstractmethod
    def count(self) -> int:
        """How many samples there are, without decoding them."""

    @abstractmethod
    def samples(self, limit: Optional[int]) -> Iterator[Sample]:
        """The first `limit` samples (all when None), one at a time."""

    def as_is(self) -> Optional[Path]:
        """A file the commands can read directly (an .npz keyed by the model's inputs), else None."""
        return None

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.spec, "notes": list(self.notes)}


SOURCES: list[type[DataSource]] = []


def register(cls: type[DataSource]) -> type[DataSource]:
    """Class decorator: add a source kind to the registry."""
    if any(c.kind == cls.kind for c in SOURCES):
        raise ValueError(f"data source {cls.kind!r} registered twice")
    SOURCES.append(cls)
    return cls
