"""Anchors and the box coder of GLIP's ATSS head, with the legacy "+1" pixel conventions.

Follows maskrcnn_benchmark's `generate_anchors` (one square anchor per location, size
`base_size * stride`) and the BoxCoder in GLIP's `modeling/rpn/vldyhead.py` (weights 10, 10, 5, 5).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# log(1000/16): the largest allowed width/height log-ratio when decoding (from maskrcnn_benchmark).
_MAX_LOG_RATIO = math.log(1000.0 / 16)


def anchor_template(stride: int, size: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The (1, 4) template anchor of a level: centred at (stride-1)/2, side `size` in the "+1" convention."""
    centre = (stride - 1) / 2
    half = (size - 1) / 2
    return torch.tensor([[centre - half, centre - half, centre + half, centre + half]], device=device, dtype=dtype)


def grid_anchors(level_shapes: list[tuple[int, int]], strides: tuple[int, ...], base_size: int,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Anchors of all levels, concatenated finest first, row-major (y, x) within a level: (N, 4) xyxy.

    Made directly on `device` (the feature maps' device, as torchvision's AnchorGenerator does), in `dtype`
    (float32 by default: pixel coordinates of large images need more than bf16's 8 mantissa bits)."""
    per_level = []
    for (h, w), stride in zip(level_shapes, strides):
        template = anchor_template(stride, base_size * stride, device, dtype)
        ys = torch.arange(h, device=device, dtype=dtype) * stride
        xs = torch.arange(w, device=device, dtype=dtype) * stride
        shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 4)
        per_level.append(shifts + template)
    return torch.cat(per_level)


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) relative to anchors, and decodes them back (legacy +1 widths)."""

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)):
        self.weights = weights

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        widths = boxes[..., 2] - boxes[..., 0] + 1
        heights = boxes[..., 3] - boxes[..., 1] + 1
        return (boxes[..., 2] + boxes[..., 0]) / 2, (boxes[..., 3] + boxes[..., 1]) / 2, widths, heights

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """(…, 4) xyxy targets relative to (…, 4) anchors -> (…, 4) deltas."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        bx, by, bw, bh = self._centre_size(boxes)
        return torch.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                            ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """(…, 4) deltas relative to (…, 4) anchors -> (…, 4) xyxy boxes."""
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        ax, ay, aw, ah = self._centre_size(anchors)
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = torch.clamp(deltas[..., 2] / ww, max=_MAX_LOG_RATIO)
        dh = torch.clamp(deltas[..., 3] / wh, max=_MAX_LOG_RATIO)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)], dim=-1)
