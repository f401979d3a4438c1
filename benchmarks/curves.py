"""Strategy curves: the paper's AP-against-shots comparison on the icon suite, as presets of `adapt sweep`.

    python benchmarks/curves.py --preset quick --out benchmarks/results/curves-quick
    python benchmarks/curves.py --preset full --executor ray --trial-resources cpu=1 --dtype bfloat16 \
        --out benchmarks/results/curves-full

Each preset is a fixed grid and schedule; the sweep writes results.csv, table.md, curves.png and retention.png into
--out and resumes a cut run from the cells already there.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from adapt.sweep import SweepConfig, run_sweep

# Schedules sized for a 2-core CPU: quick runs in about half an hour with 2 threads; full is 610 runs, sized for
# two 1-thread trials at a time. Batch 4; the lr per strategy is the strategy's declared default.
ICON_TASKS = ("icons-aquarium", "icons-vehicles", "icons-thermal", "icons-aerial", "icons-described")
PRESETS = {
    "quick": dict(base=("glip-nano", "glip-nano-a"), task=("icons-aquarium", "icons-described"),
                  shots=("0", "1", "10"), seeds=(0,), steps="1:60,10:120", eval_limit=100, validate=True),
    "full": dict(base=("glip-nano", "glip-nano-a"), task=ICON_TASKS, shots=("0", "1", "3", "5", "10", "full"),
                 seeds=(0, 1, 2), steps="1:20,3:30,5:40,10:50,full:60", eval_limit=50, validate=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--trial-resources", default="cpu=1", help="per trial, e.g. cpu=1 or cpu=1,gpu=0.5")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--retention-limit", type=int, default=50, help="held-in test images scored per run")
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run_sweep(SweepConfig(**PRESETS[args.preset], out=args.out, executor=args.executor,
                                 trial_resources=args.trial_resources, address=args.address, dtype=args.dtype,
                                 device=args.device, retention_limit=args.retention_limit, data_root=args.data_root))
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows)} runs ({failed} failed) in {time.perf_counter() - started:.0f} s; table in {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
