"""torchrun process groups and the device each process trains on."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from backbone.device import resolve_device


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


def resolve_training_device(requested: str | None, world_size: int) -> torch.device:
    """`backbone.device.resolve_device`, plus this process's own GPU under torchrun ("cuda" -> "cuda:<local rank>")."""
    device = resolve_device(requested)
    if device.type == "cuda" and device.index is None:
        index = dist.get_node_local_rank(fallback_rank=0) if world_size > 1 else torch.cuda.current_device()
        device = torch.device("cuda", index)
    return device


def broadcast(obj: Any, world_size: int) -> Any:
    """Rank 0's `obj` on every rank (no-op for one process)."""
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_across(value: int, world_size: int, device: torch.device) -> int:
    """The largest `value` over all ranks (no-op, and no device sync, for one process)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
