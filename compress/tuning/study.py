"""`compress search`: the prune ratio x importance x quantization x fallback space searched with Ray Tune for the
most faithful model within a latency budget on the device.

Search algorithm: Optuna's TPE sampler (seeded) through Ray Tune's OptunaSearch; the first trial is compress
run's default setting, so the search starts from what a plain run gives. Hopeless trials stop early
(compress.tuning.trials.Hopeless). Every variant that a trial measured (its fp32, pruned and quantized models)
takes part in the Pareto set of p50 latency vs fidelity; the recommendation is the most faithful one within the
latency budget and above --min-fidelity, ties to the faster. Its trial folder, a complete `compress run` report,
is copied to OUTDIR/best.

OUTDIR holds Ray Tune's experiment state (OUTDIR/ray), one run folder per trial (OUTDIR/trials/ID), and the
summary (search.json, search.md, search.png, best/). A search that was interrupted continues with --resume; the
summary files are each written atomically, and best/ is swapped in whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from compress.core import EdgeError, UsageError, claim_folder, first_line, partial_dir, swap_in, write_json
from compress.data import read_option
from compress.models import load_run_model, model_inputs, prepare_inputs
from compress.report import Point, pareto_front
from compress.tuning.options import SearchSettings
from compress.tuning.results import SEARCH_SCHEMA, SearchSummary
from compress.tuning.space import label, normalise, space_for
from compress.tuning.study_report import write_search_readable
from compress.tuning.trials import TRIAL_METRIC, Hopeless, TrialProgress, fidelity_value, fit_on_ray, run_trial
from devices import load_profile

EXPERIMENT = "search"
# What a search writes in its -o folder (listed in the folder's manifest before Ray starts).
OWNED = ("ray", "trials", "best", "data", "search.json", "search.md", "search.png")


def candidates(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every measured variant of every finished trial, as one flat list (the same fp32 appears once)."""
    out: list[dict[str, Any]] = []
    seen_fp32 = False
    for t in trials:
        if t["status"] != "done":
            continue
        rep = json.loads(Path(t["report"]).read_text())
        for v in rep["variants"]:
            if v["name"] == "fp32":
                if seen_fp32:
                    continue
                seen_fp32 = True
            out.append({**v, "name": "fp32" if v["name"] == "fp32" else f"{t['id']}:{v['name']}", "trial": t["id"],
                        "variant": v["name"], "settings": _settings(t["config"], v["name"]), "report": t["report"]})
    return out


def _settings(config: dict[str, Any], variant: str) -> str:
    """What produced this variant of a trial: fp32 is the model as given, 'pruned' only the trial's pruning."""
    if variant == "fp32":
        return "as given"
    if variant == "pruned":
        return label({**config, "quant": "none"})
    return label(config)


def _y(v: dict[str, Any], scored: bool) -> Optional[float]:
    return v.get("accuracy") if scored else fidelity_value(v.get("fidelity") or {})


def recommend(cands: list[dict[str, Any]], budget: Optional[float], floor: Optional[float], scored: bool,
              goal: str = "fidelity") -> tuple[Optional[dict[str, Any]], str]:
    """Among the timed variants within the budget and above the floor: the most faithful (goal "fidelity", ties to
    the faster) or the fastest (goal "speed", ties to the more faithful); or None and why. With --eval the floor
    is fp32's score minus the allowed drop."""
    timed = [v for v in cands if v.get("latency_ms") and _y(v, scored) is not None]
    fits = [v for v in timed if budget is None or v["latency_ms"]["p50"] <= budget]
    ok = [v for v in fits if floor is None or _y(v, scored) >= floor - 1e-12]
    if ok:
        if goal == "speed":
            best = min(ok, key=lambda v: (v["latency_ms"]["p50"], -_y(v, scored)))
            what = "the fastest variant" + (f" above {floor:.4g}" if floor is not None else "")
            what += f" within the {budget:g} ms budget" if budget is not None else ""
        else:
            best = max(ok, key=lambda v: (_y(v, scored), -v["latency_ms"]["p50"]))
            what = ("the most faithful variant within " + (f"the {budget:g} ms budget" if budget is not None else "no budget")
                    + (f" and above {floor:.4g}" if floor is not None else ""))
        return best, (f"{best['name']} ({best['settings']}) is {what}: p50 {best['latency_ms']['p50']:.3f} ms, "
                      f"{'score' if scored else 'fidelity'} {_y(best, scored):.4f}")
    if not timed:
        return None, "no trial finished with a timed model"
    fastest = min(timed, key=lambda v: v["latency_ms"]["p50"])
    if not fits:
        return None, (f"no model met the {budget:g} ms budget: the fastest was {fastest['name']} "
                      f"({fastest['settings']}) at {fastest['latency_ms']['p50']:.3f} ms")
    best = max(fits, key=lambda v: _y(v, scored))
    return None, (f"no model within the budget reached {floor:.4g}: the best was {best['name']} "
                  f"({best['settings']}) at {_y(best, scored):.4f}")


