"""GLIP (Li et al., CVPR 2022): detection as phrase grounding with deep image-text fusion.

Stages (one module each): Swin → FPN gives the visual features O0; BERT gives the prompt features P0;
the DyHead tower fuses them; the VL head scores every anchor against every prompt token.
Two hooks make adaptation cheap: `encode_prompt` computes P0 once per prompt (adapters may edit it
and callers may skip the language backbone entirely), and `encode_images` computes O0 once per image
batch (shared by every prompt). Loss and post-processing live outside the forward.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from backbone.anchors import grid_anchors
from backbone.checkpoints import read_config, read_saved_state, resolve_weights
from backbone.config import GLIPConfig
from backbone.convert import infer_config, load_official_into, read_official
from backbone.dyhead import DyHeadTower
from backbone.fpn import FPN
from backbone.head import VLHead
from backbone.outputs import HeadOutputs, PromptFeatures, VisualFeatures
from backbone.swin import SwinBackbone
from backbone.text import TextEncoder


class GLIP(nn.Module):
    def __init__(self, *, swin: SwinBackbone, fpn: FPN, text: TextEncoder | None, dyhead: DyHeadTower, head: VLHead,
                 strides: tuple[int, ...], anchor_base_size: int, deep_fusion: bool, config: GLIPConfig | None = None):
        super().__init__()
        self.swin = swin
        self.fpn = fpn
        self.text = text
        self.dyhead = dyhead
        self.head = head
        self.strides = strides
        self.anchor_base_size = anchor_base_size
        self.deep_fusion = deep_fusion
        self.config = config  # kept for save/load and the processor; modules never read it
        self._anchor_cache: dict[tuple, Tensor] = {}

    @classmethod
    def from_config(cls, config: GLIPConfig, with_text: bool = True) -> "GLIP":
        swin = SwinBackbone.from_config(config.swin)
        fpn = FPN(in_channels=swin.out_channels, out_channels=config.fpn.out_channels,
                  num_levels=config.fpn.num_levels)
        text = TextEncoder.from_config(config.text) if with_text else None
        dyhead = DyHeadTower.build(
            num_layers=config.dyhead.num_layers, channels=config.fpn.out_channels, text_dim=config.text.hidden_size,
            deformable=config.dyhead.deformable, groups=config.dyhead.group_norm_groups,
            fusion=config.fusion.enabled, fusion_embed_dim=config.fusion.embed_dim,
            fusion_heads=config.fusion.num_heads, fusion_dropout=config.fusion.dropout,
            text_layers=config.fusion.text_layers, text_heads=config.text.num_heads,
            text_intermediate=config.text.intermediate_size, deform_impl=config.dyhead.deform_impl,
            text_layer_scale=config.fusion.text_layer_scale)
        head = VLHead(channels=config.fpn.out_channels, text_dim=config.text.hidden_size,
                      num_levels=config.fpn.num_levels, prior_prob=config.head.prior_prob, score=config.head.score)
        return cls(swin=swin, fpn=fpn, text=text, dyhead=dyhead, head=head, strides=config.strides,
                   anchor_base_size=config.head.anchor_base_size, deep_fusion=config.fusion.enabled, config=config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, with_text: bool = True) -> "GLIP":
        """The one loader: glip-nano/glip-nano-a (embedded), a converted .safetensors (config in its header), an
        official GLIP .pth (mapped strictly by `backbone.convert`), or a file of the Hub repo GLIPModel/GLIP.

        `with_text=False` leaves out the language backbone (for callers that bring their own prompt features).
        """
        path = resolve_weights(name_or_path)
        config = read_config(path)
        if config is not None:
            model = cls.from_config(config, with_text=with_text)
            model.load_state_dict(read_saved_state(path, model.state_dict()), strict=True)
            return model
        official = read_official(path)
        config = infer_config(official)
        model = cls.from_config(config)
        load_official_into(model, official, config)
        if not with_text:
            model.text = None
        return model

    # --- hooks -------------------------------------------------------------------------------------------

    def encode_prompt(self, input_ids: Tensor, attention_mask: Tensor) -> PromptFeatures:
        """P0 for a batch of tokenized prompts (B, T)."""
        if self.text is None:
            raise RuntimeError("this GLIP was built without its language backbone; pass precomputed "
                               "PromptFeatures (e.g. from a prompt adapter) instead of token ids")
        return self.text(input_ids, attention_mask)

    def encode_images(self, pixel_values: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> VisualFeatures:
        """O0 for a batch of padded images (B, 3, H, W); `image_sizes` are the unpadded (h, w)."""
        if pixel_values.shape[-2] % 32 or pixel_values.shape[-1] % 32:
            raise ValueError(f"image batch of size {tuple(pixel_values.shape[-2:])} is not padded to a multiple of "
                             "32; use GLIPProcessor.preprocess")
        if image_sizes is None:
            image_sizes = [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
        return VisualFeatures(levels=self.fpn(self.swin(pixel_values)), image_sizes=list(image_sizes))

    def anchors(self, level_shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
        key = (tuple(level_shapes), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = grid_anchors(level_shapes, self.strides, self.anchor_base_size, device)
        return self._anchor_cache[key]

    def fuse_and_predict(self, visual: VisualFeatures, prompt: PromptFeatures) -> HeadOutputs:
        """Deep fusion + head for images with their prompts (one prompt for all, or one per image)."""
        prompt = prompt.expand(visual.batch_size)
        mask = prompt.mask
        levels, fused_text = self.dyhead(visual.levels, prompt.hidden, mask)
        # With deep fusion the head scores the fused text; without it, BERT's masked output.
        text_for_head = fused_text if self.deep_fusion else prompt.embedded
        box_deltas, centerness, logits = self.head(levels, text_for_head)
        level_shapes = [tuple(lvl.shape[-2:]) for lvl in levels]
        return HeadOutputs(box_deltas=box_deltas, centerness=centerness, alignment_logits=logits,
                           anchors=self.anchors(level_shapes, box_deltas.device), level_shapes=level_shapes,
                           image_sizes=visual.image_sizes, text_mask=mask, fused_text=fused_text,
                           fused_visual=levels)

    def forward(self, prompt: PromptFeatures, pixel_values: Tensor | None = None,
                image_sizes: list[tuple[int, int]] | None = None, visual: VisualFeatures | None = None) -> HeadOutputs:
        if visual is None:
            if pixel_values is None:
                raise ValueError("GLIP.forward needs pixel_values or precomputed visual features")
            visual = self.encode_images(pixel_values, image_sizes)
        return self.fuse_and_predict(visual, prompt)
