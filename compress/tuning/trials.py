"""Ray for `compress search` and `compress sweep`: the cluster (embedded or --address), the device resources
that serialise profiling, and the trial that runs one `compress run` configuration.

Why a device is a Ray resource: two models timed at once on the same cores slow each other down, so every
profiling call asks Ray for one unit of a resource named after the device profile (`rpi4-cortex-a72`), of which
there is one. Locally the embedded Ray advertises it; on a cluster, the Ray worker on (or attached to) the board
advertises it (`ray start --address=HEAD --resources='{"rpi4-cortex-a72": 1}'`), so profiling runs there while
the compression work of other trials runs anywhere. A profile with `remote:` (the SSH runner) needs no such
node: its profiling goes through one actor per device, which takes one call at a time.

The trial runs compress.pipeline.run.run_pipeline in its own folder under OUTDIR/trials (a shared filesystem on a
cluster), with the pipeline's `timer` pointed at the device's resource and its `on_result` reporting the pruned
model's fidelity to Ray Tune as soon as it is known: pruning is the first lossy step and quantization only
loses more, so a trial already below --min-fidelity there is stopped before it is quantized and profiled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ray
from ray import tune

from compress.core import EdgeError, UsageError, first_line, interrupt
from compress.evaluate import judged, load_metric
from compress.models import load_run_model, prepare_inputs
from compress.pipeline import RunOptions, StageCache, Timings, run_pipeline, time_variants
from compress.pruning import PruneOptions
from compress.tuning.space import label, normalise, trial_seed
from devices import DeviceProfile, describe_host, load_profile

TRIAL_METRIC = "score"


def start_ray(address: Optional[str], devices: list[DeviceProfile], cpus: Optional[int] = None) -> dict[str, Any]:
    """Connect to --address, or start an embedded Ray for this command with one unit of each device's resource.

    Returns what was started (for the report). A cluster must already advertise every device resource, or the
    profile must reach its device over SSH: otherwise profiling calls would wait forever, so this refuses."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the old reporter honours verbose=0; the new one prints tables
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard/CSV writers per trial
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        ray.shutdown()
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # a crashed trial is reported by us, in one line
        for name in ("ray", "ray.tune", "ray.train", "ray.air", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True,
                              "logging_level": logging.ERROR}
    if address:
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        with tempfile.TemporaryFile() as said, (contextlib.nullcontext() if debug else _fd2_to(said)):
            try:
                _init(address=address, **kwargs)
                err = None
            except Exception as e:  # ConnectionError, ValueError for a malformed address, RuntimeError ...
                err = e
            said.seek(0)
            core_log = said.read().decode(errors="replace")
        if err is not None:
            if "InvalidAuthToken" in core_log:
                raise EdgeError(f"--address {address}: the Ray cluster refused this client's token: run with the "
                                "cluster's token (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or its ~/.ray/auth_token)") from err
            raise EdgeError(f"--address {address}: cannot connect to the Ray cluster: {first_line(err)}") from err
        have = ray.cluster_resources()
        missing = [d.name for d in devices if have.get(d.name, 0) < 1 and d.remote is None]
        if missing:
            ray.shutdown()
            raise UsageError(f"no node of the Ray cluster at {address} advertises the device resource "
                             f"{', '.join(repr(m) for m in missing)}: start a Ray worker on (or attached to) that device "
                             f"with --resources='{{\"{missing[0]}\": 1}}', or give the profile a remote: section")
        return {"address": address, "embedded": False, "cluster_cpus": have.get("CPU", 0)}
    tmp = Path(tempfile.gettempdir()) / "edge-compress-ray"
    tmp.mkdir(exist_ok=True)
    _init(num_cpus=cpus or os.cpu_count() or 1, resources={d.name: 1 for d in devices}, _temp_dir=str(tmp), **kwargs)
    return {"address": None, "embedded": True, "cluster_cpus": ray.cluster_resources().get("CPU", 0)}


def _init(**kwargs: Any) -> None:
    """ray.init, then our signal handlers back: Ray's core installs its own SIGTERM handler in the driver, which
    dumps a stack trace on stderr (16 lines, measured) where the command should stop like Ctrl-C (issue 16)."""
    ray.init(**kwargs)
    interrupt.install()


@contextlib.contextmanager
def _fd2_to(f: Any) -> Iterator[None]:
    """Ray's C++ core logs each failed connection attempt (one line a second for ~20 s) straight to file
    descriptor 2; while connecting, that goes to `f`, which start_ray reads for the reason instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def fit_on_ray(address: Optional[str], devices: list[DeviceProfile], trials_dir: Path, make_tuner: Callable[[], Any],
               what: str, on_stage: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Start Ray (embedded, or the cluster at `address`), build the Tune experiment and run it: (its results,
    the cluster's description). Whatever ends it (done, an error, a signal), Ray's workers are stopped first and
    then the work folders of trials they left mid-run in `trials_dir` are removed; finished trials stay."""
    on_stage("starting Ray" + (f" (cluster {address})" if address else " (embedded, for this command)"))
    cluster = start_ray(address, devices)
    try:
        tuner = make_tuner()
        on_stage(what)
        return tuner.fit(), cluster
    finally:
        stop_ray()
        clean_partials(trials_dir)


