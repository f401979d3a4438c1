"""The training engine that every adaptation strategy and the glip-nano pretraining run on.

A plain PyTorch loop in the manner of nanoGPT's `train.py` and detectron2's `SimpleTrainer`. The
model is opaque: `loss_fn(model, batch) -> {"loss": Tensor, ...}` does the model-specific work, and
only parameters with `requires_grad` are trained. The optimiser follows the official GLIP
`solver/build.py` (FINDINGS §9):
- AdamW over named parameter groups.
- A learning-rate multiplier per name prefix (GLIP's LANG_LR for `language_backbone`).
- A bias learning-rate factor, and no weight decay on biases (here also on norms and other 1-D
  parameters).
- Grad-norm clipping at 1.0.

The rest: linear warm-up, then cosine, step or constant decay; autocast mixed precision;
gradient accumulation; JSONL metrics and a tqdm bar; evaluation with best-checkpoint keeping;
atomic checkpoints that resume exactly; and torchrun DDP.

Files written to `out_dir` (by rank 0 only):
    checkpoint.pt      trainable tensors by name, optimizer, scheduler, scaler, step, sampler
                       position, RNG states of every rank, best metric, counters; one file,
                       replaced atomically
    best.safetensors   trainable tensors at the best evaluation (metadata: step, metric, value)
    metrics.jsonl      one JSON object per line, flushed per line
    train_config.json  the TrainConfig of the run

Step semantics: `step` counts optimizer iterations. A skipped iteration still advances the step,
the schedule and the data, but the parameters are not updated. An iteration is skipped for a
non-finite loss or gradient, for a loss without a grad path, or for an fp16 overflow. One
iteration consumes `grad_accumulation` micro-batches of `batch_size` samples on every process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from glip_io import atomic_write
from torch import Tensor, nn

__all__ = [
    "TrainConfig", "TrainResult", "Trainer", "NonFiniteLossError", "ShardedSampler",
    "build_param_groups", "lr_factor", "set_seed", "load_trainable", "init_distributed",
    "unwrap_model", "move_to_device",
]

SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("off", "bf16", "fp16")
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.safetensors"
LOG_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"
_CHECKPOINT_FORMAT = 1
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
               nn.modules.batchnorm._NormBase)


class NonFiniteLossError(RuntimeError):
    """Raised after `max_bad_steps` iterations in a row had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------- config


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
    amp: str = field(default="off", metadata={"help": "'off', 'bf16' (CPU or CUDA) or 'fp16' (CUDA, with GradScaler)"})
    device: str | None = field(default=None, metadata={"help": "'cpu', 'cuda', 'cuda:1'; None = CUDA if available"})
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
    max_bad_steps: int | None = field(
        default=5, metadata={"help": "stop after this many non-finite iterations in a row; None = never"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "lr_multipliers", tuple((str(p), float(m)) for p, m in self.lr_multipliers))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("best_mode", self.best_mode, ("max", "min"))
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
        return out


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


# ------------------------------------------------------------------------ seeding and schedules


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seeds Python's `random`, NumPy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: a non-negative integer.
        deterministic: also ask torch for deterministic kernels (slower; CUDA matmuls additionally
            need CUBLAS_WORKSPACE_CONFIG set by the launcher).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Multiplier of every group's learning rate for update `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.gamma ** sum(step >= m for m in config.milestones)
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------ parameter groups


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]


def _is_bias(name: str) -> bool:
    return "bias" in name.rsplit(".", 1)[-1]


