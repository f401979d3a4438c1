"""Frozen-feature cache: backbone + FPN outputs computed once per training view and reused every epoch.

Strategies that freeze the visual backbone and FPN (prompt tuning, linear probing, LoRA on fusion/head)
spend most of a step there otherwise. Features live in memory up to a byte budget, then spill to
safetensors files in a folder. A view is an image plus a fixed augmentation (e.g. a horizontal flip).
Features stay on the device they were computed on (the model's); spilled ones are read back onto it.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


class FeatureCache:
    """Feature levels by view key: in memory up to `max_bytes`, then spilled to `spill_dir` (default: a temp folder)."""

    def __init__(self, max_bytes: int = 2 << 30, spill_dir: str | Path | None = None):
        self.max_bytes = max_bytes
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.memory: dict[object, list[Tensor]] = {}
        self.on_disk: dict[object, tuple[Path, torch.device]] = {}
        self.bytes_in_memory = 0
        self.hits = self.misses = 0

    def _disk_path(self, key) -> Path:
        if self._spill_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="adapt-features-")
            self._spill_dir = Path(self._tmp.name)
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir / f"{abs(hash(key)):x}-{len(self.on_disk)}.safetensors"

    def get(self, key, compute: Callable[[], list[Tensor]]) -> list[Tensor]:
        """The levels of view `key`; `compute()` (run under no_grad) makes them on a miss."""
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if key in self.on_disk:
            self.hits += 1
            path, device = self.on_disk[key]
            stored = load_file(str(path), device=str(device))
            return [stored[str(i)] for i in range(len(stored))]
        self.misses += 1
        with torch.no_grad():
            levels = [lvl.detach() for lvl in compute()]
        size = sum(lvl.numel() * lvl.element_size() for lvl in levels)
        if self.bytes_in_memory + size <= self.max_bytes:
            self.memory[key] = levels
            self.bytes_in_memory += size
        else:
            path = self._disk_path(key)
            save_file({str(i): lvl.contiguous().cpu() for i, lvl in enumerate(levels)}, str(path))
            self.on_disk[key] = (path, levels[0].device)
        return levels

    def stats(self) -> dict:
        return {"entries_memory": len(self.memory), "entries_disk": len(self.on_disk),
                "bytes_memory": self.bytes_in_memory, "hits": self.hits, "misses": self.misses}


def stack_levels(per_image: list[list[Tensor]]) -> list[Tensor]:
    """Batch per-image feature levels (1, C, h, w), zero-padding each level to the largest h, w."""
    batched = []
    for level in zip(*per_image):
        height = max(t.shape[-2] for t in level)
        width = max(t.shape[-1] for t in level)
        padded = [torch.nn.functional.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2])) for t in level]
        batched.append(torch.cat(padded))
    return batched


def own_padding(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """An image cropped to its own 32-multiple canvas: its features must not depend on its batch-mates."""
    height, width = (-(-size[0] // 32) * 32, -(-size[1] // 32) * 32)
    return pixels[..., :height, :width]
