"""Data for the engine: the deterministic, shardable, resumable sample order, and batches moved to the device."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


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
    """Tensors inside (nested) dicts, lists, tuples, named tuples and dataclasses, moved to `device`.

    The copy is non-blocking: from pinned host memory (the engine's DataLoader pins for CUDA) it overlaps
    with the compute already queued; a tensor already on `device` is returned as is.
    """
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
