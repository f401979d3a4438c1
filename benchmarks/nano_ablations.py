"""Short pretraining ablations for glip-nano v2 (issue #12): same budget, same 100 held-in validation images.

    python benchmarks/nano_ablations.py --variant cosine --steps 600 --threads 1   # one row
    python benchmarks/nano_ablations.py --table                                    # the table of all rows

Each run pretrains glip-nano from scratch with bf16 autocast, seed 0, for --steps steps (200 warm-up, cosine
decay), then scores the first 100 icons-heldin validation images with per-image 16-name prompts: AP50, the
hit rate (boxes found at IoU >= 0.5 under any name), the top-1 naming rate (the right name ranks first among
the 16 for a hit box) and the name-blind floor of the same images (28.8: perfect boxes, random names).
A row is written to benchmarks/results/nano_ablations/<variant>-<steps>.json when its run ends.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "nano_ablations"


def variants() -> dict[str, tuple[str, dict, dict]]:
    """name -> (what changes, model-config changes, pretraining-config changes)."""
    cosine = {"head.score": "cosine"}
    textls = {"fusion.text_layer_scale": 0.1}
    both = {**cosine, **textls}
    return {
        "glip": ("GLIP's head and text path (the released glip-nano recipe)", {}, {}),
        "cosine": ("cosine score, learnable temperature (starts at 10), projection bias 0", cosine, {}),
        "textls": ("layer-scale 0.1 on the text side of fusion and of the DyHead's BERT layers", textls, {}),
        "cosine+textls": ("both", both, {}),
        "cosine+textls+clip5": ("both, gradient clipping 5 instead of 1", both, {"grad_clip": 5.0}),
        "textls+clip5": ("text layer-scale 0.1, gradient clipping 5 (GLIP's dot-product score)", textls,
                         {"grad_clip": 5.0}),
        "glip-fp32": ("GLIP's head and text path, float32 (the released recipe exactly)", {}, {"dtype": "float32"}),
        "cosine+textls+k12": ("both, 12 names per detection prompt instead of 16", both, {"prompt_names": 12}),
        "cosine+textls+lr1e-3": ("both, learning rate 1e-3 instead of 6e-4", both, {"lr": 1e-3}),
        "cosine+textls+ground0.1": ("both, 10 % grounding captions instead of 30 %", both,
                                    {"grounding_fraction": 0.1}),
    }


def model_config(changes: dict):
    from backbone.config import get_preset

    config = get_preset("glip-nano")
    # Every variant starts from GLIP's own head and text path (the released glip-nano), whatever the preset says.
    changes = {"head.score": "dot", "fusion.text_layer_scale": None, **changes}
    for dotted, value in changes.items():
        part, name = dotted.split(".")
        config = config.replace(**{part: dataclasses.replace(getattr(config, part), **{name: value})})
    return config


def run(variant: str, steps: int, threads: int, keep: bool, eval_every: int | None = None) -> dict:
    from adapt.pretrain import PretrainConfig, pretrain

    what, model_changes, config_changes = variants()[variant]
    out_dir = Path("runs") / "nano-ablations" / f"{variant}-{steps}"
    config_changes = {"dtype": "bfloat16", "grad_clip": 1.0, **config_changes}  # the released recipe's clip
    config = PretrainConfig(preset="glip-nano", model=model_config(model_changes), out_dir=out_dir,
                            steps=steps, eval_every=eval_every or steps, threads=threads, device="cpu",
                            **config_changes)
    started = time.perf_counter()
    summary = pretrain(config)
    log = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    trajectory = {r["step"]: {k: round(r[k], 2) for k in ("AP50", "hit_rate", "naming_rate")}
                  for r in log if r.get("event") == "eval"}
    row = {"variant": variant, "what": what, "steps": steps, "threads": threads, "dtype": config.dtype,
           "grad_clip": config.grad_clip, "wall_s": round(time.perf_counter() - started, 1),
           **summary.last_metrics, "trajectory": trajectory}
    from glip_io import atomic_write

    atomic_write(RESULTS / f"{variant}-{steps}.json", json.dumps(row, indent=1).encode())
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return row


def table() -> str:
    lines = ["| variant | steps | AP50 | hit rate % | named right % | floor AP50 | what |", "|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        row = json.loads(path.read_text())
        lines.append(f"| {row['variant']} | {row['steps']} | {row['AP50']:.1f} | {row['hit_rate']:.1f} | "
                     f"{row['naming_rate']:.1f} | {row.get('name_blind_floor_AP50', float('nan')):.1f} | {row['what']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(variants()))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=None, help="also score at every N steps (trajectory)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (checkpoints)")
    parser.add_argument("--table", action="store_true", help="print the table of the rows measured so far")
    args = parser.parse_args()
    if args.table or not args.variant:
        print(table())
        return
    print(json.dumps(run(args.variant, args.steps, args.threads, args.keep, args.eval_every), indent=1))


if __name__ == "__main__":
    main()
