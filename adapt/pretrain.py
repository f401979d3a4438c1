"""Pretraining glip-nano / glip-nano-a on the OpenMoji icon world with GLIP's grounding objective.

Detection-style samples get a prompt of their present categories plus absent ones (negatives);
grounding-style samples keep their caption. The language backbone (all-MiniLM-L6-v2) stays frozen;
everything else trains with the shared engine (adapt.train). Only trained tensors are stored.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adapt.cli_config import write_config
from adapt.grounding import GroundingCollator, GroundingModel, grounding_loss, grounding_loss_fn
from adapt.train import TrainConfig, Trainer
from adapt.train.config import check_overrides
from adapt.train.tracking import canonical_report_to, flat_params, open_trackers
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
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "images per step"})
    lr: float = field(default=6e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps before the cosine decay"})
    grad_clip: float | None = field(default=1.0, metadata={"help": "max total gradient norm (None: no clipping)"})
    prompt_names: int = field(default=16, metadata={"help": "names per detection prompt (present + absent)"})
    grounding_fraction: float = field(default=0.3, metadata={"help": "share of caption (grounding) samples"})
    seed: int = field(default=0, metadata={"help": "seed of data, prompts and init"})
    eval_every: int = field(default=500, metadata={"help": "held-in evaluation every N steps"})
    eval_images: int = field(default=100, metadata={"help": "held-in images per evaluation"})
    checkpoint_every: int = field(default=100, metadata={"help": "write a checkpoint every N steps"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's default)"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader processes drawing scenes beside the training"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (None: CUDA when available)"})
    dtype: str = field(default="float32", metadata={
        "help": "compute precision: float32, bfloat16 (autocast, CPU or CUDA) or float16 (autocast + GradScaler, "
                "CUDA only); weights stay float32"})
    resume: bool = field(default=True, metadata={"help": "continue the run in out_dir if it has a checkpoint"})
    data_root: Path | None = field(default=None, metadata={"help": "root of the task data (default: the tasks "
                                                                   "package's)"})
    trainer: dict = field(default_factory=dict, metadata={
        "help": "TrainConfig settings over the run's own, e.g. {'grad_accumulation': 2}"})
    report_to: str = field(default="none", metadata={
        "help": "trackers that also get the run (TensorBoard files in out_dir/tensorboard): 'none' or a "
                "comma-separated list of tensorboard, mlflow, wandb"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", canonical_report_to(self.report_to))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        check_overrides(self.trainer, "PretrainConfig")


@dataclass(frozen=True, kw_only=True)
class PretrainResult:
    """What a pretraining run did; `to_dict()` is its summary.json (also stored in the weights' header)."""

    preset: str
    steps: int = field(metadata={"help": "optimizer steps done (across resumes)"})
    seed: int
    wall_time_s: float = field(metadata={"help": "seconds this call took"})
    device: str
    dtype: str
    batch_size: int
    lr: float
    last_metrics: dict[str, float] = field(metadata={"help": "the last held-in evaluation's headline metrics"})
    skipped_nonfinite: int = field(metadata={"help": "steps skipped for a NaN/inf loss or gradient"})

    def to_dict(self) -> dict:
        return asdict(self)


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
    from adapt.evaluation import evaluate

    return evaluate(detector, dataset, protocol, limit=limit).headline()


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain in config.out_dir (its config.yaml: the options that reproduce the run)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    model, dataset, collate, eval_fn = build_pretraining(config)
    write_config(config, Path(config.out_dir) / "config.yaml")
    train_config = TrainConfig(**{**dict(
        out_dir=config.out_dir, lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
        schedule="cosine", max_steps=config.steps, batch_size=config.batch_size, grad_clip=config.grad_clip,
        num_workers=config.num_workers,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, best_metric="AP50",
        seed=config.seed, log_every=10, max_bad_steps=20, device=config.device, dtype=config.dtype,
        report_to=config.report_to), **config.trainer})
    started = time.perf_counter()
    loss_fn = grounding_loss_fn(grounding_loss(model.glip.config))
    with open_trackers(config.report_to, Path(config.out_dir) / "tensorboard", Path(config.out_dir).name) as tracker:
        tracker.log_params(flat_params(asdict(config)))
        trainer = Trainer(model, train_config, loss_fn, dataset, collate_fn=collate, eval_fn=eval_fn, tracker=tracker)
        result = trainer.fit(resume=config.resume)
        tracker.log_metrics({f"final/{k}": v for k, v in result.last_metrics.items()}, step=result.step)
    wall = time.perf_counter() - started
    summary = PretrainResult(preset=config.preset, steps=result.step, seed=config.seed, wall_time_s=round(wall, 1),
                             device=str(trainer.device), dtype=config.dtype, batch_size=config.batch_size,
                             lr=config.lr, last_metrics=result.last_metrics,
                             skipped_nonfinite=result.skipped_nonfinite)
    if config.weights_out:
        glip = model.glip
        # A frozen packaged text encoder is rebuilt from its package at load: store only what was trained.
        packaged_text = glip.config.text.pretrained is not None
        save_model(glip, config.weights_out, exclude_prefix="text." if packaged_text else None, dtype="float16",
                   pretrain=json.dumps(summary.to_dict()))
    (config.out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1))
    return summary