def build_param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters, built from their names.

    Each group holds parameters with one (lr multiplier, weight decay) pair, keys `params`,
    `param_names`, `lr`, `weight_decay`, `lr_multiplier`, in first-appearance order. The
    multiplier is the longest matching `lr_multipliers` prefix (else 1), times `bias_lr_factor`
    for biases. With `no_decay`, biases, norm parameters and 0-/1-D parameters get no decay.
    """
    trainable = _trainable(model)
    if not trainable:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no parameter with requires_grad=True, so there "
                         "is nothing to train. Fix: attach a strategy (or unfreeze parameters) before training.")
    names = [n for n, _ in trainable]
    for prefix, _ in config.lr_multipliers:
        if not any(n.startswith(prefix) for n in names):
            roots = sorted({n.split(".")[0] + "." for n in names})
            close = difflib.get_close_matches(prefix, roots, n=3)
            raise ValueError(f"lr_multipliers prefix {prefix!r} matches no trainable parameter"
                             f"{f' (did you mean {close}?)' if close else ''}; trainable names start with "
                             f"{roots[:10]}. Fix: use a prefix of the trainable parameter names.")
    norm_ids = {id(p) for m in unwrap_model(model).modules() if isinstance(m, _NORM_TYPES)
                for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in trainable:
        matches = [(len(p), m) for p, m in config.lr_multipliers if name.startswith(p)]
        mult = max(matches)[1] if matches else 1.0
        if _is_bias(name):
            mult *= config.bias_lr_factor
        exempt = config.no_decay and (_is_bias(name) or param.ndim <= 1 or id(param) in norm_ids)
        decay = 0.0 if exempt else config.weight_decay
        group = groups.setdefault((mult, decay), {"params": [], "param_names": [], "lr": config.lr * mult,
                                                  "weight_decay": decay, "lr_multiplier": mult})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


# ------------------------------------------------------------------------------------- sampling


class ShardedSampler:
    """Deterministic data order: a permutation per (seed, epoch), split across processes.

    As torch's DistributedSampler, rank r takes every world_size-th index of the epoch's
    permutation; the tail that does not divide evenly is dropped so every rank sees the same number
    of batches. The position within an epoch (a batch index) is kept by the Trainer and saved in
    its checkpoint, so `batches(epoch, start)` resumes exactly.
    """

    def __init__(self, num_samples: int, *, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}. Fix: 0 <= rank < world_size.")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size

    @property
    def batches_per_epoch(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def generator(self, epoch: int) -> torch.Generator:
        """A torch generator seeded from (seed, epoch): same order on every rank, new each epoch."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for `epoch`, in order."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator(epoch)).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.num_samples // self.world_size
        return order[: per_rank * self.world_size][self.rank::self.world_size]

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches of `epoch` from batch index `start` on (full batches only)."""
        idx = self.indices(epoch)
        return [idx[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, self.batches_per_epoch)]


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside (nested) dicts, lists, tuples, named tuples and dataclasses, moved to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move_to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


# ---------------------------------------------------------------------------------- distributed


def init_distributed(device_type: str = "cpu") -> tuple[int, int, bool]:
    """Joins torchrun's process group when this process was launched by torchrun.

    Uses gloo for CPU training and nccl for CUDA; the rendezvous comes from what torchrun set
    (`init_method="env://"`). Returns (rank, world_size, created), where `created` says whether this
    call initialised the group (and so the caller should destroy it).
    """
    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if not dist.is_torchelastic_launched():
        return 0, 1, False
    if device_type == "cuda":
        torch.cuda.set_device(dist.get_node_local_rank(fallback_rank=0))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _resolve_device(requested: str | None, world_size: int) -> torch.device:
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={requested!r}: CUDA is not available on this machine. "
                             "Fix: pass device='cpu' (or leave it None).")
        if device.index is None:
            index = dist.get_node_local_rank(fallback_rank=0) if world_size > 1 else torch.cuda.current_device()
            device = torch.device("cuda", index)
    return device


def _check_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"TrainConfig.amp='fp16' needs a CUDA device (training on {device}): fp16 without a "
                         "GradScaler underflows. Fix: use amp='bf16' on CPU, or amp='off'.")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"TrainConfig.amp='bf16': {torch.cuda.get_device_name(device)} has no bf16 support. "
                         "Fix: use amp='fp16' on this GPU.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"TrainConfig.amp={amp!r} is supported on CPU and CUDA, not {device.type}. "
                         "Fix: use amp='off'.")
    return torch.bfloat16 if amp == "bf16" else torch.float16


# ------------------------------------------------------------------------------- file handling


def _check_writable(out_dir: Path) -> str | None:
    """None if `out_dir` can be created and written, else the error message."""
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return (f"out_dir '{out_dir}' is not writable ({e.strerror or e}); training did not start. "
                "Fix: choose another folder or make this one writable.")
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": keep the file valid JSON
    return value


def _trim_log(path: Path, step: int) -> None:
    """Drops records after `step` (logged after the last checkpoint) and any partial last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# ------------------------------------------------------------------------------- loading weights


