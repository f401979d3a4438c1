"""bf16 autocast vs fp32 training: tuned AP of prompt tuning and fine-tuning on one task, paired by seed.

    python benchmarks/bf16_tuning.py [--task icons-aquarium --shots 10 --seeds 0 1 2 --threads 2]
    python benchmarks/bf16_tuning.py --strategies finetune --steps 100 --seeds 0     # a shorter check

Each (strategy, seed) trains twice, in float32 and with bf16 autocast (fp32 master weights), on the same
few-shot subset, data order and schedule (adapt.tune defaults unless --steps); evaluation is float32 either
way, so the difference is the training's. Prints one row per run, then per strategy the mean AP of each
dtype, the seed-to-seed spread (sample std of the fp32 runs) and the mean paired difference, and writes
the rows as JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from adapt import STRATEGY_NAMES


def run(strategy: str, seed: int, dtype: str, args) -> dict:
    from adapt.tune import TuneConfig, tune

    report = tune(TuneConfig(strategy=strategy, task=args.task, base=args.base, shots=args.shots, seed=seed,
                             steps=args.steps, dtype=dtype, zero_shot=False, progress=False,
                             eval_limit=args.eval_limit))
    return {"strategy": strategy, "seed": seed, "dtype": dtype, "AP": round(report.tuned.AP, 2),
            "AP50": round(report.tuned.AP50, 2), "train_s": report.timings.train_s,
            "step_s": report.timings.step_s, "steps": report.timings.steps}


def summary(rows: list[dict], strategy: str) -> str:
    by = {(r["seed"], r["dtype"]): r["AP"] for r in rows if r["strategy"] == strategy}
    seeds = sorted({seed for seed, _ in by})
    fp32 = [by[(s, "float32")] for s in seeds if (s, "float32") in by]
    bf16 = [by[(s, "bfloat16")] for s in seeds if (s, "bfloat16") in by]
    pairs = [by[(s, "bfloat16")] - by[(s, "float32")] for s in seeds if (s, "bfloat16") in by and (s, "float32") in by]
    spread = f"{statistics.stdev(fp32):.2f}" if len(fp32) > 1 else "n/a (one seed)"
    return (f"{strategy:<12} fp32 AP {statistics.mean(fp32):.2f}  bf16 AP {statistics.mean(bf16):.2f}  "
            f"paired bf16-fp32 {statistics.mean(pairs):+.2f} over {len(pairs)} seed(s)  fp32 seed std {spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="glip-nano")
    parser.add_argument("--task", default="icons-aquarium")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="*", default=["prompt-tune", "finetune"], choices=STRATEGY_NAMES)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: adapt.tune's by shots)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for strategy in args.strategies:
        for seed in args.seeds:
            for dtype in ("float32", "bfloat16"):
                row = run(strategy, seed, dtype, args)
                rows.append(row)
                print(f"{strategy:<12} seed {seed} {dtype:<8}: AP {row['AP']:5.2f}  AP50 {row['AP50']:5.2f}  "
                      f"{row['steps']} steps in {row['train_s']:.0f} s ({row['step_s']:.3f} s/step)", flush=True)
                if args.out:
                    args.out.write_text(json.dumps(rows, indent=1))
    for strategy in args.strategies:
        print(summary(rows, strategy))


if __name__ == "__main__":
    main()
