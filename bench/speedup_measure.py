"""How the speedup a run recommends on depends on how it is timed: one run per model per interleaved round (what
`compress run` did until it timed warm bursts of about 2 ms, runtime.abtest.WARM_BURST_MS) against bursts of runs
per model (the first after each switch not counted).
Worker threads do not spin by default, as the host profile sets it when the pool takes every core; `--spinning`
turns it on (one setting per process: a spinning pool left idle would steal the cores of the other). Reads the variants of a `compress run` output folder (fp32.onnx and the others beside it).

    .venv/bin/python bench/speedup_measure.py demo-out/run [--threads 2] [--burst 5] [--seconds 8] [--spinning]
        [--pipeline 3]

`--pipeline N` then times the folder N more times as `compress run` does (runtime.interleaved_latency with the
host profile's threads and session options, 30 rounds, at least 3 s), one run per model per round against warm
bursts of runtime.abtest.WARM_BURST_MS, the two ways alternating: the figure the pipeline's recommendation rests on.

A model run over and over, as a deployed one is, keeps its weights in cache; one run at a time between other
models starts cold each time, which costs a small model a larger share of its time than a big one.
Prints the CPU it ran on; medians of wall-clock per run, all settings interleaved within each round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from devices import load_profile
from devices.host import describe_host
from runtime import WARM_BURST_MS, interleaved_latency


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a compress run output folder holding fp32.onnx and its variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--burst", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--spinning", action="store_true")
    ap.add_argument("--pipeline", type=int, default=0, metavar="N", help="then N pairs timed as compress run does")
    args = ap.parse_args()
    paths = sorted(args.run.glob("*.onnx"), key=lambda p: (p.stem != "fp32", p.stem))
    if not paths or paths[0].stem != "fp32":
        print(f"{args.run}: no fp32.onnx there", file=sys.stderr)
        return 2
    sessions = {}
    spins = ("1",) if args.spinning else ("0",)
    for spin in spins:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        for p in paths:
            sessions[(p.stem, spin)] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    first = sessions[("fp32", spins[0])].get_inputs()
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32) for i in first}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feeds)
    modes = [(b, spin) for b in (1, args.burst) for spin in spins]
    times: dict[tuple, list[float]] = {(m, k): [] for m in modes for k in sessions if k[1] == m[1]}
    end, r = time.perf_counter() + args.seconds, 0
    while time.perf_counter() < end:
        for burst, spin in modes:
            names = [p.stem for p in paths]
            for name in names if r % 2 == 0 else names[::-1]:
                s = sessions[(name, spin)]
                for k in range(burst):
                    t0 = time.perf_counter()
                    s.run(None, feeds)
                    if burst == 1 or k > 0:
                        times[((burst, spin), (name, spin))].append(time.perf_counter() - t0)
        r += 1
    print(f"CPU: {describe_host().get('cpu', '?')}; {args.threads} threads; {r} rounds in {args.seconds:.0f} s")
    print(f"{'timing':<34}" + "".join(f"{p.stem:>22}" for p in paths))
    for burst, spin in modes:
        med = {p.stem: float(np.median(times[((burst, spin), (p.stem, spin))])) * 1e3 for p in paths}
        label = f"{'one run' if burst == 1 else f'bursts of {burst}'}, spinning {'on' if spin == '1' else 'off'}"
        print(f"{label:<34}" + "".join(f"{med[n]:>10.3f} ms {med['fp32'] / med[n]:>5.2f}x " for n in med))
    if args.pipeline:
        prof = load_profile("host")
        print(f"as compress run times them (host profile: {prof.threads} threads, {dict(prof.session_config)}); "
              "wall-clock medians")
        models = {p.stem: str(p) for p in paths}
        for rep in range(args.pipeline):
            for burst in (0.0, WARM_BURST_MS):
                ab = interleaved_latency(models, feeds=feeds, threads=prof.threads, rounds=30, min_seconds=3.0,
                                         session_config=dict(prof.session_config), baseline="fp32", burst_ms=burst)
                label = f"{rep + 1}: {'one run per round' if not burst else f'warm bursts of {burst:g} ms'}"
                print(f"{label:<34}" + "".join(f"{ab.wall_ms[n]:>10.3f} ms {ab.speedup(n, 'wall'):>5.2f}x "
                                               for n in models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