def run_search(s: SearchSettings, on_stage: Callable[[str], None] = lambda m: None,
               on_trial: Callable[[int], None] = lambda n: None) -> SearchSummary:
    """Run (or resume) the search and write OUTDIR's summary; returns the summary (search.json's content)."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    s.check()
    outdir = Path(s.outdir).resolve()
    state = outdir / "ray" / EXPERIMENT
    if state.exists() and not s.resume:
        raise UsageError(f"-o {s.outdir} holds an earlier search: pass --resume to continue it, or choose another folder")
    if s.resume and not state.exists():
        raise UsageError(f"--resume: -o {s.outdir} holds no search to continue")
    profile = load_profile(s.device)
    on_stage("loading the model")
    loaded = load_run_model(s.model, s.weights)
    with staged_data(outdir) as stage:
        inputs = model_inputs(loaded, s.input_shapes)
        calib = stage.read(s.calib, inputs, s.data, max_samples=s.max_calib)
        eval_spec = stage.read(s.eval_spec, inputs, s.data, labels=True)
        prepare_inputs(loaded, s.input_shapes, calib, max_samples=s.max_calib)  # bad inputs fail here, not in trial 1
        claim_folder(outdir, OWNED)
        calib, eval_spec = stage.keep(calib), stage.keep(eval_spec)
    space = space_for(loaded.module if loaded.kind != "onnx" else None, profile, s.prune_max, s.quants)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    job = {**s.model_dump(exclude={"data"}), "calib": calib, "eval_spec": eval_spec, "outdir": str(outdir),
           "tolerance": s.tolerance(), "goal": s.goal(),
           "min_fidelity": None if s.eval_spec else (s.min_fidelity if s.min_fidelity is not None else 1 - s.tolerance())}
    t0 = time.monotonic()

    def make_tuner() -> Any:
        trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": 1})
        if s.resume:
            return tune.Tuner.restore(str(state), trainable=trainable, resume_unfinished=True, resume_errored=False)
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=min(4, s.trials))
        alg = OptunaSearch(sampler=sampler, metric=TRIAL_METRIC, mode="max", points_to_evaluate=[space.start()])
        return tune.Tuner(
            trainable, param_space=space.ray(),
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(alg, max_concurrent=s.concurrency),
                                        num_samples=s.trials, max_concurrent_trials=s.concurrency),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(outdir / "ray"), stop=Hopeless(job["min_fidelity"]),
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[TrialProgress(on_trial)]))

    grid, cluster = fit_on_ray(s.address, [profile], outdir / "trials", make_tuner,
                               f"searching: {s.trials} trials on {profile.name}", on_stage)
    trials = collect(grid, normalise, label)
    return summarise(s, profile.name, space.to_json(), trials, cluster, time.monotonic() - t0, outdir, on_stage)


class StagedData:
    """--calib/--eval data that is not an .npz, read for a search or sweep before OUTDIR is claimed (so bad data
    leaves nothing behind), then kept in OUTDIR/data, where every trial reads it (on any node that shares
    OUTDIR); a --resume reads it again into the same bytes."""

    def __init__(self, tmp: Path, outdir: Path) -> None:
        self.tmp, self.data = tmp, outdir / "data"
        self.n = 0

    def read(self, spec: Optional[str], inputs: Any, opts: Any, *, max_samples: Optional[int] = None,
             labels: bool = False) -> Optional[str]:
        """The path trials take: the user's own .npz (or --eval FILE.py:FN) as it is, else what was read (its
        own progress line says so)."""
        self.n += 1
        r = read_option(spec, inputs, opts, self.tmp / str(self.n), labels=labels, max_samples=max_samples)
        return spec if r is None else r.path

    def keep(self, path: Optional[str]) -> Optional[str]:
        """After OUTDIR is claimed: move what was read there (once), and say where `path` now is."""
        if path is None or not Path(path).is_relative_to(self.tmp):
            return path
        if self.tmp.exists():
            if self.data.exists():  # an earlier run of this search or sweep wrote it (its manifest lists it)
                shutil.rmtree(self.data)
            os.replace(self.tmp, self.data)
        return str(self.data / Path(path).relative_to(self.tmp))


@contextlib.contextmanager
def staged_data(outdir: Path) -> Iterator[StagedData]:
    outdir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edge-data-", dir=outdir.parent, ignore_cleanup_errors=True) as tmp:
        yield StagedData(Path(tmp), outdir)


def collect(grid: Any, normalise: Callable[[dict[str, Any]], dict[str, Any]],
            label: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """One plain record per trial: done, stopped early (hopeless), or crashed with its error's first line."""
    out = []
    for r in grid:
        cfg = normalise(r.config or {})
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path).name
        rec: dict[str, Any] = {"id": trial_id, "config": cfg, "label": label(cfg), "fidelity": m.get("fidelity"),
                               "p50_ms": m.get("p50_ms"), "speedup": m.get("speedup"), "score": m.get("score"),
                               "seconds": m.get("seconds"), "report": m.get("report"),
                               "profiled_on": m.get("profiled_on")}
        if r.error is not None:
            rec["status"], rec["error"] = "crashed", _error_line(r.error)
        elif m.get("stage") == "done" and rec["report"] and Path(rec["report"]).exists():
            rec["status"] = "done"
        else:
            rec["status"] = "stopped early"
            rec["why"] = (f"the pruned model's fidelity {m['fidelity']:.4f} was already below the floor"
                          if m.get("fidelity") is not None else "stopped before it finished")
        out.append(rec)
    return sorted(out, key=lambda t: t["id"])


