"""LoRA served unmerged: each sample of a batch gets its own adapter's low-rank term, y = W x + s * B (A x).

A LoRA tenant keeps A (r, in) and B (out, r) per target module, r x (in + out) numbers instead of a dense
copy of each target weight. While a batch runs, `grouped_lora` hooks the target modules of the shared base;
each hook adds, per group of samples of the same adapter, `scale * (x[rows] @ A.T) @ B.T` to the module's
output (lorax's segmented LoRA, and what peft's mixed-batch `adapter_names` does, on GLIP's own modules).
The hooks need batch-first inputs, which every linear layer of the fusion, DyHead and head has (the pool
refuses LoRA targets elsewhere); the shared weights are never modified.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor, nn


def _segments(factors: list) -> dict[str, list[tuple[Tensor, Tensor, float, Tensor]]]:
    """module -> [(A, B, scale, rows)] for the samples whose adapter targets that module."""
    rows: dict[int, list[int]] = defaultdict(list)
    by_id = {}
    for i, f in enumerate(factors):
        if f is not None:
            rows[id(f)].append(i)
            by_id[id(f)] = f
    out: dict[str, list] = defaultdict(list)
    for key, indices in rows.items():
        f = by_id[key]
        index = torch.tensor(indices, device=next(iter(f.down.values())).device)
        for module, down in f.down.items():
            out[module].append((down, f.up[module], f.scale, index))
    return out


@contextlib.contextmanager
def grouped_lora(model: nn.Module, factors: list):
    """Within the block, `model` adds sample i's LoRA term (factors[i], None = none) in every target module."""
    segments = _segments(factors)
    if not segments:
        yield
        return
    batch = len(factors)
    modules = dict(model.named_modules())
    handles = []

    def hook_for(name: str, parts):
        def hook(_module, args, output: Tensor) -> Tensor:
            x = args[0]
            if x.shape[0] != batch:
                raise RuntimeError(f"LoRA target {name} got a batch of {x.shape[0]} rows, expected {batch}")
            output = output.clone() if output.requires_grad else output
            for down, up, scale, index in parts:
                rows = x.index_select(0, index)  # (b, ..., in)
                delta = (rows.to(down.dtype) @ down.T) @ up.T  # (b, ..., out), rank r in between
                output.index_add_(0, index, (delta * scale).to(output.dtype))
            return output
        return hook

    try:
        for name, parts in segments.items():
            handles.append(modules[name].register_forward_hook(hook_for(name, parts)))
        yield
    finally:
        for handle in handles:
            handle.remove()
