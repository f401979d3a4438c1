"""Strategy curves: AP vs shots for each strategy, task and base model (the paper's Fig. 4/7, on the icon suite).

    python benchmarks/curves.py --preset quick --out benchmarks/results/curves-quick
    # full: two 1-thread shards in parallel, then merge
    python benchmarks/curves.py --preset full --threads 1 --dtype bfloat16 --shard 0/2 --out runs/curves-full-0 &
    python benchmarks/curves.py --preset full --threads 1 --dtype bfloat16 --shard 1/2 --out runs/curves-full-1
    python benchmarks/curves.py --combine runs/curves-full-0 runs/curves-full-1 --out benchmarks/results/curves-full

Writes results.csv (one row per run), table.md and curves.png into --out; resumable (finished runs in
results.csv are skipped). Shots 0 is the zero-shot base with the task prompt.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

from adapt import STRATEGY_NAMES
from glip_io import atomic_write

# Step counts and evaluation sizes are set so each preset fits its time budget on a 2-core CPU (quick: <= 30 min
# with 2 threads; full: <= 150 min as two 1-thread shards). Batch 4; the LR per strategy is adapt.tune's default.
PRESETS = {
    "quick": {"models": ["glip-nano", "glip-nano-a"], "tasks": ["icons-aquarium", "icons-described"],
              "shots": [0, 1, 10], "seeds": [0], "strategies": list(STRATEGY_NAMES),
              "eval_limit": 100, "steps": {1: 60, 10: 120}, "validate": True},
    "full": {"models": ["glip-nano", "glip-nano-a"],
             "tasks": ["icons-aquarium", "icons-vehicles", "icons-thermal", "icons-aerial", "icons-described"],
             "shots": [0, 1, 3, 5, 10, None], "seeds": [0, 1, 2],
             "strategies": list(STRATEGY_NAMES), "eval_limit": 50,
             "steps": {1: 20, 3: 30, 5: 40, 10: 50, None: 60}, "validate": False},
}
FIELDS = ["model", "task", "strategy", "shots", "seed", "AP", "AP50", "zero_shot_AP", "train_s", "step_s",
          "trainable_parameters", "adapter_bytes"]


def shots_label(shots) -> str:
    return "full" if shots is None else str(shots)


def plan(preset: dict) -> list[tuple]:
    """Every run of a preset as (model, task, strategy, shots, seed); shots 0 is the zero-shot base."""
    jobs = []
    for model in preset["models"]:
        for task in preset["tasks"]:
            for shots in preset["shots"]:
                if shots == 0:
                    jobs.append((model, task, "zero-shot", 0, 0))
                    continue
                for seed in preset["seeds"]:
                    jobs += [(model, task, strategy, shots, seed) for strategy in preset["strategies"]]
    return jobs


def shard_jobs(jobs: list[tuple], preset: dict, count: int) -> list[list[tuple]]:
    """Split jobs into `count` shards of similar estimated cost (a fine-tuning step costs ~4 frozen-core steps;
    an evaluation ~10 steps), greedily, in plan order."""
    shards, loads = [[] for _ in range(count)], [0.0] * count
    for job in jobs:
        strategy, shots = job[2], job[3]
        cost = 10.0 if strategy == "zero-shot" else 10.0 + preset["steps"][shots] * (4.0 if strategy == "finetune" else 1.0)
        lightest = loads.index(min(loads))
        shards[lightest].append(job)
        loads[lightest] += cost
    return shards


def run_all(preset: dict, out: Path, data_root: Path | None, shard: tuple[int, int] = (0, 1), *,
            device: str | None = None, dtype: str = "float32") -> list[dict]:
    """Run this shard's share of the plan (`shard_jobs`: shards of similar estimated cost), appending each
    finished run to out/results.csv; runs already there are skipped. `device`/`dtype` are the training's
    (adapt.tune.TuneConfig); evaluation runs in float32 on `device`."""
    from adapt.evaluation import evaluate
    from adapt.tune import TuneConfig, tune
    from backbone.detector import GLIPDetector
    from backbone.device import resolve_device
    from tasks import get_task

    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    done = {(r["model"], r["task"], r["strategy"], r["shots"], r["seed"]) for r in rows}

    def save(row: dict) -> None:
        rows.append({k: row.get(k, "") for k in FIELDS})
        text = io.StringIO()
        writer = csv.DictWriter(text, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(csv_path, text.getvalue().encode())

    index, count = shard
    for model, task, strategy, shots, seed in shard_jobs(plan(preset), preset, count)[index]:
        if (model, task, strategy, shots_label(shots), str(seed)) in done:
            continue
        started = time.perf_counter()
        if shots == 0:
            split = get_task(task, data_root=data_root).split("test")
            detector = GLIPDetector.from_pretrained(model)
            detector.model.to(resolve_device(device))
            metrics = evaluate(detector, split, limit=preset["eval_limit"])
            save({"model": model, "task": task, "strategy": "zero-shot", "shots": "0", "seed": 0,
                  "AP": round(metrics["AP"], 2), "AP50": round(metrics["AP50"], 2)})
            print(f"{model} {task} zero-shot: AP {metrics['AP']:.1f}", flush=True)
            continue
        adapter_path = out / "adapters" / f"{model}-{task}-{strategy}-{shots_label(shots)}-{seed}.safetensors"
        report = tune(TuneConfig(
            strategy=strategy, task=task, base=model, shots=shots, seed=seed, steps=preset["steps"][shots],
            eval_limit=preset["eval_limit"], validate=preset["validate"], zero_shot=False, data_root=data_root,
            progress=False, out=adapter_path, device=device, dtype=dtype))
        if strategy == "finetune":  # a full weight set per run would fill the disk; its size is in the row
            adapter_path.unlink()
        save({"model": model, "task": task, "strategy": strategy, "shots": shots_label(shots), "seed": seed,
              "AP": round(report["tuned"]["AP"], 2), "AP50": round(report["tuned"]["AP50"], 2),
              "train_s": report["timings"]["train_s"], "step_s": report["timings"]["step_s"],
              "trainable_parameters": report["trainable_parameters"],
              "adapter_bytes": report["adapter"]["bytes"]})
        print(f"{model} {task} {strategy} {shots_label(shots)}-shot seed {seed}: "
              f"AP {report['tuned']['AP']:.1f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def fill_zero_shot(rows: list[dict]) -> list[dict]:
    """Give every row its task's zero-shot AP (shards run the zero-shot evaluation once, in one shard)."""
    zero = {(r["model"], r["task"]): r["AP"] for r in rows if r["strategy"] == "zero-shot"}
    return [{**r, "zero_shot_AP": zero.get((r["model"], r["task"]), "")} for r in rows]