def clean_partials(trials: Path) -> None:
    """A trial stopped early is ended mid-pipeline: its unfinished work folder is removed here."""
    if trials.exists():
        for p in trials.glob(".*.partial-*"):
            shutil.rmtree(p, ignore_errors=True)


def _read_models(paths: dict[str, Path]) -> dict[str, dict[str, bytes]]:
    """The files of each model (its .onnx and any external-data file beside it), as bytes for the object store."""
    out: dict[str, dict[str, bytes]] = {}
    for name, p in paths.items():
        files = {p.name: p.read_bytes()}
        data = p.parent / (p.name + ".data")
        if data.exists():
            files[data.name] = data.read_bytes()
        out[name] = files
    return out


def _time_shipped(models: dict[str, dict[str, bytes]], profile: DeviceProfile, feeds: dict[str, Any],
                  runs: Optional[int], max_seconds: Optional[float], ab_rounds: int, tune_threads: bool) -> Timings:
    """compress.pipeline.time_variants on the node holding the device: the models arrive as bytes."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-profile-") as tmp:
        paths = {}
        for name, files in models.items():
            folder = Path(tmp) / name
            folder.mkdir()
            for fname, data in files.items():
                (folder / fname).write_bytes(data)
            paths[name] = folder / next(f for f in files if not f.endswith(".data"))
        timed = time_variants(paths, profile, feeds, runs, max_seconds, ab_rounds, tune_threads)
    # the machine whose cores were timed, which on a cluster is not the trial's: the report describes that one
    # (a remote device describes itself)
    if timed.host is None:
        timed.host = describe_host()
    timed.profiled_on = {"ray_node": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    return timed


def device_timer(profile: DeviceProfile) -> Callable[..., Timings]:
    """A `timer` for RunOptions that profiles on the device's node, one call at a time per device."""
    def timer(paths: dict[str, Path], prof: DeviceProfile, feeds: dict[str, Any], runs: Optional[int],
              max_seconds: Optional[float], ab_rounds: int, tune_threads: bool = True) -> Timings:
        models = _read_models(paths)
        if ray.cluster_resources().get(prof.name, 0) >= 1:
            task = ray.remote(num_cpus=0)(_time_shipped).options(resources={prof.name: 1}, scheduling_strategy="DEFAULT",
                                                                name=f"profile on {prof.name}")
            return ray.get(task.remote(models, prof, feeds, runs, max_seconds, ab_rounds, tune_threads))
        actor = _ssh_profiler(prof.name)  # a remote: profile on a cluster without the device's resource
        return ray.get(actor.run.remote(models, prof, feeds, runs, max_seconds, ab_rounds, tune_threads))

    return timer


def _ssh_profiler(name: str) -> Any:
    @ray.remote(num_cpus=0, max_concurrency=1)
    class SshProfiler:
        def run(self, *args: Any) -> Timings:
            return _time_shipped(*args)

    return SshProfiler.options(name=f"edge-compress-profiler:{name}", get_if_exists=True, lifetime="detached",
                               scheduling_strategy="DEFAULT").remote()


def fidelity_value(fid: dict[str, Any]) -> Optional[float]:
    """The one fidelity number the search ranks by, higher is better: 1 - what the tolerance bounds
    (compress.evaluate.judged: matched-box F1 for detectors, top-1 agreement for classifiers, else the worst
    cosine)."""
    if fid.get("cosine_min") is None and fid.get("top1_agreement") is None:
        return None
    return 1.0 - judged(fid)[1]


