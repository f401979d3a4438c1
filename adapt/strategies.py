"""Adaptation strategies: thin layers over the GLIP core's hooks, each naming exactly what it trains.

Semantics follow the official code (microsoft/GLIP `tools/finetune.py`, `tuning_highlevel_override`):
  prompt-tune   "language_prompt_v2": a zero-initialised offset ΔP0 added to P0 (both `hidden` and
                `embedded`) is the only trainable tensor; everything else frozen and in eval mode.
  linear-probe  the official 9 head tensors; backbone, FPN and BERT frozen and in eval mode (the DyHead
                stays in train mode as upstream, so fusion dropout is active while training).
  lora          beyond the paper: LoRA (peft) on the fusion attention projections and the head's linear layer.
  finetune      everything but the patch embedding and Swin stage 1 (with its patch merging); BERT at lr/10.
Each class declares its strategy as `spec` (adapt.strategy_spec: defaults, adapter tensors, serving, export).
Every strategy runs on a fixed task prompt, so with a frozen BERT P0 is computed once. A step takes the one
training batch (`adapt.grounding.GroundingBatch`, already on the model's device); strategies with a frozen
backbone + FPN compute each training view's features there, per image, from a `FeatureCache` when one is
attached (cached == uncached exactly: both run each view on its own 32-multiple canvas).
"""
from __future__ import annotations

import functools
import re

import torch
from torch import Tensor, nn

from adapt.cache import FeatureCache, own_padding, stack_levels
from adapt.grounding import GroundingBatch
from adapt.strategy_spec import LINEAR_PROBE_PARAMETERS, STRATEGIES, StrategySpec
from backbone.model import GLIP
from backbone.outputs import HeadOutputs, PromptFeatures, VisualFeatures
from backbone.processor import TokenizedPrompt

# Official FREEZE_CONV_BODY_AT 2: patch embedding and stage 1, including the patch merging that ends it
# (timm places that merging at the start of stage 2).
FINETUNE_FROZEN_PREFIXES = ("swin.body.patch_embed.", "swin.body.layers.0.", "swin.body.layers.1.downsample.")
LORA_DEFAULT_TARGETS = r".*(fusion\.attn\.(v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)" \
                       r"|head\.dot_product_projection_text)"


class AdaptedGLIP(nn.Module):
    """A GLIP with one strategy attached, on one task prompt. `forward(batch) -> HeadOutputs`.

    A subclass sets `spec` (its StrategySpec) and marks what it trains; the adapter tensors follow from the spec.
    """

    spec: StrategySpec
    frozen_visual = True  # backbone + FPN frozen: their features may be cached

    def __init__(self, glip: GLIP, prompt: TokenizedPrompt):
        super().__init__()
        self.glip = glip
        self.task_prompt = prompt
        self.register_buffer("input_ids", prompt.input_ids.clone(), persistent=False)
        self.register_buffer("attention_mask", prompt.attention_mask.clone(), persistent=False)
        glip.requires_grad_(False)
        self._p0: PromptFeatures | None = None
        self.feature_cache: FeatureCache | None = None

    @classmethod
    def from_tune_config(cls, glip: GLIP, prompt: TokenizedPrompt, config) -> "AdaptedGLIP":
        """The strategy for one run of `adapt.tune` (a subclass with options reads them from the TuneConfig)."""
        return cls(glip, prompt)

    @property
    def name(self) -> str:
        return self.spec.name

    def use_feature_cache(self, cache: FeatureCache | None) -> None:
        """Reuse the frozen backbone + FPN features of each training view (None turns the cache off)."""
        if cache is not None and not self.frozen_visual:
            raise ValueError(f"{self.name} trains the visual backbone, so its features cannot be cached; "
                             "use cache_features=False (--no-cache) for it")
        self.feature_cache = cache

    def base_prompt(self) -> PromptFeatures:
        """P0 of the task prompt from the frozen language backbone, computed once."""
        if self._p0 is None or self._p0.hidden.device != self.input_ids.device:  # computed anew after .to()
            with torch.no_grad():
                self._p0 = self.glip.encode_prompt(self.input_ids, self.attention_mask).detach()
        return self._p0

    def prompt_features(self) -> PromptFeatures:
        return self.base_prompt()

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "AdaptedGLIP":
        super().train(mode)
        self.glip.eval()  # frozen parts never train (no dropout, no drop-path)
        return self

    def visual_features(self, batch: GroundingBatch) -> VisualFeatures:
        """Backbone + FPN on the batch's device: per training view when frozen (cached or not), else batched."""
        if not (self.frozen_visual and batch.keys is not None):
            return self.glip.encode_images(batch.pixel_values, batch.image_sizes)
        levels = []
        for i, (key, size) in enumerate(zip(batch.keys, batch.image_sizes)):
            pixels = own_padding(batch.pixel_values[i:i + 1], size)
            compute = functools.partial(self._frozen_levels, pixels, size)
            levels.append(self.feature_cache.get(key, compute) if self.feature_cache is not None else compute())
        return VisualFeatures(stack_levels(levels), batch.image_sizes)

    @torch.no_grad()
    def _frozen_levels(self, pixels: Tensor, size: tuple[int, int]) -> list[Tensor]:
        return self.glip.encode_images(pixels, [size]).levels

    def forward(self, batch: GroundingBatch) -> HeadOutputs:
        visual = self.visual_features(batch)
        return self.glip.fuse_and_predict(visual, self.prompt_features().expand(visual.batch_size))

    def adapter_tensors(self) -> dict[str, dict[str, Tensor]]:
        """{"weights": {...}, "lora": {...}} to store beside the final prompt: the base tensors the spec declares."""
        weights = {k: v for k, v in self.glip.state_dict().items() if self.spec.carries_weight(k)}
        return {"weights": weights, "lora": {}}


