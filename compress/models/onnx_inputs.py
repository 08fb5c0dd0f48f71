"""An ONNX file's graph inputs as the data readers take them (compress.data.ModelInputs), without torch: what
`compress profile` (and the API's `compress.profile`) need to name an --input-shape, on an install that has no
torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import onnx

from compress.core import InputError, first_line
from compress.data import ModelInputs
from export import PAST_PREFIX

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}


def onnx_model_inputs(path: str | Path) -> ModelInputs:
    """Graph inputs that are not initializers, their static dims (None where symbolic) and dtypes; the folder
    the file lies in holds its tokenizer or preprocessor_config.json when it came from a Hugging Face export.
    A decoder with its KV cache (past_key_values.* inputs) takes data as a prefill: its token ids (and a mask,
    optional), the past being empty."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise InputError(f"model {path} not found") from None
    except Exception as e:  # protobuf's DecodeError and others: not a model
        raise InputError(f"{path} is not a readable ONNX model ({first_line(e)})") from e
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, tuple[Optional[int], ...]] = {}
    dtypes: dict[str, str] = {}
    names = []
    fed = [i for i in model.graph.input if i.name not in inits]
    decoder = any(i.name.startswith(PAST_PREFIX) for i in fed)
    for i in fed:
        if decoder and i.name.startswith(PAST_PREFIX):  # its prefill's: an empty past (export.prefill_feeds)
            continue
        names.append(i.name)
        t = i.type.tensor_type
        shapes[i.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        dtypes[i.name] = _ONNX_DTYPES.get(t.elem_type, "float32")
    # a decoder with its KV cache takes data as its prefill: token ids, a mask of ones where none is given
    required = [n for n in names if not (decoder and n == "attention_mask")]
    return ModelInputs(names=tuple(names), required=tuple(required), shapes=shapes, dtypes=dtypes,
                       folder=Path(path).expanduser().resolve().parent, decoder=decoder)
