"""Turn a MODEL argument into an `nn.Module`: a factory in a .py file or module, or a Hugging Face folder.

Weights come only from safetensors or `torch.load(weights_only=True)`: a checkpoint is data, and
unpickling it must never run code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compress.core import InputError, ModelError, UsageError, few
from compress.core import first_line as _first_line

MODEL_FORMS = ("path/to/file.py:factory, package.module:factory, a Hugging Face model folder, or a Hub id (org/name) "
               "in the local cache")
# org/name as the Hugging Face Hub spells ids: letters, digits, '-', '_', '.'; never a path that exists
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass
class LoadedModel:
    """A model ready for export, with what later stages need to know about its inputs."""

    module: nn.Module
    source: str
    kind: str  # "factory", "hf", or "onnx" (module None: compress run takes the file as it is)
    params: list[inspect.Parameter] = field(default_factory=list)  # forward() parameters, in order
    config: dict[str, Any] = field(default_factory=dict)  # HF config values (vocab sizes) for dummy inputs
    weights: str | None = None
    folder: Path | None = None  # a Hugging Face model's files (its tokenizer, preprocessor_config.json)
    notes: list[str] = field(default_factory=list)  # what loading changed in the model, for the report
    generates: bool = False  # an ONNX decoder with its KV cache (past_key_values.* inputs): timed per token

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def required_inputs(self) -> list[str]:
        return [p.name for p in self.params if p.default is inspect.Parameter.empty]


def load_model(spec: str, weights: str | None = None) -> LoadedModel:
    """Load MODEL (see MODEL_FORMS), apply --weights, and put it in eval mode."""
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        loaded = _load_hf_folder(path)
    elif spec.lower().endswith(".onnx"):
        raise UsageError(f"{spec} is already ONNX; this command takes a PyTorch model ({MODEL_FORMS})")
    elif ":" in spec:
        target, _, fn_name = spec.rpartition(":")
        if not target or not fn_name:
            raise UsageError(f"MODEL {spec!r} must be {MODEL_FORMS}")
        factory = load_callable(target, fn_name)
        loaded = LoadedModel(module=_call_factory(factory, spec), source=spec, kind="factory")
    elif path.suffix == ".py":
        raise UsageError(f"MODEL {spec!r} names a file but no factory; write it as {spec}:factory_name")
    elif HUB_ID.fullmatch(spec) and not path.exists():
        loaded = _load_hf_folder(hub_folder(spec))
        loaded.source = spec
    elif not path.exists() and ("/" in spec or path.suffix):
        raise InputError(f"model {spec} not found")
    else:
        raise UsageError(f"MODEL {spec!r} must be {MODEL_FORMS}")
    if weights:
        load_weights(loaded.module, weights)
        loaded.weights = str(weights)
    loaded.module.eval()
    loaded.notes += plain_forward(loaded.module)
    loaded.params = forward_params(loaded.module)
    return loaded


def plain_forward(module: nn.Module) -> list[str]:
    """Switch off the KV cache of every transformers model inside `module` (the model itself, or one a user's
    wrapper holds) and say so: the forward that is traced, pruned, exported and judged is the plain one, tensors
    in and tensors out. A decoder's config comes with `use_cache=True` (every checkpoint's config.json has it),
    and its forward then builds and returns a cache object: Torch-Pruning's trace of a stock GPT-2 failed on it
    ("unsupported operand type(s) for +: 'int' and 'NoneType'"), both ONNX exporters refused the DynamicCache
    output, and nothing downstream wants it. What generation with a cache needs is exported separately."""
    switched, seen = [], set()
    for name, m in module.named_modules():  # parents first: a shared config is named at its outermost holder
        cfg = getattr(m, "config", None)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        if getattr(cfg, "use_cache", False) is True:
            cfg.use_cache = False
            switched.append(name or type(m).__name__)
    if not switched:
        return []
    return [f"KV cache switched off ({', '.join(switched)}: config.use_cache True -> False): the plain forward "
            "is traced, pruned, exported and judged; outputs are the model's tensors without past key/values"]


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of a Hub model, offline (nothing is downloaded; $HF_HUB_CACHE/$HF_HOME honoured);
    InputError saying how to fetch it when it is not cached."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise UsageError("a Hub id needs huggingface_hub (with transformers): pip install 'edge-compress[hf]'") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise InputError(f"model {repo_id} is not in the local Hugging Face cache and nothing is downloaded here: "
                         f"fetch it where there is a network (`huggingface-cli download {repo_id}`, the same "
                         "HF_HOME), or pass the model's folder") from None
    except Exception as e:  # a damaged cache entry, an id the library refuses
        raise InputError(f"model {repo_id}: the local Hugging Face cache cannot give it ({_first_line(e)})") from e


def forward_params(module: nn.Module) -> list[inspect.Parameter]:
    """forward()'s named parameters; *args/**kwargs cannot name ONNX inputs, so they are left out."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in sig.parameters.values() if p.kind in kinds]


