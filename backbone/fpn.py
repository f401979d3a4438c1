"""Feature pyramid (Lin et al. 2017) as GLIP builds it: P3-P5 from Swin stages, P6/P7 from P5.

maskrcnn_benchmark `modeling/backbone/fpn.py`: 1x1 lateral and 3x3 output convs with bias, no norm,
nearest top-down upsampling to the lateral's size; `LastLevelP6P7` with P6 = conv(P5) (not C5) and
P7 = conv(ReLU(P6)).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    def __init__(self, *, in_channels: tuple[int, ...], out_channels: int = 256, num_levels: int = 5):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.extra = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
            for _ in range(max(num_levels - len(in_channels), 0)))
        self.num_levels = num_levels
        self.out_channels = out_channels

    def forward(self, features: list[Tensor]) -> list[Tensor]:  # features: finest first, (B, C_i, H_i, W_i)
        inner = self.lateral[-1](features[-1])
        results = [self.output[-1](inner)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.lateral[index](features[index])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.output[index](inner))
        for index, conv in enumerate(self.extra):
            source = results[-1] if index == 0 else F.relu(results[-1])
            results.append(conv(source))
        return results[: self.num_levels]
