"""What the Ray executor costs per trial: the same small grid run in-process and as Ray Tune trials.

    python benchmarks/sweep_overhead.py --cells 6 --out runs/sweep-overhead

Runs the grid three times into fresh folders: local (one cell after another, 2 threads), ray with one trial at a
time (cpu=2: the same concurrency as local, so the difference is Ray's start-up, scheduling and process cost), and
ray with two 1-thread trials at a time. Prints wall times and the overhead per trial.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from adapt.sweep import SweepConfig, run_sweep


def timed(config: SweepConfig) -> tuple[float, list[dict]]:
    shutil.rmtree(config.out, ignore_errors=True)
    started = time.perf_counter()
    rows = run_sweep(config, log=lambda *_: None)
    return time.perf_counter() - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=6, help="tuned cells (seeds of 1-shot prompt tuning)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep-overhead"))
    args = parser.parse_args()
    grid = dict(task=("icons-aquarium",), base=("glip-nano",), strategies=("prompt-tune",), shots=("1",),
                seeds=tuple(range(args.cells)), steps="20", eval_limit=20, retention_limit=10)
    # Warm the icon data and the base's retention once, so no run pays for generating them.
    run_sweep(SweepConfig(**{**grid, "seeds": (0,)}, out=args.out / "warm", trial_resources="cpu=2"),
              log=lambda *_: None)
    runs = {"local, 2 threads": SweepConfig(**grid, out=args.out / "local", trial_resources="cpu=2"),
            "ray, 1 trial x 2 CPUs": SweepConfig(**grid, out=args.out / "ray2", executor="ray", trial_resources="cpu=2"),
            "ray, 2 trials x 1 CPU": SweepConfig(**grid, out=args.out / "ray1", executor="ray", trial_resources="cpu=1")}
    cells = args.cells + 1  # + the zero-shot reference cell
    walls = {}
    for name, config in runs.items():
        walls[name], rows = timed(config)
        aps = [r["AP"] for r in rows]
        print(f"{name:<24} {cells} cells in {walls[name]:7.1f} s ({walls[name] / cells:5.1f} s per cell); AP {aps}",
              flush=True)
    overhead = (walls["ray, 1 trial x 2 CPUs"] - walls["local, 2 threads"]) / cells
    print(f"ray overhead per trial at the same concurrency: {overhead:+.1f} s")


if __name__ == "__main__":
    main()
