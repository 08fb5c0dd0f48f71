"""--calib/--eval as text: a .txt (one sample a line), or a column of a .jsonl or .csv, tokenized with the
model's own tokenizer (its Hugging Face folder, or --tokenizer; offline) to --seq-len, giving every input the
model takes (input_ids, attention_mask, token_type_ids). Labels for --eval come from a label column.

Tokenized in batches of TOKENIZE_BATCH lines as they are read: a file of any length costs one batch of memory.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from compress.core import InputError, UsageError, first_line
from compress.data.registry import DataSource, Sample, register

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_SEQ_LEN = 128  # Optimum's and Olive's usual calibration length for encoders
TOKENIZE_BATCH = 64
TEXT_COLUMNS = ("text", "sentence", "content")  # tried in order when no --column is given


@register
class TextFile(DataSource):
    kind = "text"
    form = "TEXT.txt (a sample a line), or a column of .jsonl/.csv (tokenized with the model's tokenizer)"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.lower().endswith((".txt", ".jsonl", ".csv")) and Path(spec).expanduser().is_file()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = Path(self.spec).expanduser()
        self.suffix = self.path.suffix.lower()
        self.encode = Tokenize(self.inputs, self.opts, self.shown, self.notes)
        self._count: Optional[int] = None

    def count(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._records())
        return self._count

    def _records(self) -> Iterator[tuple[str, Optional[int]]]:
        """(text, label) per sample, streamed from the file."""
        try:
            with open(self.path, encoding="utf-8", newline="" if self.suffix == ".csv" else None) as f:
                if self.suffix == ".txt":
                    for line in f:
                        line = line.rstrip("\r\n")
                        if line.strip():
                            yield line, None
                elif self.suffix == ".jsonl":
                    for i, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                row = json.loads(line)
                            except json.JSONDecodeError as e:
                                raise InputError(f"{self.shown}: line {i} is not JSON ({first_line(e)})") from e
                            if not isinstance(row, dict):
                                raise InputError(f"{self.shown}: line {i} is not a JSON object")
                            yield self._field(row, f"line {i}")
                else:
                    for i, row in enumerate(csv.DictReader(f), 2):
                        yield self._field(row, f"row {i}")
        except UnicodeDecodeError as e:
            raise InputError(f"{self.shown}: not UTF-8 text ({first_line(e)})") from e
        except OSError as e:
            raise InputError(f"{self.shown}: cannot read ({first_line(e)})") from e

    def _field(self, row: dict[str, Any], where: str) -> tuple[str, Optional[int]]:
        col = self.opts.column or next((c for c in TEXT_COLUMNS if c in row), None)
        if col is None or col not in row:
            raise InputError(f"{self.shown}: {where} has no {'column ' + repr(col) if col else 'text column'} "
                             f"(it has {', '.join(map(str, row)) or 'none'}); name it with --column")
        return str(row[col]), _label(row.get(self.opts.label_column), self.shown, where)

    def samples(self, limit: Optional[int]) -> Iterator[Sample]:
        return self.encode.stream(itertools.islice(self._records(), limit))


def _label(v: Any, shown: str, where: str) -> Optional[int]:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise InputError(f"{shown}: {where}: label {v!r} is not a class index (an integer)") from None


class Tokenize:
    """The model's tokenizer, loaded offline, padding and truncating to the sequence length; shared by every
    text source (files and datasets)."""

    def __init__(self, inputs: Any, opts: Any, shown: str, notes: list[str]) -> None:
        self.names = [n for n in inputs.names if n in TEXT_INPUTS]
        if "input_ids" not in self.names:
            raise InputError(f"{shown}: text feeds a model that takes input_ids; this one takes "
                             f"{', '.join(inputs.names) or '(none)'}")
        missing = [n for n in inputs.required if n not in TEXT_INPUTS]
        if missing:
            raise InputError(f"{shown}: text gives input_ids/attention_mask/token_type_ids, and the model also needs "
                             f"{', '.join(missing)}")
        self.dtypes = {n: inputs.dtypes.get(n, "int64") for n in self.names}
        folder = opts.tokenizer or (str(inputs.folder) if inputs.folder else None)
        if folder is None:
            raise UsageError(f"{shown}: text needs a tokenizer: give --tokenizer FOLDER (a Hugging Face folder with "
                             "tokenizer.json or its vocabulary), or a model folder that has one")
        shape = inputs.shapes.get("input_ids", ())
        if opts.seq_len is not None:
            self.seq_len = opts.seq_len
        elif len(shape) == 2 and shape[1]:
            self.seq_len = int(shape[1])
            notes.append(f"sequence length {self.seq_len}, from the model's input shape")
        else:
            self.seq_len = DEFAULT_SEQ_LEN
            notes.append(f"sequence length {DEFAULT_SEQ_LEN} (nothing given; set it with --seq-len)")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UsageError("tokenizing text needs transformers: pip install 'edge-compress[hf]'") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # OSError for a folder without one, ValueError for an unknown kind, ...
            raise InputError(f"{shown}: no tokenizer could be loaded from {folder} ({type(e).__name__}: "
                             f"{first_line(e)}); give --tokenizer FOLDER") from e
        if self.tok.pad_token is None:  # a decoder's tokenizer (GPT-2, Llama) has none; padding is masked out anyway
            if self.tok.eos_token is None:
                raise InputError(f"{shown}: the tokenizer in {folder} has neither a padding nor an end-of-text token "
                                 "to pad with; give --seq-len no longer than the shortest text, or set pad_token")
            self.tok.pad_token = self.tok.eos_token
            notes.append(f"padded with the end-of-text token {self.tok.eos_token!r} (the tokenizer has no padding token)")
        notes.append(f"tokenized with {type(self.tok).__name__} from {folder}, padded and truncated to {self.seq_len}")

    def stream(self, records: Iterable[tuple[str, Optional[int]]]) -> Iterator[Sample]:
        """(text, label) records as samples, tokenized TOKENIZE_BATCH at a time as they come."""
        batch: list[tuple[str, Optional[int]]] = []
        for rec in records:
            batch.append(rec)
            if len(batch) == TOKENIZE_BATCH:
                yield from self.samples(batch)
                batch = []
        if batch:
            yield from self.samples(batch)

    def samples(self, batch: list[tuple[str, Optional[int]]]) -> Iterator[Sample]:
        enc = self.tok([t for t, _ in batch], padding="max_length", truncation=True, max_length=self.seq_len,
                       return_tensors="np", return_token_type_ids="token_type_ids" in self.names)
        arrays = {}
        for n in self.names:
            if n in enc:
                arrays[n] = np.asarray(enc[n]).astype(self.dtypes[n])
            elif n == "token_type_ids":
                arrays[n] = np.zeros((len(batch), self.seq_len), self.dtypes[n])
        for i, (_, label) in enumerate(batch):
            yield Sample({k: v[i] for k, v in arrays.items()}, label)
