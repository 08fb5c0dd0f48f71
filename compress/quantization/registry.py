"""The one registry of quantization backends: format x backend -> the class that makes it.

A backend is one module in compress/quantization/backends/ whose class subclasses `Backend` (it registers itself,
as Olive's passes do) and one line in BACKEND_MODULES below. Everything that offers a choice of format or
backend reads this registry: click's choices for `--to`/`--quant`/`--backend`, the option checks against the
device profile, the quantize stage, `compress run`'s pipeline and `compress search`'s space. Adding a format
(or a second backend for one) touches nothing else.

The registry is light to import (the CLI builds its choices from it at start-up): a backend's module imports
its quantizer (torch, INC, onnxruntime's quantizer) only inside `quantize`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from compress.core import UsageError

if TYPE_CHECKING:
    from compress.quantization.options import QuantOptions
    from devices import DeviceProfile

# One line per backend module; each module's Backend subclasses register themselves when it is imported.
BACKEND_MODULES = (
    "compress.quantization.backends.int8_ort",
    "compress.quantization.backends.int8_inc",
    "compress.quantization.backends.fp8",
    "compress.quantization.backends.int4",
)

Requantize = Callable[[Path, Path, list[str], bool], None]  # (src, out, nodes, only those nodes) -> writes out
Outputs = Callable[..., Any]  # (model path, feeds) -> outputs, as compress.evaluate.onnx_outputs


@dataclass
class QuantJob:
    """What the quantize stage hands a backend: the fp32 ONNX model, where to write, the device, the options,
    the calibration part of the data (None: synthetic) and the held-out feeds fidelity is measured on."""

    fp32: Path
    out: Path
    work: Path
    profile: DeviceProfile
    opts: QuantOptions
    calib_label: Optional[str]
    calib_part: Any
    held: list[dict[str, Any]]
    simulated: bool
    torch_source: Optional[tuple[Any, dict[str, Any], list[dict[str, Any]]]] = None
    on_stage: Callable[[str], None] = lambda s: None

    def feeds(self, seed: int, max_samples: Optional[int]) -> list[dict[str, Any]]:
        """Up to max_samples feeds of the calibration part for the fp32 graph (synthetic ones when there is no
        data, drawn with `seed`)."""
        from compress.quantization.calib import calibration_feeds

        return calibration_feeds(self.fp32, self.calib_part, seed=seed, max_samples=max_samples, label=self.calib_label)


@dataclass
class Quantized:
    """What a backend made: the model and its own account of how (`info`, report["quantizer"]), and, when it
    can, `requantize` with a set of nodes (kept out, or the only ones quantized): op selection and the float
    fallback use it. How to run a model of the format is the backend's `outputs()`."""

    path: Path
    info: dict[str, Any]
    preset: Optional[dict[str, Any]] = None
    requantize: Optional[Requantize] = None
    # the same recipe calibrated with another --method (its requantize), where the backend has methods
    recalibrated: Optional[Callable[[str], Requantize]] = None
    fidelity: Optional[dict[str, Any]] = None  # when the backend measured it on the held-out feeds already
    excluded_layers: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)  # the format's own report fields (INT4: size, bits)


class Backend:
    """One way to make one format. Subclasses set the class attributes and implement `quantize`."""

    format: ClassVar[str]  # --to / --quant value: int8, fp8, int4
    backend: ClassVar[str] = "ort"  # --backend value
    takes: ClassVar[str] = "onnx"  # "onnx", or "torch" (quantizes the PyTorch module the ONNX came from)
    calibration_methods: ClassVar[bool] = False  # --method (minmax/percentile/entropy) means something
    selects_ops: ClassVar[bool] = False  # per-op latency selection applies (INT8 kernels only)
    tolerance: ClassVar[bool] = True  # --tolerance/--eval steer it (INT4 is steered by its size budget)
    in_default_search: ClassVar[bool] = True  # `compress search` tries it unless --quant says otherwise
    needs: ClassVar[str] = ""  # a DeviceProfile flag the device must have to time it ("fp8"), else simulated
    # what synthetic calibration data (no --calib) makes wrong, for the CLI's warning; "" when the quantizer
    # warns about it itself (onnxruntime INT8)
    synthetic_data_spoils: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        key = (cls.format, cls.backend)
        if key in _REGISTRY:
            raise TypeError(f"two quantization backends for {key}: {_REGISTRY[key].__name__} and {cls.__name__}")
        _REGISTRY[key] = cls

    def simulated(self, profile: DeviceProfile, opts: QuantOptions) -> bool:
        """Made for a device without the hardware to run it (fidelity only, never timed)."""
        return bool(self.needs) and not getattr(profile, self.needs)

    def check(self, profile: DeviceProfile, opts: QuantOptions) -> None:
        """Refuse options this backend cannot honour on this device, in one line; the default refuses the INT4
        budget options."""
        if opts.budget_mb is not None or opts.avg_bits is not None:
            raise UsageError(f"--budget-mb/--avg-bits allocate bits per layer for --to int4, not --to {opts.to}")

    def quantize(self, job: QuantJob) -> Quantized:
        raise NotImplementedError

    def outputs(self) -> tuple[Outputs, Any]:
        """How to run a model of this format on the host: (outputs function, session options for --eval)."""
        from compress.evaluate import onnx_outputs

        return onnx_outputs, None


_REGISTRY: dict[tuple[str, str], type[Backend]] = {}
_loaded = False


def _load() -> dict[tuple[str, str], type[Backend]]:
    global _loaded
    if not _loaded:
        for name in BACKEND_MODULES:
            importlib.import_module(name)
        _loaded = True
    return _REGISTRY


def format_names() -> tuple[str, ...]:
    """Every format some backend makes, in BACKEND_MODULES order (--to, --quant)."""
    return tuple(dict.fromkeys(f for f, _ in _load()))


def backend_names() -> tuple[str, ...]:
    """Every backend name (--backend)."""
    return tuple(dict.fromkeys(b for _, b in _load()))


def backend_for(fmt: str, backend: str = "ort") -> Backend:
    """The backend that makes FMT with BACKEND; a one-line UsageError naming what exists otherwise."""
    reg = _load()
    if fmt not in format_names():
        raise UsageError(f"--to {fmt}: one of {', '.join(format_names())}")
    if backend not in backend_names():
        raise UsageError(f"--backend {backend}: one of {', '.join(backend_names())}")
    cls = reg.get((fmt, backend))
    if cls is None:
        made = [f for f, b in reg if b == backend]
        others = [b for f, b in reg if f == fmt]
        raise UsageError(f"--backend {backend} makes {', '.join(m.upper() for m in made)} only; "
                         f"{fmt.upper()} goes through --backend {' or '.join(others)}")
    return cls()


def format_info(fmt: str) -> type[Backend]:
    """The format's default backend class (its first registered), for what the format itself implies."""
    for (f, _), cls in _load().items():
        if f == fmt:
            return cls
    raise UsageError(f"unknown quantization format {fmt!r}: one of {', '.join(format_names())}")
