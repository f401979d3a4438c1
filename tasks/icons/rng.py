"""A per-scene random source whose sequence is the same on every machine and Python version.

Python guarantees only `random.Random(int).random()` to be reproducible across versions (its
`randrange`/`shuffle`/`choice` algorithms may change), so every draw here is built on `random()` alone.
Seeds are derived from (stream, seed, index) with SHA-256, so scene i never depends on scene i-1.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def derive_seed(*parts: object) -> int:
    """A 64-bit integer seed from any printable parts, e.g. ("pretrain", 0, 17)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


class Rng:
    def __init__(self, *parts: object):
        self._random = random.Random(derive_seed(*parts)).random

    def random(self) -> float:
        return self._random()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._random()

    def log_uniform(self, low: float, high: float) -> float:
        return math.exp(self.uniform(math.log(low), math.log(high)))

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (both inclusive)."""
        return min(high, low + int(self._random() * (high - low + 1)))

    def chance(self, p: float) -> bool:
        return self._random() < p

    def choice(self, items: Sequence[T]) -> T:
        return items[self.integer(0, len(items) - 1)]

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        """k distinct items (partial Fisher-Yates), in draw order."""
        pool = list(items)
        k = min(k, len(pool))
        for i in range(k):
            j = self.integer(i, len(pool) - 1)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def shuffle(self, items: Sequence[T]) -> list[T]:
        return self.sample(items, len(items))
