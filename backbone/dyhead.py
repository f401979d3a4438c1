"""The DyHead tower (Dai et al. 2021) as GLIP interleaves it with deep fusion.

microsoft/GLIP `modeling/rpn/vldyhead.py` (DyConv, Conv3x3Norm, VLDyHead tower) and `layers/dyrelu.py`.
Each tower layer is
[fusion block → BERT layer on the text stream] (deep fusion only) → DyConv over all levels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from backbone.config import DyHeadConfig
from backbone.fusion import FusionBlock

DEFAULT_DEFORM_IMPL = DyHeadConfig.deform_impl  # the model config's default, so the two never differ


def h_sigmoid(x: Tensor) -> Tensor:
    return F.relu6(x + 3.0) / 6.0


def _tap_sample_coordinates(offset: Tensor, stride: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Pixel coordinates (y, x), each (B, 9, out_h, out_w), of every tap's sample: output pixel x stride +
    kernel position + the learnt (dy, dx), laid out per tap as in the CUDA kernel. Integer ranges are cast to
    `dtype` (ONNX Range has no float16; identical values in float32)."""
    batch, _, out_h, out_w = offset.shape
    taps = torch.arange(3, device=offset.device).to(dtype) - 1
    tap_y, tap_x = torch.meshgrid(taps, taps, indexing="ij")  # kernel positions, row-major like the weight
    rows = (torch.arange(out_h, device=offset.device).to(dtype) * stride)[None, :, None] + tap_y.reshape(9, 1, 1)
    cols = (torch.arange(out_w, device=offset.device).to(dtype) * stride)[None, None, :] + tap_x.reshape(9, 1, 1)
    offset = offset.view(batch, 9, 2, out_h, out_w)
    return rows + offset[:, :, 0], cols + offset[:, :, 1]


def deform_conv_im2col(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
                       stride: int) -> Tensor:
    """The same 3x3 modulated deformable conv (padding 1) as bilinear sampling + one matmul.

    grid_sample's zero padding reproduces the deformable kernel's treatment of samples outside the map
    (a corner outside contributes 0). On CPU this avoids torchvision's per-pixel column kernel.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = offset.shape[-2:]
    sample_y, sample_x = _tap_sample_coordinates(offset, stride, x.dtype)
    grid = torch.stack([(2 * sample_x + 1) / width - 1, (2 * sample_y + 1) / height - 1], dim=-1)
    columns = F.grid_sample(x, grid.view(batch, 9 * out_h, out_w, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (B, C, 9*out_h, out_w)
    columns = columns.view(batch, channels, 9, out_h * out_w).mul_(mask.reshape(batch, 1, 9, out_h * out_w))
    out = weight.reshape(weight.shape[0], channels * 9) @ columns.view(batch, channels * 9, out_h * out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(batch, -1, out_h, out_w)


def deform_conv_gather(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
                       stride: int) -> Tensor:
    """The same 3x3 modulated deformable conv (padding 1) as one weighted gather + one matmul.

    Each tap's bilinear sample is a weighted sum of four channel-last rows of x (embedding_bag, the mask
    folded into the corner weights): a sample reads four contiguous C-vectors next to its pixel, where
    grid_sample over NCHW strides across all C planes per sample. Corners outside the map get weight 0,
    the deformable kernel's zero padding. Returns channels-last memory in NCHW shape.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = offset.shape[-2:]
    # coordinates need float32 at least: bf16 resolves only whole pixels above 128
    coordinates = _tap_sample_coordinates(offset, stride, torch.promote_types(offset.dtype, torch.float32))
    sample_y, sample_x = (c.permute(0, 2, 3, 1) for c in coordinates)  # (B, out_h, out_w, 9): rows (pixel, tap)
    top, left = sample_y.floor(), sample_x.floor()
    frac_y, frac_x = sample_y - top, sample_x - left
    corner_y = torch.stack([top, top, top + 1, top + 1], dim=-1)
    corner_x = torch.stack([left, left + 1, left, left + 1], dim=-1)
    corner_weight = torch.stack([(1 - frac_y) * (1 - frac_x), (1 - frac_y) * frac_x,
                                 frac_y * (1 - frac_x), frac_y * frac_x], dim=-1)
    inside = (corner_y >= 0) & (corner_y <= height - 1) & (corner_x >= 0) & (corner_x <= width - 1)
    corner_weight = corner_weight * inside * mask.view(batch, 9, out_h, out_w).permute(0, 2, 3, 1)[..., None]
    image_start = (torch.arange(batch, device=x.device) * (height * width)).view(batch, 1, 1, 1, 1)
    index = (image_start + corner_y.clamp(0, height - 1).long() * width + corner_x.clamp(0, width - 1).long())
    table = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    columns = F.embedding_bag(index.view(-1, 4), table, per_sample_weights=corner_weight.view(-1, 4).to(table.dtype),
                              mode="sum")  # (B*out_h*out_w*9, C): rows ordered (pixel, tap)
    kernel = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * channels)  # (C_out, (tap, C))
    out = columns.view(batch, out_h * out_w, 9 * channels) @ kernel.t()
    if bias is not None:  # added after the matmul, so under autocast the bias stays float32 (as in im2col)
        out = out + bias
    return out.view(batch, out_h, out_w, -1).permute(0, 3, 1, 2)