def _load_named(model: nn.Module, tensors: Mapping[str, Tensor], *, source: str,
                require_all_trainable: bool) -> None:
    params = dict(unwrap_model(model).named_parameters())
    unexpected = sorted(n for n in tensors if n not in params)
    mismatched = [f"{n}: file {tuple(t.shape)} vs model {tuple(params[n].shape)}"
                  for n, t in sorted(tensors.items()) if n in params and t.shape != params[n].shape]
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors) \
        if require_all_trainable else []
    if unexpected or mismatched or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} name(s) not in the model: {unexpected}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {mismatched}")
        if missing:
            parts.append(f"{len(missing)} trainable parameter(s) of the model missing from the file: {missing}")
        raise ValueError(f"cannot load {source} into {type(unwrap_model(model)).__name__}: " + "; ".join(parts)
                         + ". Fix: build the model (and attach the strategy) exactly as in training before loading.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def load_trainable(model: nn.Module, path: str | Path, *, require_all_trainable: bool = True) -> list[str]:
    """Loads trainable tensors by name from `best.safetensors` or `checkpoint.pt`, strictly.

    Every name in the file must be a parameter of `model` with the same shape, and (unless
    `require_all_trainable` is False) every parameter of `model` with requires_grad must be in the
    file; otherwise a ValueError lists all the differences. Returns the names loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trainable-weights file at '{path}'. Fix: pass the {BEST_NAME} or "
                                f"{CHECKPOINT_NAME} written by Trainer.fit.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)["trainable"]
    _load_named(model, tensors, source=f"'{path}'", require_all_trainable=require_all_trainable)
    return sorted(tensors)


# ------------------------------------------------------------------------------------ the engine


LossFn = Callable[[nn.Module, Any], Mapping[str, Any]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


class Trainer:
    """Trains the parameters of `model` that have requires_grad, with `loss_fn` on `train_dataset`.

    Args:
        model: any module; parameters with requires_grad=False stay untouched and are not saved.
        config: the run's settings.
        loss_fn: `loss_fn(model, batch) -> {"loss": scalar Tensor, **other}`; `model` may be wrapped
            in DDP, so call it (`model(...)`) rather than its methods, and use `unwrap_model` for
            attributes. Batches arrive on the training device. Other scalar entries are logged.
        train_dataset: a map-style dataset (`__len__`, `__getitem__`).
        collate_fn: DataLoader collate function (default: torch's default_collate).
        eval_fn: `eval_fn(model) -> {"metric": float}`, called on rank 0 under no_grad with the
            unwrapped model in eval mode every `eval_every` steps and at the end.

    Construction validates everything that can fail before training: the output folder, the
    dataset size, the amp mode and the parameter groups. `model.train()` is called at the start of
    `fit` and after each evaluation, so a strategy that keeps frozen parts in eval mode does so in
    its `train()` override, as GLIP's GeneralizedVLRCNN does.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, loss_fn: LossFn, train_dataset: Any, *,
                 collate_fn: Callable[[list[Any]], Any] | None = None, eval_fn: EvalFn | None = None):
        self.config, self.loss_fn, self.eval_fn = config, loss_fn, eval_fn
        self.collate_fn = collate_fn
        self.train_dataset = train_dataset
        if config.best_metric is not None and eval_fn is None:
            raise ValueError(f"TrainConfig.best_metric={config.best_metric!r} needs an eval_fn to measure it. "
                             "Fix: pass eval_fn=..., or set best_metric=None.")
        device_type = torch.device(config.device).type if config.device else (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.rank, self.world_size, self._owns_process_group = (
            init_distributed(device_type) if config.distributed else (0, 1, False))
        self.is_main = self.rank == 0
        self.device = _resolve_device(config.device, self.world_size)
        self._amp_dtype = _check_amp(config.amp, self.device)
        self.out_dir = config.out_dir
        error = self._broadcast(_check_writable(self.out_dir) if self.is_main else None)
        if error:
            raise OSError(error)
        self.sampler = self._make_sampler(train_dataset)
        self.total_steps = self._total_steps()

        self.model = model.to(self.device)
        self._params = _trainable(model)
        self.param_groups = build_param_groups(model, config)
        self.optimizer = torch.optim.AdamW(self.param_groups, lr=config.lr, weight_decay=config.weight_decay)
        schedule = functools.partial(lr_factor, config=config, total_steps=self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.wrapped = model
        if self.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters)

        self.step, self.epoch, self.batch_index = 0, 0, 0
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"}
        self.counts = {"updates": 0, "skipped_nonfinite": 0, "skipped_no_grad": 0, "skipped_overflow": 0}
        self._bad_in_row = 0
        self._timings = {"eval": 0.0, "checkpoint": 0.0}
        self._last_losses: dict[str, float] = {}
        self._last_metrics: dict[str, float] = {}
        self._log_file = None

    # -------------------------------------------------------------------------------- paths

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST_NAME

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_NAME

    # ---------------------------------------------------------------------------------- setup

    def _make_sampler(self, dataset: Any) -> ShardedSampler:
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(f"train_dataset ({type(dataset).__name__}) has no len(): the engine needs a map-style "
                            "dataset to order, shard and resume it. Fix: wrap the data in a map-style Dataset."
                            ) from None
        cfg = self.config
        if n == 0:
            raise ValueError("train_dataset is empty (0 samples): there is nothing to train on. "
                             "Fix: check the split, the annotation file and the few-shot selection.")
        need = cfg.batch_size * self.world_size
        if n < need:
            raise ValueError(f"train_dataset has {n} samples, fewer than one batch: batch_size={cfg.batch_size} "
                             f"per process x {self.world_size} process(es) = {need}. Fix: lower batch_size to "
                             f"at most {n // self.world_size or 1}"
                             f"{' or use fewer processes' if self.world_size > 1 else ''}, or add samples.")
        return ShardedSampler(n, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                              rank=self.rank, world_size=self.world_size)

    def _total_steps(self) -> int:
        cfg = self.config
        candidates = [cfg.max_steps] if cfg.max_steps is not None else []
        if cfg.epochs is not None:
            from_epochs = cfg.epochs * self.sampler.batches_per_epoch // cfg.grad_accumulation
            if from_epochs == 0:
                raise ValueError(f"TrainConfig.epochs={cfg.epochs} gives no optimizer step: an epoch has "
                                 f"{self.sampler.batches_per_epoch} batches and a step takes grad_accumulation="
                                 f"{cfg.grad_accumulation}. Fix: raise epochs or lower grad_accumulation.")
            candidates.append(from_epochs)
        return min(candidates)

    def _loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        # Own generator: DataLoader iterators otherwise draw from the global torch RNG, which would
        # make a resumed run's dropout differ from an uninterrupted one's.
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.sampler.batches(epoch, start),
            collate_fn=self.collate_fn or torch.utils.data.default_collate,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
            generator=self.sampler.generator(epoch))

    def _batches(self) -> Iterator[Any]:
        """The endless data stream; (epoch, batch_index) always names the next batch to consume."""
        while True:
            for batch in self._loader(self.epoch, self.batch_index):
                self.batch_index += 1
                yield batch
            self.epoch, self.batch_index = self.epoch + 1, 0

    # ------------------------------------------------------------------------ distributed util

    def _broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _max_across(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------------------------------ fit

    def fit(self, resume: bool | str | Path = False) -> TrainResult:
        """Trains until `total_steps`; `resume=True` continues from out_dir's checkpoint if there is
        one (else starts fresh), `resume=<path>` from that checkpoint."""
        start_time = time.perf_counter()
        resumed_from = self._start(resume)
        data = self._batches()
        finished = False
        try:
            self._loop(data, start_time)
            finished = True
        finally:
            data.close()
            self._close(finished)
        return self._result(start_time, resumed_from)

    def _start(self, resume: bool | str | Path) -> int | None:
        path: Path | None = None
        if resume is True:
            path = self.checkpoint_path if self.checkpoint_path.exists() else None
        elif resume:
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"resume={str(resume)!r}: no checkpoint there. Fix: pass the "
                                        f"{CHECKPOINT_NAME} of an earlier run, or resume=True for out_dir's.")
        elif self.checkpoint_path.exists():
            raise FileExistsError(f"out_dir '{self.out_dir}' already holds {CHECKPOINT_NAME} from an earlier run. "
                                  "Fix: pass resume=True to continue it, or choose a new out_dir.")
        if path is not None:
            self._load_checkpoint(path)
        else:
            set_seed(self.config.seed + self.rank)
        if self.is_main:
            for stale in self.out_dir.glob(".*.tmp-*"):  # left by a run killed mid-write
                stale.unlink(missing_ok=True)
            _trim_log(self.log_path, self.step)
            atomic_write(self.out_dir / CONFIG_NAME,
                          lambda tmp: tmp.write_text(json.dumps(self.config.to_dict(), indent=2)))
            self._log_file = open(self.log_path, "a", encoding="utf-8")
            self._log({"event": "resume" if path else "start", "step": self.step, "total_steps": self.total_steps,
                       "world_size": self.world_size, "trainable_params": sum(p.numel() for _, p in self._params)})
        self.model.train()
        return self.step if path is not None else None

    def _loop(self, data: Iterator[Any], start_time: float) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        samples_per_step = cfg.batch_size * cfg.grad_accumulation * self.world_size
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        last_log = (self.step, time.perf_counter())
        try:
            while self.step < self.total_steps:
                lr = self.config.lr * lr_factor(self.step, cfg, self.total_steps)
                losses, grad_norm, skip = self._train_step(data)
                self.step += 1
                with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" after a skip
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                bar.update(1)
                self._account(skip, losses)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = (self.step - last_log[0]) * samples_per_step / max(now - last_log[1], 1e-9)
                    last_log = (self.step, now)
                    self._log({"event": "train", "step": self.step, "epoch": round(self._epoch_float(), 4),
                               **losses, "lr": lr, "grad_norm": grad_norm, "skipped": skip, "samples_per_s": rate,
                               "time_s": now - start_time})
                    if losses:
                        bar.set_postfix(loss=f"{losses.get('loss', float('nan')):.4f}",
                                        samples_s=f"{rate:.1f}", refresh=False)
                if self.eval_fn is not None and (self.step == self.total_steps or (
                        cfg.eval_every and self.step % cfg.eval_every == 0)):
                    self._evaluate()
                if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self._save_checkpoint()
        finally:
            bar.close()

    def _train_step(self, data: Iterator[Any]) -> tuple[dict[str, float], float | None, str | None]:
        """One optimizer iteration over grad_accumulation micro-batches.

        Returns (mean losses, grad norm before clipping, skip reason or None).
        """
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        skip: str | None = None
        computed = 0
        for micro in range(cfg.grad_accumulation):
            batch = next(data)
            if skip is not None:
                continue  # the iteration is lost already: consume its data, skip the compute
            last = micro == cfg.grad_accumulation - 1
            no_sync = self.wrapped.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._amp_dtype is not None):
                    out = self.loss_fn(self.wrapped, move_to_device(batch, self.device))
                loss = _loss_tensor(out)
                computed += 1
                for key, value in _scalars(out).items():
                    sums[key] = sums.get(key, 0.0) + value
                # every rank must agree, or DDP's backward all-reduce would wait on the skipping ranks
                code = self._max_across(2 if not torch.isfinite(loss.detach()).all() else
                                        1 if not loss.requires_grad else 0)
                if code:
                    skip = "nonfinite" if code == 2 else "no_grad"
                    continue
                self.scaler.scale(loss / cfg.grad_accumulation).backward()
        losses = {k: v / computed for k, v in sums.items()}
        if skip is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return losses, None, skip
        return losses, *self._apply_update()

    def _apply_update(self) -> tuple[float, str | None]:
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        params = [p for _, p in self._params]
        if self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm_value = float(norm)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.scaler.update()
            return norm_value, "overflow" if self.scaler.get_scale() < scale else None
        if not math.isfinite(norm_value):  # identical on every rank: gradients are all-reduced
            self.optimizer.zero_grad(set_to_none=True)
            return norm_value, "nonfinite"
        self.optimizer.step()
        return norm_value, None

    def _account(self, skip: str | None, losses: dict[str, float]) -> None:
        if skip is None:
            self.counts["updates"] += 1
            self._bad_in_row = 0
            self._last_losses = losses
            return
        self.counts[f"skipped_{skip}"] += 1
        self._log({"event": "skip", "step": self.step, "reason": skip, **losses})
        if skip != "nonfinite":
            return
        self._bad_in_row += 1
        limit = self.config.max_bad_steps
        if limit is not None and self._bad_in_row >= limit:
            self._log({"event": "stop", "step": self.step, "reason": f"{self._bad_in_row} non-finite steps in a row"})
            last = f"the last checkpoint is '{self.checkpoint_path}'" if self.checkpoint_path.exists() else \
                "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"{self._bad_in_row} optimizer steps in a row (the last at step {self.step}) had a non-finite loss "
                f"or gradient (losses {losses}); stopping. The parameters were not updated by these steps and "
                f"{last}. Fix: lower lr (now {self.config.lr}), keep grad_clip on, prefer amp='bf16' to 'fp16', "
                f"or inspect the batches of these steps; raise max_bad_steps (now {limit}) to tolerate more.")

    def _epoch_float(self) -> float:
        return self.epoch + self.batch_index / self.sampler.batches_per_epoch

    # ------------------------------------------------------------------------ eval and logging

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        metrics = None
        if self.is_main:
            self.model.eval()
            try:
                with torch.no_grad():
                    raw = self.eval_fn(self.model)
            finally:
                self.model.train()
            metrics = {str(k): float(v) for k, v in dict(raw).items()}
        metrics = self._broadcast(metrics)
        self._last_metrics = metrics
        improved = False
        name = self.config.best_metric
        if name is not None:
            if name not in metrics:
                close = difflib.get_close_matches(name, list(metrics), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise KeyError(f"TrainConfig.best_metric={name!r} is not among eval_fn's metrics {sorted(metrics)}"
                               f"{hint}. Fix: set best_metric to one of them.")
            value = metrics[name]
            better = (lambda a, b: a > b) if self.config.best_mode == "max" else (lambda a, b: a < b)
            improved = math.isfinite(value) and (self.best is None or better(value, self.best["value"]))
            if improved:
                self.best = {"metric": name, "value": value, "step": self.step}
                if self.is_main:
                    self._save_best()
        self._log({"event": "eval", "step": self.step, **metrics, "is_best": improved})
        self._timings["eval"] += time.perf_counter() - t0

    def _log(self, record: dict[str, Any]) -> None:
        if self._log_file is None:
            return
        line = json.dumps({k: _json_safe(v) for k, v in record.items()})
        self._log_file.write(line + "\n")
        self._log_file.flush()

    def _close(self, finished: bool) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # after an error on one rank the others may never reach a barrier: leave teardown to torchrun
        if finished and self._owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._owns_process_group = False

    # ----------------------------------------------------------------------------- checkpoints

    def _trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self._params}

    def _save_best(self) -> None:
        from safetensors.torch import save_file

        meta = {"step": str(self.best["step"]), "metric": self.best["metric"], "value": repr(self.best["value"])}
        tensors = self._trainable_state()
        atomic_write(self.best_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        rng = _rng_state()
        rngs = [rng]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng)
        if self.is_main:
            state = {
                "format": _CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                "batch_index": self.batch_index, "world_size": self.world_size,
                "trainable": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                "best": self.best, "counts": dict(self.counts), "bad_in_row": self._bad_in_row,
                "config": self.config.to_dict(),
            }
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        self._timings["checkpoint"] += time.perf_counter() - t0

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"'{path}' is not a checkpoint of this engine (format {state.get('format')!r}, "
                             f"expected {_CHECKPOINT_FORMAT}). Fix: pass a {CHECKPOINT_NAME} written by Trainer.fit.")
        if state["world_size"] != self.world_size:
            raise ValueError(f"'{path}' was written by a run with {state['world_size']} process(es); this run has "
                             f"{self.world_size}, so the data order cannot continue exactly. Fix: resume with "
                             f"{state['world_size']} process(es).")
        changed = {k: (v, state["config"].get(k)) for k, v in self.config.to_dict().items()
                   if k not in ("out_dir", "progress", "log_every") and state["config"].get(k) != v}
        if changed:
            warnings.warn(f"resuming '{path}' with a changed config (field: (now, saved)) {changed}; the data "
                          "order, optimizer state and learning rates continue from the checkpoint", stacklevel=3)
        saved = [g["param_names"] for g in state["optimizer"]["param_groups"]]
        ours = [g["param_names"] for g in self.param_groups]
        if saved != ours:
            raise ValueError(f"'{path}' was trained with other parameter groups: saved {saved}, now {ours}. "
                             "Fix: resume with the same strategy and lr_multipliers/no_decay/bias_lr_factor.")
        _load_named(self.model, state["trainable"], source=f"'{path}'", require_all_trainable=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.best, self.counts, self._bad_in_row = state["best"], dict(state["counts"]), state["bad_in_row"]
        _set_rng_state(state["rng"][self.rank])

    def _result(self, start_time: float, resumed_from: int | None) -> TrainResult:
        wall = time.perf_counter() - start_time
        return TrainResult(
            step=self.step, total_steps=self.total_steps, epoch=self._epoch_float(), **self.counts,
            resumed_from_step=resumed_from,
            best_metric=self.best["metric"] if self.best else None,
            best_value=self.best["value"] if self.best else None,
            best_step=self.best["step"] if self.best else None,
            last_losses=dict(self._last_losses), last_metrics=dict(self._last_metrics),
            out_dir=self.out_dir, checkpoint_path=self.checkpoint_path,
            best_path=self.best_path if self.best else None, log_path=self.log_path,
            wall_time_s=wall, train_time_s=wall - sum(self._timings.values()),
            eval_time_s=self._timings["eval"], checkpoint_time_s=self._timings["checkpoint"])


def _scalars(out: Mapping[str, Any]) -> dict[str, float]:
    """The entries of a loss dict that can be logged: numbers and one-element tensors."""
    found = {}
    for key, value in out.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            found[str(key)] = float(value.detach())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[str(key)] = float(value)
    return found


def _loss_tensor(out: Any) -> Tensor:
    if not isinstance(out, Mapping) or not isinstance(out.get("loss"), Tensor) or out["loss"].numel() != 1:
        got = {k: type(v).__name__ for k, v in out.items()} if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(f"loss_fn must return a dict with a scalar Tensor under 'loss' (other entries are logged); "
                        f"got {got}. Fix: return {{'loss': total, 'loss_box': ..., ...}}.")
    return out["loss"].reshape(())
