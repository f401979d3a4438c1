"""GLIP's deep fusion: bi-directional image<->text cross-attention (X-VLM style "MHA-B").

microsoft/GLIP `utils/fuse_helper.py` (BiMultiHeadAttention, BiAttentionBlockForCheckpoint).
All pyramid levels are flattened into one visual sequence. The
residual wraps the LayerNorm'ed streams (v = LN(v); v = v + γ·Δv), so a block's output replaces the
stream by its normalised version. Text runs over the real tokens only; padding is masked, which the
gives the same result as the official code's 256 padded positions (checked against its outputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _calls_its_weight(linear: nn.Module) -> bool:
    """Whether calling `linear` is exactly x·Wᵀ + b with its `.weight` and `.bias`, which the folded order reads
    directly. A wrapping layer (e.g. peft's LoRA) or a forward hook changes what the call returns, and the folded
    order would silently skip it: those take the direct order, which calls every projection."""
    return type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks)


class BiMultiHeadAttention(nn.Module):
    """Visual tokens attend to text tokens and text tokens to visual tokens, through shared logits."""

    def __init__(self, *, visual_dim: int, text_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"fusion embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(visual_dim, embed_dim)
        self.l_proj = nn.Linear(text_dim, embed_dim)
        self.values_v_proj = nn.Linear(visual_dim, embed_dim)
        self.values_l_proj = nn.Linear(text_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, visual_dim)
        self.out_l_proj = nn.Linear(embed_dim, text_dim)
        for linear in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                       self.out_l_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor) -> Tensor:  # (B, N, E) -> (B, heads, N, head_dim)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, visual: Tensor, text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """visual: (B, Nv, Dv); text: (B, T, Dt); text_mask: (B, T), 1 = real token. Returns (Δv, Δl)."""
        if all(_calls_its_weight(linear) for linear in (self.v_proj, self.values_v_proj, self.out_v_proj)):
            return self._forward_factored(visual, text, text_mask)
        return self._forward_direct(visual, text, text_mask)

    def _weights_over_text(self, logits: Tensor, text_mask: Tensor | None) -> Tensor:
        """Visual queries' attention over the text tokens; logits (B, ·, ·, T) in either path's layout."""
        if text_mask is not None:  # padding tokens get no weight (always masked: testing for padding is a host sync)
            logits = logits.masked_fill(~text_mask[:, None, None, :].bool(), float("-inf"))
        return F.dropout(logits.softmax(-1), self.dropout, self.training)

    def _forward_direct(self, visual: Tensor, text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The official order: project every visual token to embed_dim, then attend per head."""
        batch, num_visual, _ = visual.shape
        query = self._heads(self.v_proj(visual) * self.scale)  # (B, h, Nv, hd)
        key = self._heads(self.l_proj(text))  # (B, h, T, hd)
        value_visual = self._heads(self.values_v_proj(visual))  # (B, h, Nv, hd)
        value_text = self._heads(self.values_l_proj(text))  # (B, h, T, hd)
        # Both directions share the logits A = q·kᵀ (B, h, Nv, T), computed once. With T the real prompt tokens
        # (tens), A is small, so two plain softmax-matmuls over it cost less than two fused attention calls, which
        # would each recompute it. The ±50000 clamps
        # of the official code never bind in fp32, and subtracting the row max before the text-side softmax is
        # what softmax does anyway.
        logits = query @ key.transpose(-1, -2)
        weights_visual = self._weights_over_text(logits, text_mask)
        delta_visual = weights_visual @ value_text  # (B, h, Nv, hd)
        # Text queries attend over all visual tokens of all levels (padded image area included, as upstream).
        weights_text = F.dropout(logits.transpose(-1, -2).softmax(-1), self.dropout, self.training)
        delta_text = weights_text @ value_visual  # (B, h, T, hd)
        delta_visual = delta_visual.transpose(1, 2).reshape(batch, num_visual, -1)
        delta_text = delta_text.transpose(1, 2).reshape(batch, text.shape[1], -1)
        return self.out_v_proj(delta_visual), self.out_l_proj(delta_text)

    def _forward_factored(self, visual: Tensor, text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The same attention with the visual projections folded into the few text tokens.

        The three visual projections are linear, so they can act on the h·T text-side columns instead of the Nv
        visual tokens: logits = V·(s·W_qᵀ·kᵀ) + s·b_q·kᵀ, Δv = A_v·(v_l·W_o,h) + b_o, Δl_h = (A_l·V)·W_v,hᵀ + rowsum(A_l)·b_v.
        With h·T ≪ embed_dim (GLIP-T: 8 heads x 11 tokens vs 2048) this is ~20x fewer FLOPs and never builds an
        (Nv, embed_dim) tensor; in float32 it equals the direct order to rounding.
        """
        batch, num_visual, visual_dim = visual.shape
        heads, head_dim, tokens = self.num_heads, self.head_dim, text.shape[1]
        key = self._heads(self.l_proj(text))  # (B, h, T, hd)
        value_text = self._heads(self.values_l_proj(text))  # (B, h, T, hd)
        query_weight = self.v_proj.weight.view(heads, head_dim, visual_dim)
        # (B, Dv, h·T) and (B, 1, h·T): the query projection applied to the keys, scale included
        key_in_visual = torch.einsum("hdv,bhtd->bvht", query_weight, key).reshape(batch, visual_dim, heads * tokens)
        key_bias = torch.einsum("hd,bhtd->bht", self.v_proj.bias.view(heads, head_dim), key)
        logits = torch.baddbmm(key_bias.reshape(batch, 1, heads * tokens), visual, key_in_visual, alpha=self.scale,
                               beta=self.scale).view(batch, num_visual, heads, tokens)
        weights_visual = self._weights_over_text(logits, text_mask)  # (B, Nv, h, T)
        # Text queries attend over all visual tokens of all levels (padded image area included, as upstream).
        weights_text = F.dropout(logits.softmax(1), self.dropout, self.training)  # (B, Nv, h, T), over Nv
        # Δv: the output projection applied to the text values first, (B, h·T, Dv)
        value_text_out = torch.einsum("bhtd,vhd->bhtv", value_text, self.out_v_proj.weight.view(visual_dim, heads,
                                                                                                head_dim))
        delta_visual = torch.baddbmm(self.out_v_proj.bias.view(1, 1, visual_dim),
                                     weights_visual.reshape(batch, num_visual, heads * tokens),
                                     value_text_out.reshape(batch, heads * tokens, visual_dim))
        # Δl: attend over the raw visual tokens, then project the T pooled vectors (dropout breaks rowsum = 1)
        pooled = weights_text.reshape(batch, num_visual, heads * tokens).transpose(1, 2) @ visual  # (B, h·T, Dv)
        value_weight = self.values_v_proj.weight.view(heads, head_dim, visual_dim)
        delta_text = torch.einsum("bhtv,hdv->bthd", pooled.view(batch, heads, tokens, visual_dim), value_weight)
        delta_text = delta_text + weights_text.sum(1).transpose(1, 2)[..., None] * \
            self.values_v_proj.bias.view(heads, head_dim)
        return delta_visual, self.out_l_proj(delta_text.reshape(batch, tokens, heads * head_dim))


class FusionBlock(nn.Module):
    """One fusion step over all pyramid levels: (levels, text) -> (levels, text)."""

    def __init__(self, *, visual_dim: int, text_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1,
                 init_gamma: float = 1 / 6, init_gamma_text: float | None = None):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(visual_dim)
        self.layer_norm_l = nn.LayerNorm(text_dim)
        self.attn = BiMultiHeadAttention(visual_dim=visual_dim, text_dim=text_dim, embed_dim=embed_dim,
                                         num_heads=num_heads, dropout=dropout)
        self.gamma_v = nn.Parameter(torch.full((visual_dim,), init_gamma))
        self.gamma_l = nn.Parameter(torch.full((text_dim,), init_gamma if init_gamma_text is None else init_gamma_text))

    def forward(self, levels: list[Tensor], text: Tensor, text_mask: Tensor | None) -> tuple[list[Tensor], Tensor]:
        shapes = [lvl.shape[-2:] for lvl in levels]
        visual = torch.cat([lvl.flatten(2) for lvl in levels], dim=2).transpose(1, 2)  # (B, ΣHW, C)
        visual = self.layer_norm_v(visual)
        text = self.layer_norm_l(text)
        delta_visual, delta_text = self.attn(visual, text, text_mask)
        visual = visual + self.gamma_v * delta_visual
        text = text + self.gamma_l * delta_text
        visual = visual.transpose(1, 2)  # (B, C, ΣHW)
        out, start = [], 0
        for h, w in shapes:
            out.append(visual[:, :, start:start + h * w].reshape(visual.shape[0], -1, h, w))
            start += h * w
        return out, text