def run_trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One configuration through compress run's pipeline, in a Ray Tune trial. `job` is plain data (the search's
    settings); nothing here holds state between trials, so a trial can run on any node."""
    import torch

    c = normalise(config)
    cell = c.get("cell") or {}
    model_spec, device = cell.get("model", job.get("model")), cell.get("device", job.get("device"))
    trial_id = tune.get_context().get_trial_id()
    outdir = Path(job["outdir"]) / job.get("trials_dir", "trials") / trial_id
    torch.manual_seed(trial_seed(c, job.get("seed", 0)))
    t0 = time.monotonic()
    profile = load_profile(device)
    loaded = load_run_model(model_spec, cell.get("weights", job.get("weights")))
    calib = cell.get("calib", job.get("calib"))
    prep = prepare_inputs(loaded, cell.get("input_shapes", job.get("input_shapes") or ()), calib,
                          max_samples=job.get("max_calib"))
    tolerance = float(cell.get("tolerance", job["tolerance"]))
    if cell:
        c = {k: v for k, v in c.items() if k != "cell"}
    floor = job.get("min_fidelity")

    def on_result(stage: str, result: Any) -> None:
        if stage == "prune" and floor is not None:
            f = fidelity_value(result.fidelity.to_json())
            if f is not None:  # provisional: below every finished trial's score, ordered by fidelity
                tune.report({"stage": "pruned", "fidelity": f, TRIAL_METRIC: f - 3.0, "p50_ms": None})

    ratio = c["prune"] if c.get("prune") else None
    prune = None
    if ratio:
        prune = PruneOptions(ratio=ratio, importance=c.get("importance", "l2"), recover=True,
                             round_to=profile.pruning.channel_multiple, real_data=calib is not None,
                             recover_seconds=job.get("recover_seconds", PruneOptions.default("recover_seconds")))
    fallback = float(c.get("fallback", 1.0))
    opts = RunOptions(prune=prune, quant=c.get("quant", "none"), calib=calib, max_calib=job.get("max_calib"),
                      tolerance=tolerance, runs=job.get("runs"), source=model_spec,
                      evaluate=load_metric(job.get("eval_spec"), job.get("metric_spec")), cache=StageCache(),
                      quant_method=c.get("method", "minmax"), quant_fallback=fallback > 0,
                      quant_tolerance=fallback * tolerance if fallback > 0 else None,
                      timer=device_timer(profile), on_result=on_result, ab_rounds=job.get("ab_rounds", 30),
                      command=f"compress search trial {trial_id}: {label(c)}",
                      backoff=False)  # the grid or the search tries the unpruned model as a point of its own
    report = run_pipeline(Path(model_spec) if loaded.kind == "onnx" else loaded.module, prep, profile, outdir, opts,
                          extra={"calibration": prep.info, "search_config": c})
    final = report.variants[-1]
    f = final.accuracy if opts.evaluate is not None else fidelity_value(final.fidelity.to_json())
    if opts.evaluate is not None and f is not None:
        f = float(f) - float(report.variants[0].accuracy)  # the score's change: 0 is no loss
    p50 = final.latency_ms.p50 if final.latency_ms else None
    tune.report({"stage": "done", "fidelity": f, "p50_ms": p50, "speedup": final.speedup_vs_fp32,
                 "profiled_on": (report.profiled_on or {}).get("ray_node"),
                 TRIAL_METRIC: objective(f, final.speedup_vs_fp32, p50, job.get("latency_budget_ms"),
                                         -tolerance if opts.evaluate is not None else floor, job.get("goal", "fidelity")),
                 "report": str(outdir / "report.json"),
                 "seconds": round(time.monotonic() - t0, 1)})


def run_cell(config: dict[str, Any], job: dict[str, Any]) -> None:
    """A `compress sweep` cell: a trial whose settings come whole from the grid (config["cfg"])."""
    run_trial(config["cfg"], job)


def objective(fid: Optional[float], speedup: Optional[float], p50: Optional[float], budget: Optional[float],
              floor: Optional[float], goal: str) -> float:
    """What the search maximises, one number per trial (its final model):
    goal "fidelity": the fidelity (or the --eval score's change) within the latency budget; over it, a penalty
    growing with the excess that keeps every over-budget trial below every trial within it;
    goal "speed": the speedup over fp32 above the floor (and within any budget); below it, negative, ordered by
    fidelity."""
    if fid is None:
        return -10.0
    over = 0.0 if budget is None or p50 is None or p50 <= budget else min(1.0, p50 / budget - 1.0)
    if goal == "speed":
        if floor is not None and fid < floor:
            return -1.0 - (floor - fid)
        return (speedup or 0.0) - (2.0 + 10.0 * over if over else 0.0)
    return fid if not over else fid - 1.0 - over


class Hopeless(tune.Stopper):
    """A trial whose pruned model is already below --min-fidelity is stopped there."""

    def __init__(self, floor: Optional[float]) -> None:
        self.floor = floor

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return (self.floor is not None and result.get("stage") == "pruned"
                and result.get("fidelity") is not None and result["fidelity"] < self.floor)

    def stop_all(self) -> bool:
        return False


class TrialProgress(tune.Callback):
    """Counts finished trials (done, stopped or crashed) for the command's progress bar."""

    def __init__(self, on_done: Callable[[int], None]) -> None:
        self.done = 0
        self.on_done = on_done

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config; the progress bar stays here
        return {"done": self.done}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.done, self.on_done = state["done"], lambda n: None

    def _tick(self) -> None:
        self.done += 1
        self.on_done(self.done)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._tick()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._tick()