DEFORM_IMPLEMENTATIONS = ("torchvision", "im2col", "gather")


def modulated_deform_conv(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
                          stride: int, impl: str = "torchvision") -> Tensor:
    """3x3 modulated deformable conv with the official CUDA kernel's handling of mismatched offsets.

    The official DyConv hands the offsets computed on level l to the conv applied on the coarser level
    l+1. The kernel has no shape check and reads them as raw memory: the first 18·h·w values of each
    image's flattened offset (9·h·w of the mask), where (h, w) is the output size. Pretrained weights
    were trained with this, so we reproduce it instead of resizing.
    """
    batch, _, height, width = x.shape
    out_h = (height + 2 - 3) // stride + 1
    out_w = (width + 2 - 3) // stride + 1
    if offset.shape[-2:] != (out_h, out_w):
        offset = offset.reshape(batch, -1)[:, : 18 * out_h * out_w].reshape(batch, 18, out_h, out_w)
        mask = mask.reshape(batch, -1)[:, : 9 * out_h * out_w].reshape(batch, 9, out_h, out_w)
    if impl == "gather":
        return deform_conv_gather(x, offset, mask, weight, bias, stride)
    if impl == "im2col":
        return deform_conv_im2col(x, offset, mask, weight, bias, stride)
    return torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)