class PromptTuning(AdaptedGLIP):
    spec = STRATEGIES["prompt-tune"]

    def __init__(self, glip: GLIP, prompt: TokenizedPrompt):
        super().__init__(glip, prompt)
        # Official `tunable_linear` (1000 x 768 table, first T rows used); fusion runs over real tokens
        # only here, so the offset covers exactly the prompt's T tokens.
        self.delta_p0 = nn.Parameter(torch.zeros(prompt.num_tokens, glip.config.text.hidden_size))

    def prompt_features(self) -> PromptFeatures:
        p0 = self.base_prompt()
        return PromptFeatures(p0.hidden + self.delta_p0, p0.embedded + self.delta_p0, p0.mask)


class LinearProbe(AdaptedGLIP):
    spec = STRATEGIES["linear-probe"]

    def __init__(self, glip: GLIP, prompt: TokenizedPrompt):
        super().__init__(glip, prompt)
        parameters = dict(glip.named_parameters())
        for name in LINEAR_PROBE_PARAMETERS:
            parameters[name].requires_grad_(True)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.glip.dyhead.train(mode)  # upstream keeps the DyHead (fusion dropout) in train mode
        return self


class FullFinetune(AdaptedGLIP):
    spec = STRATEGIES["finetune"]
    frozen_visual = False

    def __init__(self, glip: GLIP, prompt: TokenizedPrompt):
        super().__init__(glip, prompt)
        for name, parameter in glip.named_parameters():
            parameter.requires_grad_(not name.startswith(FINETUNE_FROZEN_PREFIXES))

    def prompt_features(self) -> PromptFeatures:  # BERT trains too: recompute every step
        return self.glip.encode_prompt(self.input_ids, self.attention_mask)

    def train(self, mode: bool = True) -> "FullFinetune":
        nn.Module.train(self, mode)
        self.glip.swin.body.patch_embed.eval()
        self.glip.swin.body.layers[0].eval()
        return self


class LoRA(AdaptedGLIP):
    spec = STRATEGIES["lora"]

    def __init__(self, glip: GLIP, prompt: TokenizedPrompt, *, r: int = 8, alpha: float = 16.0,
                 target_modules: str = LORA_DEFAULT_TARGETS, dropout: float = 0.0):
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(glip, prompt)
        targets = [n for n, m in glip.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target_modules, n)]
        if not targets:
            linear = [n for n, m in glip.named_modules() if isinstance(m, nn.Linear)][:8]
            raise ValueError(f"LoRA target modules {target_modules!r} match no linear layer of this GLIP; "
                             f"linear layers look like: {', '.join(linear)}")
        self.lora_config = {"r": r, "alpha": alpha, "target_modules": targets, "dropout": dropout}
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets),
                                glip)
        for name, parameter in glip.named_parameters():
            parameter.requires_grad_(".lora_" in name)

    @classmethod
    def from_tune_config(cls, glip: GLIP, prompt: TokenizedPrompt, config) -> "LoRA":
        return cls(glip, prompt, r=config.lora_r, alpha=config.lora_alpha, target_modules=config.lora_targets,
                   dropout=config.lora_dropout)

    def adapter_tensors(self) -> dict[str, dict[str, Tensor]]:
        lora = {}
        for name, tensor in self.glip.state_dict().items():
            match = re.fullmatch(r"(.*)\.lora_([AB])\.default\.weight", name)
            if match:
                lora[f"{match[1].replace('.base_layer', '')}.lora_{match[2]}.weight"] = tensor
        return {"weights": {}, "lora": lora}

