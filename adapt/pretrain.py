"""Pretraining glip-nano / glip-nano-a on the OpenMoji icon world with GLIP's grounding objective.

Detection-style samples get a prompt of their present categories plus absent ones (negatives);
grounding-style samples keep their caption. The language backbone (all-MiniLM-L6-v2) stays frozen;
everything else trains with the shared engine (adapt.train). Only trained tensors are stored.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapt.grounding import GroundingCollator, GroundingModel, grounding_loss, grounding_loss_fn
from adapt.train import TrainConfig, Trainer
from backbone.checkpoints import save_model
from backbone.config import GLIPConfig, get_preset
from backbone.detector import GLIPDetector
from backbone.model import GLIP
from backbone.processor import GLIPProcessor


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    preset: str = field(default="glip-nano", metadata={"help": "glip-nano or glip-nano-a"})
    model: GLIPConfig | None = field(default=None, metadata={"help": "a model config instead of the preset's (ablations)"})
    out_dir: Path = field(default=Path("runs/pretrain"), metadata={"help": "run folder (checkpoints, log)"})
    weights_out: Path | None = field(default=None, metadata={"help": "final weights (.safetensors)"})
    steps: int = 3000
    batch_size: int = 8
    lr: float = 6e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    grad_clip: float | None = field(default=1.0, metadata={"help": "max total gradient norm (None: no clipping)"})
    prompt_names: int = field(default=16, metadata={"help": "names per detection prompt (present + absent)"})
    grounding_fraction: float = field(default=0.3, metadata={"help": "share of caption (grounding) samples"})
    seed: int = 0
    eval_every: int = 500
    eval_images: int = 100
    checkpoint_every: int = 100
    threads: int | None = None
    num_workers: int = field(default=0, metadata={"help": "DataLoader processes drawing scenes beside the training"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (None: CUDA when available)"})
    dtype: str = field(default="float32", metadata={
        "help": "compute precision: float32, bfloat16 (autocast, CPU or CUDA) or float16 (autocast + GradScaler, "
                "CUDA only); weights stay float32"})
    resume: bool = True
    data_root: Path | None = None


def pretraining_data(config: PretrainConfig, processor: GLIPProcessor):
    """The icon-world corpus and its collator (detection prompts with absent names as negatives)."""
    from tasks.icons.corpus import CorpusConfig, IconPretrainDataset, detection_prompt_for_target
    from tasks.icons.rng import Rng
    from tasks.icons.scene import IconWorld

    world = IconWorld()
    world.warm()
    dataset = IconPretrainDataset(world, length=10_000_000, seed=config.seed,
                                  config=CorpusConfig(grounding_fraction=config.grounding_fraction))
    vocabulary = dataset.names

    def build_prompt(target: dict):
        present = len(set(target["phrases"]))
        rng = Rng("pretrain-prompt", config.seed, target["index"])
        return detection_prompt_for_target(target, vocabulary, max(0, config.prompt_names - present), rng)

    return dataset, GroundingCollator(processor, build_prompt=build_prompt)


def build_pretraining(config: PretrainConfig):
    """Model, dataset, collator and evaluation for a pretraining run (also used by tests on tiny presets)."""
    from tasks import get_task

    glip_config = config.model or get_preset(config.preset)
    processor = GLIPProcessor.from_config(glip_config)
    dataset, collate = pretraining_data(config, processor)
    glip = GLIP.from_config(glip_config)
    model = GroundingModel(glip)
    heldin = get_task("icons-heldin", data_root=config.data_root).split("valid")

    def eval_fn(wrapped) -> dict:
        detector = GLIPDetector(wrapped.glip, processor)
        metrics = evaluate_protocol(detector, heldin, "per-image-16", config.eval_images)
        wrapped.train()
        return metrics

    return model, dataset, collate, eval_fn


def evaluate_protocol(detector, dataset, protocol: str, limit: int | None) -> dict:
    from adapt.evaluation import HEADLINE_METRICS, evaluate

    metrics = evaluate(detector, dataset, protocol, limit=limit)
    return {key: metrics[key] for key in HEADLINE_METRICS if key in metrics}


def pretrain(config: PretrainConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    model, dataset, collate, eval_fn = build_pretraining(config)
    train_config = TrainConfig(
        out_dir=config.out_dir, lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
        schedule="cosine", max_steps=config.steps, batch_size=config.batch_size, grad_clip=config.grad_clip,
        num_workers=config.num_workers,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, best_metric="AP50",
        seed=config.seed, log_every=10, max_bad_steps=20, device=config.device, dtype=config.dtype)
    started = time.perf_counter()
    loss_fn = grounding_loss_fn(grounding_loss(model.glip.config))
    trainer = Trainer(model, train_config, loss_fn, dataset, collate_fn=collate, eval_fn=eval_fn)
    result = trainer.fit(resume=config.resume)
    wall = time.perf_counter() - started
    summary = {"preset": config.preset, "steps": result.step, "seed": config.seed, "wall_time_s": round(wall, 1),
               "device": str(trainer.device), "dtype": config.dtype,
               "batch_size": config.batch_size, "lr": config.lr, "last_metrics": result.last_metrics,
               "skipped_nonfinite": result.skipped_nonfinite}
    if config.weights_out:
        glip = model.glip
        # A frozen packaged text encoder is rebuilt from its package at load: store only what was trained.
        packaged_text = glip.config.text.pretrained is not None
        save_model(glip, config.weights_out, exclude_prefix="text." if packaged_text else None, dtype="float16",
                   pretrain=json.dumps(summary))
    (config.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

