"""The optimiser's parameter groups (GLIP `solver/build.py`) and the learning-rate schedule."""
from __future__ import annotations

import difflib
import math
from typing import Any

from torch import nn

from adapt.train.config import TrainConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
               nn.modules.batchnorm._NormBase)


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
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
    trainable = trainable_named_parameters(model)
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
