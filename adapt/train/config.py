"""The training run's settings (`TrainConfig`) and what a run did (`TrainResult`)."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapt.train.tracking import canonical_report_to
from backbone.device import DTYPES

SCHEDULES = ("cosine", "step", "constant")
_AMP_TO_DTYPE = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the removed `amp` field


class NonFiniteLossError(RuntimeError):
    """Raised after `max_bad_steps` iterations in a row had a non-finite loss or gradient."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out_dir: Path = field(metadata={"help": "folder for checkpoint.pt, best.safetensors, metrics.jsonl"})
    # optimiser
    lr: float = field(default=1e-4, metadata={"help": "AdamW base learning rate (GLIP BASE_LR)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decoupled weight decay"})
    lr_multipliers: tuple[tuple[str, float], ...] = field(
        default=(), metadata={"help": "(parameter-name prefix, lr multiplier) pairs; the longest matching "
                                      "prefix wins; e.g. (('text.', 0.1),) for GLIP's LANG_LR"})
    bias_lr_factor: float = field(
        default=1.0, metadata={"help": "lr multiplier for parameters named '*bias*' (GLIP's BIAS_LR_FACTOR is 2)"})
    no_decay: bool = field(
        default=True, metadata={"help": "no weight decay on biases, norm parameters and other 0-/1-D parameters"})
    # schedule
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up: update i uses lr*(i+1)/(warmup_steps+1)"})
    schedule: str = field(default="cosine", metadata={"help": "after warm-up: 'cosine', 'step' or 'constant'"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine: final lr as a fraction of lr"})
    milestones: tuple[int, ...] = field(
        default=(), metadata={"help": "step schedule: updates where lr is multiplied by gamma"})
    gamma: float = field(default=0.1, metadata={"help": "step schedule: decay factor at each milestone"})
    # length and data
    max_steps: int | None = field(default=None, metadata={"help": "optimizer iterations to run (min with epochs)"})
    epochs: int | None = field(default=None, metadata={"help": "passes over the training set (min with max_steps)"})
    batch_size: int = field(default=4, metadata={"help": "samples per micro-batch per process"})
    grad_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimizer iteration"})
    shuffle: bool = field(default=True, metadata={"help": "reshuffle each epoch from (seed, epoch)"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    # numerics and hardware
    grad_clip: float | None = field(default=1.0, metadata={"help": "max total grad norm; None turns clipping off"})
    device: str | None = field(default=None, metadata={"help": "'cpu', 'cuda', 'cuda:1'; None = CUDA if available"})
    dtype: str = field(default="float32", metadata={
        "help": "compute precision: 'float32', 'bfloat16' (autocast, CPU or CUDA) or 'float16' (autocast with "
                "GradScaler, CUDA only); master weights and optimizer state stay float32"})
    amp: str | None = field(default=None, repr=False, metadata={"help": "removed: use dtype"})
    distributed: bool = field(
        default=True, metadata={"help": "join torchrun's process group when launched by torchrun"})
    find_unused_parameters: bool = field(
        default=False, metadata={"help": "DDP: set when some trainable parameters get no gradient in a step"})
    # evaluation, checkpoints, logs
    eval_every: int | None = field(default=None, metadata={"help": "evaluate every N steps (and at the end)"})
    checkpoint_every: int = field(default=100, metadata={"help": "write checkpoint.pt every N steps (and at the end)"})
    best_metric: str | None = field(
        default=None, metadata={"help": "eval metric whose best value keeps best.safetensors"})
    best_mode: str = field(default="max", metadata={"help": "'max' or 'min': which direction of best_metric is better"})
    seed: int = field(default=0, metadata={"help": "seeds torch/numpy/random (+rank) and the data order"})
    log_every: int = field(default=10, metadata={"help": "write a train record to metrics.jsonl every N steps"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar (rank 0)"})
    report_to: str = field(default="none", metadata={
        "help": "trackers that also get the run (metrics.jsonl is always written): 'none' or a comma-separated "
                "list of tensorboard, mlflow, wandb"})
    max_bad_steps: int | None = field(
        default=5, metadata={"help": "stop after this many non-finite iterations in a row; None = never"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "lr_multipliers", tuple((str(p), float(m)) for p, m in self.lr_multipliers))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        _check_choice("schedule", self.schedule, SCHEDULES)
        _require(self.amp is None, "amp", self.amp, "was replaced by dtype",
                 f"pass dtype={_AMP_TO_DTYPE.get(self.amp, 'float32')!r}")
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("best_mode", self.best_mode, ("max", "min"))
        object.__setattr__(self, "report_to", canonical_report_to(self.report_to, "TrainConfig.report_to"))
        for name in ("batch_size", "grad_accumulation", "checkpoint_every", "log_every"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1", "pass a positive integer")
        for name in ("max_steps", "epochs", "eval_every", "max_bad_steps"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, value, "must be >= 1 or None", "pass a positive integer")
        _require(self.max_steps is not None or self.epochs is not None, "max_steps", None,
                 "the run has no length", "set max_steps or epochs")
        _require(self.lr > 0, "lr", self.lr, "must be > 0", "pass a positive learning rate")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0", "pass 0 or more")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0", "pass 0 or more")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0", "pass 0 or more")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0", "pass a non-negative integer")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip,
                 "must be > 0", "pass a positive max norm, or None to turn clipping off")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]",
                 "pass a fraction of lr")
        _require(list(self.milestones) == sorted(set(self.milestones)), "milestones", self.milestones,
                 "must be strictly increasing", "sort them and drop duplicates")
        for prefix, mult in self.lr_multipliers:
            _require(mult >= 0, "lr_multipliers", (prefix, mult), "a multiplier must be >= 0",
                     "use 0 to freeze by lr, or set requires_grad=False instead")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the Path as a string)."""
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        del out["amp"]
        return out


def check_overrides(settings: dict[str, Any], owner: str) -> None:
    """Refuse `owner`'s TrainConfig overrides (its `trainer` settings) that name no TrainConfig field."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        close = [difflib.get_close_matches(name, names, n=1) for name in unknown]
        hint = "; ".join(f"{name!r}: did you mean {c[0]!r}?" for name, c in zip(unknown, close) if c)
        raise ValueError(f"{owner}.trainer {unknown} are not TrainConfig fields{' (' + hint + ')' if hint else ''}; "
                         "drop or rename them")


def _require(ok: bool, name: str, value: Any, reason: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name}={value!r}: {reason}. Fix: {fix}.")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"TrainConfig.{name}={value!r} is not one of {list(choices)}. {hint}"
                         f"Fix: pass one of {list(choices)}.")


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What `Trainer.fit` did. Counters cover the whole run, across resumes; timings cover this call."""

    step: int = field(metadata={"help": "optimizer iterations done (skipped ones included)"})
    total_steps: int
    epoch: float = field(metadata={"help": "passes over the training set so far"})
    updates: int = field(metadata={"help": "iterations that updated the parameters"})
    skipped_nonfinite: int = field(metadata={"help": "iterations skipped for a NaN/inf loss or gradient"})
    skipped_no_grad: int = field(metadata={"help": "iterations skipped for a loss without grad path"})
    skipped_overflow: int = field(metadata={"help": "fp16 iterations whose step GradScaler skipped"})
    resumed_from_step: int | None
    best_metric: str | None
    best_value: float | None
    best_step: int | None
    last_losses: dict[str, float]
    last_metrics: dict[str, float]
    out_dir: Path
    checkpoint_path: Path
    best_path: Path | None
    log_path: Path
    wall_time_s: float
    train_time_s: float
    eval_time_s: float
    checkpoint_time_s: float