class Conv3x3Norm(nn.Module):
    """(Deformable) 3x3 conv followed by GroupNorm."""

    def __init__(self, channels: int, stride: int, deformable: bool, groups: int,
                 deform_impl: str = DEFAULT_DEFORM_IMPL):
        super().__init__()
        if deform_impl not in DEFORM_IMPLEMENTATIONS:
            raise ValueError(f"deform_impl {deform_impl!r}: choose one of {DEFORM_IMPLEMENTATIONS}")
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)
        self.bn = nn.GroupNorm(groups, channels)
        self.stride = stride
        self.deformable = deformable
        self.deform_impl = deform_impl

    def forward(self, x: Tensor, offset: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if self.deformable:
            x = modulated_deform_conv(x, offset, mask, self.conv.weight, self.conv.bias, self.stride, self.deform_impl)
        else:
            x = self.conv(x)
        return self.bn(x)


def use_deform_impl(model: nn.Module, impl: str) -> None:
    """Run every deformable conv under `model` through `impl` (each computes the same conv)."""
    if impl not in DEFORM_IMPLEMENTATIONS:
        raise ValueError(f"deform_impl {impl!r}: choose one of {DEFORM_IMPLEMENTATIONS}")
    for module in model.modules():
        if isinstance(module, Conv3x3Norm):
            module.deform_impl = impl


class DyReLU(nn.Module):
    """Dynamic ReLU (Chen et al. 2020), K=2 with bias: out = max(x·a1 + b1, x·a2 + b2), coefficients from x."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, 4 * channels))

    def forward(self, x: Tensor) -> Tensor:
        coeffs = h_sigmoid(self.fc(x.mean(dim=(2, 3))))[:, :, None, None]  # (B, 4C, 1, 1)
        a1, b1, a2, b2 = torch.split(coeffs, self.channels, dim=1)
        # lambda_a = 2, init_a = (1, 0), init_b = (0, 0), as in layers/dyrelu.py
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.maximum(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class DyConv(nn.Module):
    """Scale-aware, spatial-aware and task-aware attention over all pyramid levels at once."""

    def __init__(self, channels: int, deformable: bool = True, groups: int = 16,
                 deform_impl: str = DEFAULT_DEFORM_IMPL):
        super().__init__()
        # DyConv[0]: from the coarser level (upsampled), [1]: same level, [2]: from the finer level (stride 2).
        self.DyConv = nn.ModuleList([Conv3x3Norm(channels, stride, deformable, groups, deform_impl)
                                     for stride in (1, 1, 2)])
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU(inplace=True))
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1) if deformable else None
        self.deformable = deformable

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        outputs = []
        for index, feature in enumerate(levels):
            args = {}
            if self.deformable:
                offset_mask = self.offset(feature)
                args = {"offset": offset_mask[:, :18], "mask": offset_mask[:, 18:].sigmoid()}
            branches = [self.DyConv[1](feature, **args)]
            if index > 0:
                branches.append(self.DyConv[2](levels[index - 1], **args))
            if index < len(levels) - 1:
                coarser = self.DyConv[0](levels[index + 1], **args)
                # F.upsample_bilinear in the official code, i.e. align_corners=True
                branches.append(F.interpolate(coarser, size=feature.shape[-2:], mode="bilinear", align_corners=True))
            # The attention-weighted mean of the branches, accumulated without stacking them (one full-size copy less)
            mixed = branches[0] * h_sigmoid(self.AttnConv(branches[0]))  # (B, C, H, W)
            for branch in branches[1:]:
                mixed = mixed + branch * h_sigmoid(self.AttnConv(branch))
            mixed = mixed / len(branches)
            outputs.append(self.relu(mixed))
        return outputs


def _text_layer(hidden_size: int, num_heads: int, intermediate_size: int) -> BertLayer:
    config = BertConfig(hidden_size=hidden_size, num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        attn_implementation="eager", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertLayer(config)


class DyHeadLayer(nn.Module):
    """One tower layer: optional fusion + BERT layer on the text stream, then DyConv on the image stream."""

    def __init__(self, *, channels: int, deformable: bool, groups: int, fusion: FusionBlock | None = None,
                 text_layer: BertLayer | None = None, deform_impl: str = DEFAULT_DEFORM_IMPL,
                 text_layer_scale: float | None = None):
        super().__init__()
        self.fusion = fusion
        self.text_layer = text_layer
        # an ablation option (None in GLIP and glip-nano): text + s·(BERT(text) - text), s per channel
        self.text_layer_gamma = (nn.Parameter(torch.full((text_layer.attention.self.all_head_size,), text_layer_scale))
                                 if text_layer is not None and text_layer_scale is not None else None)
        self.dyconv = DyConv(channels, deformable, groups, deform_impl)

    def forward(self, levels: list[Tensor], text: Tensor, text_mask: Tensor | None) -> tuple[list[Tensor], Tensor]:
        if self.fusion is not None:
            levels, text = self.fusion(levels, text, text_mask)
        if self.text_layer is not None:
            additive = None
            if text_mask is not None:  # an all-real mask adds exactly 0; testing for that would be a host sync
                additive = (1.0 - text_mask[:, None, None, :].to(text.dtype)) * torch.finfo(text.dtype).min
            updated = self.text_layer(text, attention_mask=additive)
            if isinstance(updated, tuple):
                updated = updated[0]
            text = updated if self.text_layer_gamma is None else text + self.text_layer_gamma * (updated - text)
        return self.dyconv(levels), text


class DyHeadTower(nn.Module):
    def __init__(self, layers: list[DyHeadLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @classmethod
    def build(cls, *, num_layers: int, channels: int, text_dim: int, deformable: bool, groups: int,
              fusion: bool, fusion_embed_dim: int, fusion_heads: int, fusion_dropout: float,
              text_layers: bool, text_heads: int, text_intermediate: int,
              deform_impl: str = DEFAULT_DEFORM_IMPL, text_layer_scale: float | None = None) -> "DyHeadTower":
        layers = []
        for _ in range(num_layers):
            block = FusionBlock(visual_dim=channels, text_dim=text_dim, embed_dim=fusion_embed_dim,
                                num_heads=fusion_heads, dropout=fusion_dropout,
                                init_gamma=1.0 / num_layers, init_gamma_text=text_layer_scale) if fusion else None
            text_layer = _text_layer(text_dim, text_heads, text_intermediate) if fusion and text_layers else None
            layers.append(DyHeadLayer(channels=channels, deformable=deformable, groups=groups, fusion=block,
                                      text_layer=text_layer, deform_impl=deform_impl,
                                      text_layer_scale=text_layer_scale))
        return cls(layers)

    def forward(self, levels: list[Tensor], text: Tensor, text_mask: Tensor | None) -> tuple[list[Tensor], Tensor]:
        for layer in self.layers:
            levels, text = layer(levels, text, text_mask)
        return levels, text
