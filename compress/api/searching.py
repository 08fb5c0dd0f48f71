"""`compress.search` and `compress.sweep`: many `compress run`s as Ray Tune trials, locally or on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from compress.core import UsageError, check_foreign
from compress.data import DataOptions, data_opts_of
from compress.models import require_one_input_source, shape_args
from compress.tuning import SearchSettings, SearchSummary, SweepSummary, cells, load_sweep, run_search, run_sweep

PathLike = Union[str, Path]


def search(model: str, *, output: PathLike, weights: Optional[str] = None,
           input_shape: Union[str, Sequence[str]] = (), calib: Optional[str] = None, max_calib: Optional[int] = None,
           device: str = SearchSettings.default("device"), latency_budget: Optional[float] = None,
           min_fidelity: Optional[float] = None, eval: Optional[str] = None, metric: Optional[str] = None,
           max_accuracy_drop: Optional[float] = None, objective: Optional[str] = None,
           trials: int = SearchSettings.default("trials"), seed: int = SearchSettings.default("seed"),
           prune_max: float = SearchSettings.default("prune_max"), quant: Sequence[str] = (),
           runs: Optional[int] = None, address: Optional[str] = None,
           concurrency: int = SearchSettings.default("concurrency"), resume: bool = False,
           image_size: Optional[str] = None, crop_pct: Optional[float] = None, mean: Optional[str] = None,
           std: Optional[str] = None, interpolation: Optional[str] = None, seq_len: Optional[int] = None,
           tokenizer: Optional[str] = None, column: Optional[str] = None,
           label_column: str = DataOptions.default("label_column"), skip_bad: bool = False,
           on_stage: Optional[Callable[[str], None]] = None, on_trial: Optional[Callable[[int], None]] = None,
           command: str = "") -> SearchSummary:
    """Search prune ratio, importance and quantization with Ray Tune for the most faithful model of MODEL within
    `latency_budget` (ms, p50 on DEVICE); writes OUTPUT (search.md/.json/.png, trials, best/) and returns the
    compress.tuning.SearchSummary (`recommended` None when no model met the budget and floor: `reason`).

    Keyword arguments are `compress search`'s options (`quant` the list of --quant choices, `eval=` for --eval).
    `on_stage(text)` hears what it is doing, `on_trial(n)` each finished trial; None: nothing is reported.

        >>> import compress
        >>> s = compress.search("compress.zoo:shapes_resnet", calib="calib.npz", latency_budget=2.5, trials=8,
        ...                     output="search-out")
        >>> s.recommended, s.recommended_settings, [c.name for c in s.candidates if c.pareto]
    """
    shapes = list(shape_args(input_shape))
    require_one_input_source(shapes, calib)
    _check_outdir(output, [model, weights, calib, device, eval, metric])
    settings = SearchSettings(model=model, device=device, weights=weights, input_shapes=shapes, calib=calib,
                              max_calib=max_calib, latency_budget_ms=latency_budget, min_fidelity=min_fidelity,
                              max_accuracy_drop=max_accuracy_drop, eval_spec=eval, metric_spec=metric,
                              objective=objective, trials=trials, seed=seed, address=address, concurrency=concurrency,
                              runs=runs, prune_max=prune_max, quants=list(quant) or None, outdir=str(output),
                              resume=resume, command=command,
                              data=data_opts_of(locals()))
    settings.check()
    return run_search(settings, on_stage=on_stage or (lambda s: None), on_trial=on_trial or (lambda n: None))


def sweep(sweep_file: PathLike, *, output: PathLike, address: Optional[str] = None, concurrency: int = 1,
          resume: bool = False, on_stage: Optional[Callable[[str], None]] = None,
          on_trial: Optional[Callable[[int], None]] = None, command: str = "") -> SweepSummary:
    """Run the grid of models x devices x options in SWEEP_FILE (YAML; compress.tuning.sweep lists every key), each
    cell one `compress run` as a Ray Tune trial; writes OUTPUT (cells/, sweep.md/.json/.png) and returns the
    compress.tuning.SweepSummary (each cell's status and recommendation; a crashed cell has its error).

        >>> import compress
        >>> s = compress.sweep("sweep.yaml", output="sweep-out")
        >>> [(c.model, c.device, c.recommended, c.speedup_vs_fp32) for c in s.cells]
    """
    _check_outdir(output, [sweep_file])
    return run_sweep(str(sweep_file), str(output), address=address, concurrency=concurrency, resume=resume,
                     command=command, on_stage=on_stage or (lambda s: None), on_trial=on_trial or (lambda n: None))


def sweep_cells(sweep_file: PathLike) -> int:
    """How many cells SWEEP_FILE holds (a bad file fails here, before Ray starts)."""
    return len(cells(load_sweep(str(sweep_file))))


def _check_outdir(output: PathLike, inputs: list[Any]) -> Path:
    """OUTDIR is new, empty, or an earlier search's/sweep's (its manifest lists what is there; Ray's state is kept
    there for --resume); never a file, never a folder of other files, never one holding an input."""
    out = Path(output)
    for p in inputs:
        if p and Path(p).exists() and Path(p).resolve().is_relative_to(out.resolve()):
            raise UsageError(f"-o {output} contains the input {p}: choose another folder")
    check_foreign(out)
    return out
