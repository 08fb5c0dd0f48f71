"""The options of `compress run` (and of each `compress search` trial, which is one run): the CLI reads its
defaults from here, so each default is written once."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from compress.core import Options
from compress.pruning import PruneOptions
from compress.quantization import QuantOptions


class RunOptions(Options):
    prune: Optional[PruneOptions] = None
    quant: str = "int8"  # a format of compress.quantization's registry, or "none"
    int4: dict[str, Any] = Field(default_factory=dict)  # --quant int4: QuantOptions' block_size/budget_mb/avg_bits/salience
    calib: Optional[str] = None  # .npz for quantization scales (None: synthetic, warned)
    max_calib: Optional[int] = None  # --max-calib: read at most this many samples of `calib`
    calib_name: Optional[str] = None  # the user's --calib DATA when `calib` is the .npz it was read into
    simulate: bool = False
    tolerance: float = 0.01  # allowed loss: 1 - top-1 agreement for classifiers, else 1 - min cosine
    runs: Optional[int] = None
    max_seconds: Optional[float] = None
    ab_rounds: int = 30
    # time each variant at 1, 2, 4, ... up to the profile's threads and keep its fastest (fp32's too): the
    # recommendation then comes with its thread count (compress.pipeline.timing.thread_counts)
    tune_threads: bool = True
    backend: str = QuantOptions.default("backend")  # a backend of compress.quantization's registry for `quant`
    select_ops: bool = True  # INT8: keep fp32 where an op is not faster in INT8 (compress.quantization.opselect)
    evaluate: Any = None  # --eval (a compress.evaluate.Metric): tolerance bounds the drop of this score instead of fidelity
    cache: Any = None  # a compress.pipeline.StageCache; None: every stage computed (library callers); the CLI passes one
    source: str = ""
    command: str = ""
    overwrite: bool = False  # an output folder holding what no run wrote is moved aside (DIR.old-N), not refused
    quant_method: str = QuantOptions.default("method")  # INT8 activation calibration (compress search varies it)
    quant_tolerance: Optional[float] = None  # the quantizer's float-fallback tolerance; None: `tolerance`
    quant_fallback: bool = True  # False: no float fallback search at all (compress search tries both)
    timer: Any = None  # (paths, profile, feeds, runs, max_seconds, ab_rounds, tune_threads) -> Timings: time_variants, or where it runs
    on_result: Any = None  # (stage, typed result) -> None, called as soon as a stage's result exists
    # with --prune and --quant: also quantize the unpruned model (variant '{quant}-unpruned'), so a cut that costs
    # too much accuracy does not take quantization down with it; compress search tries prune 0 itself and skips it
    backoff: bool = True
    # --generate: the model generates text; variants are exported with the KV cache (export.generation), timed per
    # token (prefill and decode: runtime's generation mode) and compared and recommended on the decode step
    generate: bool = False
