"""LoRA served as trained: each LoRA tenant's sample group runs with W + scale·B·A on every target it carries.

A LoRA tenant keeps A (r, in) and B (out, r) per target module, r x (in + out) numbers instead of a dense
copy of each target weight. While its group of samples runs, `folded_weights` builds the dense weights of
its targets (one (out, r) @ (r, in) matmul each, freed after the pass) and the engine passes them to
`torch.func.functional_call`, so the shared base is never modified and every path of the core sees them,
the fusion's folded order (which reads `.weight` directly) included. This is faster than the other exact
way, one pass for all LoRA tenants with per-sample hooks, which forces the fusion's direct order
(benchmarks/serve_lora_paths.py times both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adapt.adapter import fold_lora


@dataclass
class LoRAFactors:
    """One LoRA tenant's low-rank factors, kept at rank r: y = W x + scale * B (A x) per target module."""

    down: dict[str, Tensor]  # module -> A (r, in)
    up: dict[str, Tensor]  # module -> B (out, r)
    scale: float  # alpha / r

    @property
    def rank(self) -> int:
        return next(iter(self.down.values())).shape[0]


def folded_weights(weights: dict[str, Tensor], factors: LoRAFactors) -> dict[str, Tensor]:
    """{"<module>.weight": W + scale·B·A} for every target of `factors`; `weights` are the base's parameters.
    Built at the weights' precision even inside an autocast region (the forward then casts them as it casts W)."""
    device_type = next(iter(factors.down.values())).device.type
    with torch.autocast(device_type, enabled=False):
        return {f"{module}.weight": fold_lora(weights[f"{module}.weight"], down, factors.up[module], factors.scale)
                for module, down in factors.down.items()}
