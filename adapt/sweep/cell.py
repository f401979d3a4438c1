"""One cell of a sweep: an adaptation run (or the zero-shot base), its target AP, and what the adapted weights
keep of the base's own vocabulary (retention)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from adapt.strategy_spec import get_strategy
from adapt.sweep.grid import ZERO_SHOT, Cell, SweepConfig, retention_source
from glip_io import atomic_write

ROW_FIELDS = ["task", "base", "strategy", "shots", "seed", "AP", "AP50", "retention_AP", "retention_pct",
              "trainable_parameters", "adapter_bytes", "seconds", "device", "dtype", "config_hash", "status", "error"]


def run_cell(cell: Cell, config: SweepConfig) -> dict:
    """Run `cell` and return its row (raises on failure; the executor records the error)."""
    from backbone.device import resolve_device

    torch.set_num_threads(config.threads())
    started = time.perf_counter()
    row = {**cell.identity(config), "device": str(resolve_device(config.device))}
    base_retention = base_retention_ap(cell.base, config)
    if cell.strategy == ZERO_SHOT:
        metrics = _zero_shot(cell, config)
        row.update(AP=metrics["AP"], AP50=metrics["AP50"], retention_AP=base_retention, trainable_parameters=0,
                   adapter_bytes=0)
    else:
        row.update(_tuned(cell, config))
    row["retention_pct"] = round(100.0 * row["retention_AP"] / base_retention, 2) if base_retention else None
    row.update(seconds=round(time.perf_counter() - started, 2), status="ok", error="")
    return row


def _zero_shot(cell: Cell, config: SweepConfig) -> dict:
    from adapt.evaluation import evaluate
    from backbone.detector import GLIPDetector
    from tasks import get_task

    task = get_task(cell.task, data_root=config.data_root)
    detector = GLIPDetector.from_pretrained(cell.base, device=config.device)
    metrics = evaluate(detector, task.split(task.eval_split), limit=config.eval_limit)
    return {"AP": round(metrics.AP, 2), "AP50": round(metrics.AP50, 2)}


def _tuned(cell: Cell, config: SweepConfig) -> dict:
    from adapt.tune import TuneConfig, tune

    adapter_path = config.out / "adapters" / f"{cell.name()}.safetensors"
    result = tune(TuneConfig(strategy=cell.strategy, task=cell.task, base=cell.base, shots=cell.shots,
                             seed=cell.seed, steps=config.steps_for(cell.shots), batch_size=config.batch_size,
                             eval_limit=config.eval_limit, validate=config.validate, zero_shot=False,
                             out=adapter_path, device=config.device, dtype=config.dtype, progress=False,
                             data_root=config.data_root))
    try:
        retention = adapted_retention_ap(adapter_path, cell.base, config)
    finally:
        if get_strategy(cell.strategy).serving == "own-model" or not config.keep_adapters:
            adapter_path.unlink(missing_ok=True)
    return {"AP": round(result.tuned.AP, 2), "AP50": round(result.tuned.AP50, 2), "retention_AP": retention,
            "trainable_parameters": result.trainable_parameters, "adapter_bytes": result.adapter_bytes}


def adapted_retention_ap(adapter_path: Path, base: str, config: SweepConfig) -> float:
    """Retention AP of the base with the adapter's weights folded in, on prompts other than the task's.

    A prompt adapter changes no weight, so this equals the base's by construction (measured anyway, as a check);
    a linear probe's head, LoRA's update (folded, which is what serving it on another prompt computes) and a
    fine-tune's weights all act on every prompt, so this shows what they cost the base's vocabulary.
    """
    from adapt.adapter import apply_adapter, load_adapter
    from backbone.model import GLIP

    glip = GLIP.from_pretrained(base)
    apply_adapter(glip, load_adapter(adapter_path, base=glip))
    return _retention_ap(glip, base, config)


def base_retention_ap(base: str, config: SweepConfig) -> float:
    """The base's own retention AP, measured once per base and retention set, kept in out/retention/."""
    from backbone.model import GLIP

    source = retention_source(config, base)
    key = json.dumps([base, source, config.retention_limit, config.data_root and str(config.data_root)])
    cache = config.out / "retention" / f"{_digest(key)}.json"
    if cache.exists():
        return json.loads(cache.read_text())["AP"]
    value = _retention_ap(GLIP.from_pretrained(base), base, config)
    atomic_write(cache, json.dumps({"base": base, "source": source, "AP": value}).encode())
    return value


def _retention_ap(glip, base: str, config: SweepConfig) -> float:
    from adapt.evaluation import evaluate
    from backbone.detector import GLIPDetector
    from backbone.device import resolve_device
    from backbone.processor import GLIPProcessor
    from tasks import get_task

    task_name, protocol = retention_source(config, base)
    task = get_task(task_name, data_root=config.data_root)
    detector = GLIPDetector(glip.to(resolve_device(config.device)), GLIPProcessor.from_config(glip.config))
    split = "test" if "test" in task.splits else task.eval_split  # held-out images of the base's own vocabulary
    metrics = evaluate(detector, task.split(split), protocol, limit=config.retention_limit)
    return round(metrics.AP, 2)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]