def _error_line(e: BaseException) -> str:
    """The trial's own exception in one line, not Ray's wrapper (whose first line names the actor and its pid)."""
    cause = e
    for _ in range(5):  # RayTaskError / TuneError chains
        nxt = getattr(cause, "cause", None) or cause.__cause__
        if nxt is None or nxt is cause:
            break
        cause = nxt
    text = first_line(cause)
    return text if isinstance(cause, EdgeError) else f"{type(cause).__name__}: {text}"


def summarise(s: SearchSettings, device: str, space: dict[str, Any], trials: list[dict[str, Any]],
              cluster: dict[str, Any], seconds: float, outdir: Path,
              on_stage: Callable[[str], None] = lambda m: None) -> SearchSummary:
    on_stage("writing the summary")
    cands = candidates(trials)
    scored = bool(s.eval_spec)
    floor = None
    if scored:
        base = next((v.get("accuracy") for v in cands if v["name"] == "fp32"), None)
        floor = None if base is None else base - s.tolerance()
    else:
        floor = 1.0 - s.tolerance()
    best, reason = recommend(cands, s.latency_budget_ms, floor, scored, s.goal())
    pts = [Point(v["name"], v["latency_ms"]["p50"], _y(v, scored), v) for v in cands
           if v.get("latency_ms") and _y(v, scored) is not None]
    front = [p.name for p in pareto_front(pts)]
    summary = {
        "schema": SEARCH_SCHEMA, "model": s.model, "device": device, "command": s.command,
        "latency_budget_ms": s.latency_budget_ms, "floor": floor,
        "floor_on": f"--eval {s.eval_spec}" if scored else "fidelity to fp32 (top-1 agreement, else worst cosine)",
        "seed": s.seed, "trials_requested": s.trials, "space": space, "ray": cluster, "seconds": round(seconds, 1),
        "objective": s.goal(),
        "algorithm": "Optuna TPE (seeded) via Ray Tune OptunaSearch; first trial = compress run defaults; "
                     "trials stopped when the pruned model is already below the floor",
        "trials": trials,
        "candidates": [{"name": v["name"], "trial": v["trial"], "settings": v["settings"], "variant": v["variant"],
                        "p50_ms": v["latency_ms"]["p50"] if v.get("latency_ms") else None,
                        "speedup_vs_fp32": v.get("speedup_vs_fp32"), "size_bytes": v.get("size_bytes"),
                        "fidelity": v.get("fidelity"), "accuracy": v.get("accuracy"),
                        "pareto": v["name"] in front} for v in cands],
        "pareto": front,
        "recommended": best["name"] if best else None,
        "recommended_settings": best["settings"] if best else None,
        "reason": reason,
    }
    if best is not None:
        _install_best(Path(best["report"]).parent, outdir / "best")
        summary["best_report"] = str(outdir / "best" / "report.json")
        summary["best_onnx"] = str(outdir / "best" / f"{best['variant']}.onnx")
    result = SearchSummary.from_json(summary)  # checked before it is written
    write_json(outdir / "search.json", result.to_json())
    write_search_readable(summary, cands, outdir, scored)
    return result


def _install_best(src: Path, dst: Path) -> None:
    """best/ = a copy of the recommended trial's run folder, swapped in whole."""
    tmp = partial_dir(dst.parent, dst.name)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    try:
        swap_in(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
