"""Frozen-feature caching, measured both ways: training time and tuned AP with the cache on and off.

    python benchmarks/cache_effect.py [--task icons-aquarium --shots 10 --steps 100 --threads 2]

Same task, few-shot subset, seed, steps and learning rate each way; augmentation off, so the cache must not
change the result (tests/test_adapt.py checks the tuned P0 matches), only the time. Prints one row per
(strategy, cache) and writes them as JSON with --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapt import STRATEGY_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="glip-nano")
    parser.add_argument("--task", default="icons-aquarium")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--strategies", nargs="*", default=[s for s in STRATEGY_NAMES if s != "finetune"],
                        help="strategies with a frozen backbone (the ones the cache serves)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from adapt.tune import TuneConfig, tune

    torch.set_num_threads(args.threads)
    rows = []
    for strategy in args.strategies:
        for cached in (True, False):
            report = tune(TuneConfig(strategy=strategy, task=args.task, base=args.base, shots=args.shots, seed=0,
                                     steps=args.steps, cache_features=cached, validate=False, zero_shot=False,
                                     eval_limit=args.eval_limit, progress=False))
            timings = report.timings
            row = {"strategy": strategy, "cache": cached, "train_s": timings.train_s, "step_s": timings.step_s,
                   "AP": round(report.tuned.AP, 3), "AP50": round(report.tuned.AP50, 3),
                   "train_images": report.train_images, "feature_cache": timings.feature_cache}
            rows.append(row)
            print(f"{args.base} {strategy:<13} cache {'on ' if cached else 'off'}: train {row['train_s']:7.1f} s "
                  f"({row['step_s']:.3f} s/step, {args.steps} steps, {row['train_images']} images)  "
                  f"AP {row['AP']:.2f}  AP50 {row['AP50']:.2f}", flush=True)
        on, off = rows[-2], rows[-1]
        print(f"  {strategy}: cache speed-up {off['train_s'] / on['train_s']:.2f}x, AP {on['AP']:.2f} vs "
              f"{off['AP']:.2f} (difference {on['AP'] - off['AP']:+.3f})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
