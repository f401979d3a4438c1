"""Swin Transformer trunk for GLIP, built from timm's modules.

GLIP's Swin (microsoft/GLIP `modeling/backbone/swint.py`, after Liu et al. 2021) differs from
timm's in two ways that change every activation:
  * a block zero-pads its map to a multiple of the window *before* the cyclic shift, and shifts
    on every odd block whatever the map size (timm rolls first and drops the shift on small maps);
  * each output stage passes its own LayerNorm (`norm1..norm3`; stage 0's is the identity).
We keep timm's modules and weights layout and replace only the block's attention step.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
from torch import Tensor, nn

from backbone.config import SwinConfig


def _pad_then_shift_attention(block, x: Tensor) -> Tensor:
    """GLIP's order inside a Swin block: pad to whole windows, then roll; mask built on the padded grid."""
    _, height, width, channels = x.shape
    win_h, win_w = block.window_size
    pad_h = (win_h - height % win_h) % win_h
    pad_w = (win_w - width % win_w) % win_w
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # padded tokens are zeros after norm1, not masked as keys
    padded_h, padded_w = height + pad_h, width + pad_w
    shift_h, shift_w = block.shift_size
    shifted = any(block.shift_size)
    if shifted:
        x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        mask = block.get_attn_mask(x)  # (num_windows, area, area) with -100 across shifted regions
    else:
        mask = None
    windows = window_partition(x, block.window_size).view(-1, win_h * win_w, channels)
    windows = block.attn(windows, mask=mask)
    x = window_reverse(windows.view(-1, win_h, win_w, channels), block.window_size, padded_h, padded_w)
    if shifted:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


class SwinBackbone(nn.Module):
    """Swin trunk returning the normed outputs of `out_stages` as NCHW maps (strides 8, 16, 32 for GLIP)."""

    def __init__(self, *, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.2, out_stages: tuple[int, ...] = (1, 2, 3)):
        super().__init__()
        self.body = SwinTransformer(
            img_size=224, patch_size=4, in_chans=3, num_classes=0, embed_dim=embed_dim, depths=depths,
            num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=True,
            drop_path_rate=drop_path_rate, always_partition=True, strict_img_size=False,
        )
        self.body.norm = nn.Identity()  # GLIP has per-stage norms instead of timm's final norm
        for stage in self.body.layers:
            for block in stage.blocks:
                block._attn = types.MethodType(_pad_then_shift_attention, block)
        self.out_stages = out_stages
        channels = [embed_dim * 2**i for i in range(len(depths))]
        self.norms = nn.ModuleDict({str(i): nn.LayerNorm(channels[i]) for i in out_stages if i > 0})
        self.out_channels = tuple(channels[i] for i in out_stages)

    @classmethod
    def from_config(cls, config: SwinConfig) -> "SwinBackbone":
        return cls(embed_dim=config.embed_dim, depths=config.depths, num_heads=config.num_heads,
                   window_size=config.window_size, mlp_ratio=config.mlp_ratio,
                   drop_path_rate=config.drop_path_rate, out_stages=config.out_stages)

    def forward(self, pixels: Tensor) -> list[Tensor]:  # pixels: (B, 3, H, W), H and W multiples of 32
        x = self.body.patch_embed(pixels)  # (B, H/4, W/4, C) NHWC
        outputs = []
        for index, stage in enumerate(self.body.layers):
            x = stage(x)  # timm merges patches at the start of the next stage: x is stage `index`'s output
            if index in self.out_stages:
                normed = self.norms[str(index)](x) if str(index) in self.norms else x
                outputs.append(normed.permute(0, 3, 1, 2).contiguous())
            if index == max(self.out_stages):
                break
        return outputs
