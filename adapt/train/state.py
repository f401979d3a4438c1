"""Run state on disk and in the process: checkpoints, best weights, the metrics log, RNG states, seeding.

Files written to a run's `out_dir` (by rank 0 only):
    checkpoint.pt      trainable tensors by name, optimizer, scheduler, scaler, step, sampler
                       position, RNG states of every rank, best metric, counters; one file,
                       replaced atomically
    best.safetensors   trainable tensors at the best evaluation (metadata: step, metric, value)
    metrics.jsonl      one JSON object per line, flushed per line
    train_config.json  the TrainConfig of the run
"""
from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import glip_io
from glip_io import atomic_write
from torch import Tensor, nn

from adapt.train.optim import unwrap_model

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.safetensors"
LOG_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"
CHECKPOINT_FORMAT = 1


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



def check_writable(out_dir: Path) -> str | None:
    """None if `out_dir` can be created and written, else the error message."""
    try:
        glip_io.check_writable(out_dir)
    except OSError as e:
        return (f"out_dir '{out_dir}' is not writable ({e.strerror or e}); training did not start. "
                "Fix: choose another folder or make this one writable.")
    return None


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": keep the file valid JSON
    return value


def trim_log(path: Path, step: int) -> None:
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


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def load_named(model: nn.Module, tensors: Mapping[str, Tensor], *, source: str,
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
    load_named(model, tensors, source=f"'{path}'", require_all_trainable=require_all_trainable)
    return sorted(tensors)


def read_checkpoint(path: Path, *, world_size: int, config_dict: dict[str, Any],
                    param_names: list[list[str]]) -> dict[str, Any]:
    """A checkpoint written by `Trainer.fit`, checked against this run (format, processes, parameter groups)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' is not a checkpoint of this engine (format {state.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT}). Fix: pass a {CHECKPOINT_NAME} written by Trainer.fit.")
    if state["world_size"] != world_size:
        raise ValueError(f"'{path}' was written by a run with {state['world_size']} process(es); this run has "
                         f"{world_size}, so the data order cannot continue exactly. Fix: resume with "
                         f"{state['world_size']} process(es).")
    changed = {k: (v, state["config"].get(k)) for k, v in config_dict.items()
               if k not in ("out_dir", "progress", "log_every", "report_to") and state["config"].get(k) != v}
    if changed:
        warnings.warn(f"resuming '{path}' with a changed config (field: (now, saved)) {changed}; the data "
                      "order, optimizer state and learning rates continue from the checkpoint", stacklevel=4)
    saved = [g["param_names"] for g in state["optimizer"]["param_groups"]]
    if saved != param_names:
        raise ValueError(f"'{path}' was trained with other parameter groups: saved {saved}, now {param_names}. "
                         "Fix: resume with the same strategy and lr_multipliers/no_decay/bias_lr_factor.")
    return state


def trainable_state(params: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """CPU copies of the trainable tensors, by name (what checkpoints and best.safetensors hold)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params}


def save_best(path: Path, params: list[tuple[str, Tensor]], best: dict[str, Any]) -> None:
    """best.safetensors: the trainable tensors, with the step, metric and value in the header."""
    from safetensors.torch import save_file

    meta = {"step": str(best["step"]), "metric": best["metric"], "value": repr(best["value"])}
    tensors = trainable_state(params)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