def summarise(rows: list[dict], out: Path) -> None:
    """Mean over seeds -> table.md and curves.png (one panel per task plus the average; one line per strategy,
    solid for glip-nano, dashed for glip-nano-a)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table: dict[tuple, list[float]] = {}
    for r in rows:
        table.setdefault((r["model"], r["task"], r["strategy"], r["shots"]), []).append(float(r["AP"]))
    mean = {k: sum(v) / len(v) for k, v in table.items()}
    models = sorted({k[0] for k in mean})
    tasks = sorted({k[1] for k in mean})
    strategies = [s for s in STRATEGY_NAMES if any(k[2] == s for k in mean)]
    shot_order = [s for s in ["0", "1", "3", "5", "10", "full"] if any(k[3] == s for k in mean)]

    def value(model, task, strategy, shots):
        if shots == "0":
            return mean.get((model, task, "zero-shot", "0"))
        return mean.get((model, task, strategy, shots))

    lines = ["| model | task | strategy | " + " | ".join(f"{s}-shot" if s not in ("0", "full") else
                                                      ("zero-shot" if s == "0" else "full") for s in shot_order) + " |",
             "|---|---|---|" + "---|" * len(shot_order)]
    for model in models:
        for task in tasks + ["average"]:
            for strategy in strategies:
                cells = []
                for shots in shot_order:
                    if task == "average":
                        vals = [value(model, t, strategy, shots) for t in tasks]
                        v = sum(vals) / len(vals) if all(x is not None for x in vals) else None
                    else:
                        v = value(model, task, strategy, shots)
                    cells.append("" if v is None else f"{v:.1f}")
                lines.append(f"| {model} | {task} | {strategy} | " + " | ".join(cells) + " |")
    # Sanity bar: at 10 shots, prompt tuning beats zero-shot on every task (mean over seeds).
    lines += ["", "Sanity bar (10-shot prompt tuning vs zero-shot, mean over seeds):", ""]
    for model in models:
        for task in tasks:
            zero, tuned = value(model, task, "prompt-tune", "0"), value(model, task, "prompt-tune", "10")
            if zero is not None and tuned is not None:
                lines.append(f"- {model} {task}: {zero:.1f} -> {tuned:.1f} AP "
                             f"({'beats' if tuned > zero else 'does NOT beat'} zero-shot)")
    (out / "table.md").write_text("\n".join(lines) + "\n")

    panels = tasks + ["average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    colours = {"linear-probe": "tab:blue", "prompt-tune": "tab:red", "lora": "tab:green", "finetune": "tab:purple"}
    for ax, task in zip(axes[0], panels):
        for model in models:
            for strategy in strategies:
                xs, ys = [], []
                for i, shots in enumerate(shot_order):
                    if task == "average":
                        vals = [value(model, t, strategy, shots) for t in tasks]
                        v = sum(vals) / len(vals) if all(x is not None for x in vals) else None
                    else:
                        v = value(model, task, strategy, shots)
                    if v is not None:
                        xs.append(i)
                        ys.append(v)
                ax.plot(xs, ys, marker="o", color=colours[strategy], linestyle="-" if model == models[0] else "--",
                        label=f"{strategy} ({model})")
        ax.set_xticks(range(len(shot_order)), ["zero" if s == "0" else s for s in shot_order])
        ax.set_title(task)
        ax.set_xlabel("shots")
        ax.set_ylabel("AP")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", nargs="*", help="override the preset's base models")
    parser.add_argument("--tasks", nargs="*", help="override the preset's tasks")
    parser.add_argument("--shard", default="0/1", help="I/N: run shard I of N shards of similar cost (parallel "
                                                      "shards write separate --out folders; merge with --combine)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="training compute precision (autocast; float16 on CUDA only)")
    parser.add_argument("--combine", nargs="*", type=Path,
                        help="only summarise: merge the results.csv of these run folders into --out")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    if args.models:
        preset["models"] = args.models
    if args.tasks:
        preset["tasks"] = args.tasks
    out = args.out or Path("benchmarks/results") / f"curves-{args.preset}"
    started = time.perf_counter()
    if args.combine:
        rows = fill_zero_shot([row for folder in args.combine
                               for row in csv.DictReader((folder / "results.csv").open())])
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    else:
        index, count = (int(part) for part in args.shard.split("/"))
        rows = fill_zero_shot(run_all(preset, out, args.data_root, (index, count), device=args.device,
                                      dtype=args.dtype))
    summarise(rows, out)
    print((out / "table.md").read_text())
    print(json.dumps({"runs": len(rows), "wall_s": round(time.perf_counter() - started, 1), "out": str(out)}))


if __name__ == "__main__":
    main()
