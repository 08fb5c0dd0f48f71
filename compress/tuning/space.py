"""What `compress search` varies, declared once: each dimension, its choices, and how a trial's config becomes the
options of one `compress run` (compress.pipeline.run.RunOptions).

A trial is one point of this space run through the same pipeline as `compress run`, so every trial's folder is a
run report and the recommended model needs no second code path. The first trial is always what a plain
`compress run --quant int8` would do: the search can only add to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from compress.core import UsageError
from compress.pipeline import RunOptions
from compress.pruning import IMPORTANCE, check_applicable
from compress.quantization import SEARCHED_METHODS, format_info, format_names
from devices import DeviceProfile

PRUNE_STEP = 0.05
# the float-fallback tolerance as a fraction of the run's: 0 searches no fallback at all
FALLBACK_FRACTIONS = (0.0, 0.5, 1.0)


def _takes(quant: Optional[str], what: str) -> bool:
    """Whether the format QUANT (None or "none": no quantization) has a dimension the registry declares:
    "calibration_methods" (--method) or "tolerance" (the float fallback)."""
    return quant not in (None, "none") and bool(getattr(format_info(quant), what))


def can_time(profile: DeviceProfile, quant: str) -> bool:
    """The device has the hardware the format needs to be timed (FP8 units for fp8; nothing for INT8/INT4)."""
    needs = format_info(quant).needs
    return not needs or bool(getattr(profile, needs))


@dataclass
class Space:
    """The search space for one model on one device; `ray()` turns it into Ray Tune's sampling domains."""

    prune_max: float = 0.6
    importances: list[str] = field(default_factory=lambda: ["l2"])
    quants: list[str] = field(default_factory=lambda: ["none", RunOptions.default("quant")])
    methods: list[str] = field(default_factory=lambda: list(SEARCHED_METHODS))  # entropy = minmax with ort
    fallbacks: list[float] = field(default_factory=lambda: list(FALLBACK_FRACTIONS))

    def ray(self) -> dict[str, Any]:
        from ray import tune

        prune = tune.quniform(0.0, self.prune_max, PRUNE_STEP) if self.prune_max > 0 else tune.choice([0.0])
        space: dict[str, Any] = {"prune": prune,
                                 "importance": tune.choice(self.importances), "quant": tune.choice(self.quants)}
        if any(_takes(q, "calibration_methods") for q in self.quants):
            space["method"] = tune.choice(self.methods)
        if any(_takes(q, "tolerance") for q in self.quants):
            space["fallback"] = tune.choice(self.fallbacks)
        return space

    def start(self) -> dict[str, Any]:
        """The first point evaluated: `compress run`'s defaults (no pruning, INT8 minmax with float fallback)."""
        point: dict[str, Any] = {"prune": 0.0, "importance": self.importances[0],
                                 "quant": RunOptions.default("quant") if RunOptions.default("quant") in self.quants else self.quants[0]}
        if any(_takes(q, "calibration_methods") for q in self.quants):
            point["method"] = RunOptions.default("quant_method")
        if any(_takes(q, "tolerance") for q in self.quants):
            point["fallback"] = 1.0
        return point

    def to_json(self) -> dict[str, Any]:
        return {"prune": [0.0, self.prune_max, PRUNE_STEP], "importance": self.importances, "quant": self.quants,
                "method": self.methods, "fallback_fraction_of_tolerance": self.fallbacks}


def space_for(model: Optional[nn.Module], profile: DeviceProfile, prune_max: float, quants: Optional[list[str]] = None) -> Space:
    """The dimensions that mean something for this model and device: importance criteria that can score it
    (no bn_scale without BatchNorm; never the random baseline), FP8 only on FP8 hardware, INT4 only on request.
    No module (an ONNX model): nothing to prune, so no pruning dimension."""
    if not 0.0 <= prune_max < 1.0:
        raise UsageError(f"--prune-max {prune_max:g}: must be in [0, 1)")
    usable = []
    if model is None:  # the importance dimension has one value, unused, so that a trial's config keeps its shape
        prune_max, usable = 0.0, ["l2"]
    for name in IMPORTANCE if model is not None else []:
        if name == "random":
            continue
        try:
            check_applicable(name, model)
        except UsageError:
            continue
        usable.append(name)
    usable.sort(key=lambda n: n != "l2")  # compress run's default first: the starting point uses it
    if quants is None:
        quants = ["none"] + [f for f in format_names() if format_info(f).in_default_search and can_time(profile, f)]
    for q in quants:
        if q != "none" and q not in format_names():
            raise UsageError(f"--quant {q}: one of {', '.join(['none', *format_names()])}")
        if q != "none" and not can_time(profile, q):
            raise UsageError(f"--quant {q}: device {profile.name!r} has no {format_info(q).needs.upper()} hardware "
                             "to time it on")
    return Space(prune_max=prune_max, importances=usable, quants=list(dict.fromkeys(quants)))


def normalise(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config with quniform's float noise removed (0.30000000000000004) and unused keys dropped, so that
    equal settings print, hash and cache alike."""
    out = dict(config)
    out["prune"] = round(float(out.get("prune") or 0.0) / PRUNE_STEP) * PRUNE_STEP
    out["prune"] = round(out["prune"], 4)
    if out["prune"] == 0.0:
        out.pop("importance", None)
    if not _takes(out.get("quant"), "calibration_methods"):
        out.pop("method", None)
    if not _takes(out.get("quant"), "tolerance"):
        out.pop("fallback", None)
    return out


def trial_seed(config: dict[str, Any], seed: int) -> int:
    """A seed for the trial's own randomness (distillation batches), fixed by its settings and --seed."""
    digest = hashlib.sha256(json.dumps([normalise(config), seed], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def label(config: dict[str, Any]) -> str:
    c = normalise(config)
    parts = [f"prune {c['prune']:g}" + (f" ({c['importance']})" if c.get("importance") else ""), c.get("quant", "none")]
    if c.get("method"):
        parts.append(c["method"])
    if "fallback" in c:
        parts.append("no fallback" if c["fallback"] == 0 else f"fallback x{c['fallback']:g}")
    return ", ".join(parts)
