"""Training cost per strategy: step time, peak memory, trainable parameters, adapter bytes; with and without
the frozen-feature cache.

    python benchmarks/train_cost.py --base glip-nano [--dtype bfloat16] [--device cuda]
    python benchmarks/train_cost.py --base glip-t-ref --size 320      # GLIP-T, deterministic reference weights

Each (strategy, cache) runs in its own process (peak RSS is its own). One step = forward + loss +
backward + AdamW update on the same batch of icons-aquarium training images; median of --steps after a
warm-up. "cached" steps read precomputed backbone+FPN features (computed outside the timed step). The
"pretrain" row is one pretraining step of --pretrain-preset (per-sample prompts, everything but BERT trains).
--dtype runs the step under autocast with fp32 master weights, as `adapt ... --dtype` trains.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backbone.device import DTYPES

RUNS = [("prompt-tune", True), ("prompt-tune", False), ("linear-probe", True), ("linear-probe", False),
        ("lora", True), ("lora", False), ("finetune", False), ("pretrain", False)]


def resolve_base(base: str, reference: Path) -> str:
    if base != "glip-t-ref":
        return base
    sys.path.insert(0, str(Path(__file__).parent))
    from speed_core import build_weights

    return str(build_weights(reference, "glip_t", Path(tempfile.gettempdir()) / "glip-adapt-bench"))


def _timed(step, steps: int) -> float:
    step()  # warm-up (and, cached, fills the feature cache)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _step_fn(model, batch, loss_fn, device, dtype):
    """forward + loss + backward + AdamW update on `batch`, the way the Trainer runs it (autocast, fp32 weights)."""
    import torch

    from adapt.train import move_to_device
    from backbone.device import autocast

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with autocast(device, dtype):
            loss = loss_fn(model, move_to_device(batch, device))["loss"]
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def worker(base: str, strategy: str, cached: bool, batch_size: int, steps: int, size: int | None,
           data_root: str | None, device_name: str | None, dtype_name: str) -> dict:
    import dataclasses

    import torch

    from adapt.adapter import save_adapter
    from adapt.cache import FeatureCache
    from adapt.grounding import GroundingCollator, grounding_loss, grounding_loss_fn
    from adapt.tune import AdaptDataset, TuneConfig, adapter_from_tuned_model, build_strategy, task_tokens
    from backbone.device import resolve_device, resolve_dtype
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor
    from tasks import get_task

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    torch.manual_seed(0)
    glip = GLIP.from_pretrained(base)
    if size:
        glip.config = dataclasses.replace(glip.config, image=dataclasses.replace(glip.config.image, min_size=size,
                                                                                 max_size=size))
    task = get_task("icons-aquarium", data_root=data_root)
    split = task.split("train")
    processor = GLIPProcessor.from_config(glip.config)
    prompt = task_tokens(processor, task.categories)
    config = TuneConfig(strategy=strategy, task=task.name, base=base)
    model = build_strategy(strategy, glip, prompt, config).to(device)
    model.train()
    model.use_feature_cache(FeatureCache() if cached else None)  # uncached: backbone + FPN inside every step
    dataset = AdaptDataset(split, split.image_ids[:batch_size])
    batch = GroundingCollator(processor, task_prompt=prompt)([dataset[i] for i in range(batch_size)])
    step_s = _timed(_step_fn(model, batch, grounding_loss_fn(grounding_loss(glip.config)), device, dtype), steps)
    adapter = adapter_from_tuned_model(model, task, prompt, config, "benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(adapter, Path(tmp) / "a.safetensors")
        adapter_bytes = path.stat().st_size
    return {"strategy": strategy, "cached": cached, "step_s": step_s, "dtype": dtype_name, "device": str(device),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapter_bytes": adapter_bytes, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "image": f"{batch.image_sizes[0][0]}x{batch.image_sizes[0][1]}", "batch_size": batch_size}


def pretrain_worker(preset: str, batch_size: int, steps: int, device_name: str | None, dtype_name: str) -> dict:
    """One pretraining step (adapt.pretrain's model, corpus, collator and loss) on a fixed batch."""
    import torch

    from adapt.grounding import GroundingModel, grounding_loss, grounding_loss_fn
    from adapt.pretrain import PretrainConfig, pretraining_data
    from backbone.config import get_preset
    from backbone.device import resolve_device, resolve_dtype
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    torch.manual_seed(0)
    glip_config = get_preset(preset)
    dataset, collate = pretraining_data(PretrainConfig(preset=preset), GLIPProcessor.from_config(glip_config))
    batch = collate([dataset[i] for i in range(batch_size)])
    model = GroundingModel(GLIP.from_config(glip_config)).to(device).train()
    step_s = _timed(_step_fn(model, batch, grounding_loss_fn(grounding_loss(glip_config)), device, dtype), steps)
    return {"strategy": f"pretrain ({preset})", "cached": False, "step_s": step_s, "dtype": dtype_name,
            "device": str(device), "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapter_bytes": 0, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "image": f"{batch.image_sizes[0][0]}x{batch.image_sizes[0][1]}", "batch_size": batch_size}


def run_worker(args, base: str, strategy: str, cached: bool, dtype: str) -> dict:
    """One (strategy, cache, dtype) measurement in its own process (its own peak RSS)."""
    command = [sys.executable, __file__, "--worker", base, strategy, "1" if cached else "0",
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads),
               "--dtype", dtype, "--pretrain-preset", args.pretrain_preset]
    command += ["--size", str(args.size)] if args.size else []
    command += ["--data-root", args.data_root] if args.data_root else []
    command += ["--device", args.device] if args.device else []
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="glip-nano")
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--only", nargs="*", help="strategy[:cached|:uncached] subset ('pretrain' for its row)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES),
                        help="compute precision(s) of the step (autocast; fp32 master weights; float16 CUDA only); "
                             "several: each run in each dtype back to back, then the speed-up of each over the first")
    parser.add_argument("--pretrain-preset", default="glip-nano", help="model of the pretraining-step row")
    parser.add_argument("--worker", nargs=3, metavar=("BASE", "STRATEGY", "CACHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        base, strategy, cached = args.worker
        [dtype] = args.dtype
        if strategy == "pretrain":
            row = pretrain_worker(args.pretrain_preset, args.batch_size, args.steps, args.device, dtype)
        else:
            row = worker(base, strategy, cached == "1", args.batch_size, args.steps, args.size, args.data_root,
                         args.device, dtype)
        print(json.dumps(row))
        return
    base = resolve_base(args.base, args.reference)
    runs = [r for r in RUNS if not args.only or r[0] in args.only
            or f"{r[0]}:{'cached' if r[1] else 'uncached'}" in args.only]
    rows = []
    for strategy, cached in runs:
        for dtype in args.dtype:  # back to back, so a shared machine's load changes little between them
            row = run_worker(args, base, strategy, cached, dtype)
            rows.append(row)
            print(f"{args.base:<11} {row['dtype']:<8} {row['strategy']:<20} "
                  f"{'cached' if row['cached'] else 'uncached':<9} step {row['step_s']:.3f} s  peak RSS "
                  f"{row['peak_rss_gib']:.2f} GiB  trainable {row['trainable_parameters']:>11,}  adapter "
                  f"{row['adapter_bytes']:>11,} B  (batch {row['batch_size']} x {row['image']})", flush=True)
        for dtype in args.dtype[1:]:
            first, other = (next(r for r in rows[-len(args.dtype):] if r["dtype"] == d) for d in (args.dtype[0], dtype))
            print(f"  {dtype} step is {first['step_s'] / other['step_s']:.2f}x as fast as {args.dtype[0]}", flush=True)
    rows_first = [r for r in rows if r["dtype"] == args.dtype[0]]
    by = {(r["strategy"], r["cached"]): r for r in rows_first}
    if ("prompt-tune", True) in by and ("finetune", False) in by:
        ratio = by[("finetune", False)]["step_s"] / by[("prompt-tune", True)]["step_s"]
        print(f"cached prompt-tune step is {ratio:.1f}x faster than a full fine-tuning step (target >= 5x)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
