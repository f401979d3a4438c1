"""GLIP's vision-language head: box regression, centerness and token-level alignment logits.

microsoft/GLIP `modeling/rpn/vldyhead.py` (VLDyHead, L645-859). The alignment logit
between anchor feature O and token feature P is
    S = O · Linear(normalize(P) / 2)ᵀ / exp(log_scale) + normalize(P) · bias_lang + bias0,
clamped to ±50000.

`score="cosine"` (an ablation option; neither GLIP nor glip-nano v2 uses it) scores cos(O, Linear(normalize(P) / 2)) / exp(log_scale) instead,
with log_scale starting at -log(10) and the projection's bias at 0: meant against the collapse of glip-nano's
text vectors, it named worse than the dot product in the ablations (model card); the parameter names and what each strategy trains stay GLIP's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


SCORES = ("dot", "cosine")
COSINE_INIT_SCALE = 10.0  # cosine logits start in [-10, 10] before the bias, as in the prototype


class Scale(nn.Module):
    """A learnable scalar per pyramid level on the box regression."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class VLHead(nn.Module):
    def __init__(self, *, channels: int, text_dim: int, num_levels: int, prior_prob: float = 0.01,
                 score: str = "dot"):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"head score {score!r}: choose one of {SCORES}")
        self.cosine = score == "cosine"
        self.bbox_pred = nn.Conv2d(channels, 4, 1)
        self.centerness = nn.Conv2d(channels, 1, 1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        self.dot_product_projection_text = nn.Linear(text_dim, channels)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - prior_prob) / prior_prob)]))
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        if self.cosine:
            with torch.no_grad():
                self.log_scale.fill_(-math.log(COSINE_INIT_SCALE))
            nn.init.zeros_(self.dot_product_projection_text.bias)

    def forward(self, levels: list[Tensor], text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """levels: DyHead outputs (B, C, h, w); text: (B, T, D) token features for the dot product.

        Returns box deltas (B, N, 4), centerness logits (B, N) and alignment logits (B, N, T) over all
        levels' anchors, finest level first, row-major within a level.
        """
        tokens = F.normalize(text, p=2, dim=-1)
        projected = self.dot_product_projection_text(tokens / 2.0)  # (B, T, C)
        if self.cosine:
            projected = F.normalize(projected, p=2, dim=-1)
        token_bias = tokens @ self.bias_lang + self.bias0  # (B, T)
        temperature = self.log_scale.exp()
        boxes, centerness, logits = [], [], []
        for level, feature in enumerate(levels):
            batch = feature.shape[0]
            boxes.append(self.scales[level](self.bbox_pred(feature)).flatten(2).transpose(1, 2))  # (B, hw, 4)
            centerness.append(self.centerness(feature).flatten(1))  # (B, hw)
            queries = feature.flatten(2).transpose(1, 2)  # (B, hw, C)
            if self.cosine:
                queries = F.normalize(queries, p=2, dim=-1)
            logit = torch.matmul(queries, projected.transpose(-1, -2)) / temperature + token_bias[:, None, :]
            logits.append(logit.clamp(-50000.0, 50000.0).reshape(batch, -1, text.shape[1]))
        return torch.cat(boxes, 1), torch.cat(centerness, 1), torch.cat(logits, 1)
