"""A DATA argument turned into what every command reads: an .npz keyed by the model's input names. An .npz
that already is one is used in place; any other source is written once (compress.data.writer) into a folder
the command owns for its run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from compress.core import InputError, console
from compress.data import hub, images, npz, text
from compress.data.options import DataOptions
from compress.data.registry import SOURCES, DataSource, ModelInputs
from compress.data.writer import materialize

BUILTIN = (npz.ArraySource, images.ImageFolder, text.TextFile, hub.HubDataset)  # registered on import, in this order


DATA_SUFFIXES = (".npz", ".npy", ".txt", ".jsonl", ".csv")


def is_data(spec: str) -> bool:
    """Whether --eval names data (scored by top-1 or --metric) rather than a FILE.py:FN / module:FN function."""
    return spec.startswith("hf:") or spec.lower().endswith(DATA_SUFFIXES) or Path(spec).expanduser().is_dir()


def source_forms() -> str:
    return "; ".join(c.form for c in SOURCES)


def open_source(spec: str, inputs: ModelInputs, opts: DataOptions, option: str = "--calib") -> DataSource:
    """The registered source that claims `spec`; InputError naming the forms when none does."""
    shown = f"{option} {spec}"
    for cls in SOURCES:
        if cls.claims(spec):
            return cls(spec, inputs, opts, shown)
    if not spec.startswith("hf:") and not Path(spec).expanduser().exists():
        raise InputError(f"{shown}: not found")
    raise InputError(f"{shown}: not a data source this tool reads ({source_forms()})")


@dataclass
class Resolved:
    path: str  # an .npz keyed by input names (plus 'y' for labelled data)
    info: dict[str, Any] = field(default_factory=dict)  # what reading it did (kind, notes, pre-processing); {}: in place


def resolve_data(spec: str, inputs: ModelInputs, opts: DataOptions, workdir: Path, *, max_samples: Optional[int] = None,
                 labels: bool = False, option: str = "--calib") -> Resolved:
    """`spec` as an .npz path: itself when it is one keyed by the model's inputs, else its first `max_samples`
    samples written to `workdir` (which the caller removes). `labels`: the data is for --eval and must carry
    one per sample. Every note the source made (where a pre-processing setting came from) is printed once."""
    opts.check()
    source = open_source(spec, inputs, opts, option)
    direct = source.as_is()
    if direct is not None:  # read in place: nothing to say
        return Resolved(str(direct))
    Path(workdir).mkdir(parents=True, exist_ok=True)
    dst = Path(workdir) / f"{option.lstrip('-')}.npz"
    with console.progress(f"reading {option} {spec}", total=None) as step:
        n, seconds = materialize(source, dst, max_samples, labels=labels,
                                 on_progress=lambda done, total: step.update(description=f"reading {option} {spec}: "
                                                                              f"{done}/{total}"))
    info = {**source.info(), "samples": n, "seconds": round(seconds, 2)}
    for note in source.notes:
        console.info(f"{option}: {note}")
    return Resolved(str(dst), info)


def read_option(spec: Optional[str], inputs: ModelInputs, opts: DataOptions, workdir: Path, *, labels: bool = False,
                max_samples: Optional[int] = None) -> Optional[Resolved]:
    """--calib (`labels` False) or --eval (True) as resolve_data reads it; None when there is nothing to read: no
    DATA, or an --eval that names a function (FILE.py:FN). What every command that takes them calls."""
    if not spec or (labels and not is_data(spec)):
        return None
    return resolve_data(spec, inputs, opts, workdir, max_samples=max_samples, labels=labels,
                        option="--eval" if labels else "--calib")