def load_callable(target: str, fn_name: str, what: str = "model") -> Callable[..., Any]:
    """A user's function from FILE.py or an importable module: model factories and --eval metrics alike."""
    if target.endswith(".py"):
        return _callable_from_file(target, fn_name, what)
    return _callable_from_module(target, fn_name, what)


def load_option_function(spec: str, option: str, forms: str) -> Callable[..., Any]:
    """A function named by a command-line option (`--finetune`, `--eval`) as FILE.py:FN or module:FN; errors
    name the option."""
    target, _, fn_name = spec.strip().rpartition(":")
    if not target or not fn_name:
        raise UsageError(f"{option} {spec!r} must be {forms}")
    try:
        return load_callable(target, fn_name, what="function")
    except (InputError, ModelError) as e:
        raise type(e)(f"{option} {spec}: {e}") from e


def _callable_from_file(file: str, fn_name: str, what: str) -> Callable[..., Any]:
    path = Path(file).expanduser()
    if not path.is_file():
        raise InputError(f"{what} file {file} not found")
    mod_name = f"_edge_compress_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {file} as Python")
    module = importlib.util.module_from_spec(spec)
    # The file may import its siblings, as it would when run as a script.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise ModelError(f"importing {file} failed: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        sys.path.pop(0)
    return _get_callable(module, fn_name, file, what)


def _callable_from_module(mod: str, fn_name: str, what: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and mod.startswith(e.name):
            form = f"MODEL must be {MODEL_FORMS}" if what == "model" else "write it as FILE.py:FUNCTION or module:FUNCTION"
            raise ModelError(f"no module named {mod!r} ({form})") from e
        raise ModelError(f"importing {mod} failed: {_first_line(e)}") from e
    except Exception as e:
        raise ModelError(f"importing {mod} failed: {type(e).__name__}: {_first_line(e)}") from e
    return _get_callable(module, fn_name, mod, what)


def _get_callable(module: Any, fn_name: str, where: str, what: str = "model") -> Callable[..., Any]:
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        choices = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        hint = f"; callables there: {', '.join(choices[:10])}" if choices else ""
        raise ModelError(f"{where} has no {'factory' if what == 'model' else 'function'} {fn_name!r}{hint}")
    return fn


def _call_factory(factory: Callable[..., Any], spec: str) -> nn.Module:
    try:
        model = factory()
    except TypeError as e:
        raise ModelError(f"{spec}: the factory must be callable without arguments ({_first_line(e)})") from e
    except Exception as e:
        raise ModelError(f"{spec} raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_hf_folder(folder: Path) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder} is a folder but has no config.json; MODEL must be {MODEL_FORMS}")
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"{folder} has no .safetensors weights; only safetensors are loaded from model folders (pickled .bin files are never unpickled)")
    try:
        import transformers
    except ImportError:
        raise UsageError("loading a Hugging Face folder needs transformers: pip install 'edge-compress[hf]'") from None
    try:
        raw_cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({_first_line(e)})") from e
    try:
        transformers.utils.logging.disable_progress_bar()  # our own progress shows; theirs is noise when piped
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModel
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # its load report repeats, as a table, what we check
        try:
            module, info = cls.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True,
                                               trust_remote_code=False, output_loading_info=True)
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
    except Exception as e:
        raise ModelError(f"loading {folder} with transformers failed: {type(e).__name__}: {_first_line(e)}") from e
    _check_loading_info(folder, info)
    return LoadedModel(module=module, source=str(folder), kind="hf", config=raw_cfg, folder=folder)


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """Load a model folder as strictly as --weights: weights that config.json's architecture does not find
    (left randomly initialised, with only transformers' warning to say so), weights it does not expect, or of
    another shape are an error listing them. Weights the architecture ties to others (an LM head to its input
    embedding) are re-created by transformers and not reported as missing, so they pass."""
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in (info.get("mismatched_keys") or [])]
    problems = [f"{what}: {few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                            ("of another shape", mismatched)) if keys]
    if problems:
        raise ModelError(f"{folder}: the weights do not match config.json ({'; '.join(problems)}); a model built "
                         "from it would be partly random")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch checkpoint, refusing anything but tensors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"weights file {path} not found")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{path} is not a valid safetensors file ({_first_line(e)})") from e
    if suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise InputError(f"weights {path}: expected .safetensors, .pt, .pth, .bin or .ckpt")
    try:
        with warnings.catch_warnings():  # torch's advice about pickle protocols is noise above our one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path} holds objects other than tensors; refusing to unpickle it (weights_only=True). Save model.state_dict() or use .safetensors") from e
    except Exception as e:
        raise InputError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InputError(f"{path} is not a state dict (a mapping of names to tensors)")


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load weights strictly: every key and shape must match, else one message says what differs."""
    state = read_state_dict(path)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({few(mismatched)})")
    if problems:
        raise InputError(f"weights {path} do not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


