"""Grounding batches: samples with boxes and phrases -> tokenized prompts, pixels and GLIP loss targets.

Shared by pretraining and every adaptation strategy: a detection sample becomes a prompt of its
categories (GLIP's "a. b. c"), a grounding sample keeps its caption; either way each box gets the
tokens of its phrase as positives (GLIP's token-level targets).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from backbone.loss import GroundingLoss, GroundingTarget
from backbone.model import GLIP
from backbone.outputs import HeadOutputs, PromptFeatures
from backbone.processor import GLIPProcessor, TokenizedPrompt, rescale_boxes

# (caption, per-box list of (beg, end) spans) for one sample
PromptBuilder = Callable[[dict], tuple[str, list[list[tuple[int, int]]]]]


@dataclass
class GroundingBatch:
    pixel_values: Tensor  # (B, 3, H, W)
    image_sizes: list[tuple[int, int]]
    input_ids: Tensor  # (B, T), padded with 0
    attention_mask: Tensor  # (B, T)
    targets: list[GroundingTarget]


def tokenize_sample(processor: GLIPProcessor, caption: str,
                    box_spans: Sequence[Sequence[tuple[int, int]]]) -> tuple[TokenizedPrompt, Tensor]:
    """Tokenize a caption whose boxes point at phrase spans; returns the prompt and (K, T) box positive maps."""
    phrases: list[tuple[int, int]] = []
    rows = []
    for spans in box_spans:
        span = tuple(spans[0])
        if span not in phrases:
            phrases.append(span)
        rows.append(phrases.index(span))
    if not phrases:  # an image without boxes: the prompt still needs a span to be tokenized
        phrases = [(0, len(caption))]
    [prompt] = processor.tokenize((caption, phrases))
    positive = prompt.positive_map[rows] if rows else prompt.positive_map.new_zeros(0, prompt.num_tokens)
    return prompt, positive


class GroundingCollator:
    """Collate (PIL image, target) samples into a `GroundingBatch`.

    Targets carry "boxes" (K, 4) xyxy pixels of the image as given and either "caption" + "spans"
    (grounding) or whatever `build_prompt` needs (detection: e.g. "phrases").
    """

    def __init__(self, processor: GLIPProcessor, build_prompt: PromptBuilder | None = None, resize: bool = True):
        self.processor = processor
        self.build_prompt = build_prompt
        self.resize = resize

    def __call__(self, samples: list[tuple[object, dict]]) -> GroundingBatch:
        images = [image for image, _ in samples]
        batch = self.processor.preprocess(images, resize=self.resize)
        prompts, targets = [], []
        for (_, target), size, original in zip(samples, batch.image_sizes, batch.original_sizes):
            if target.get("caption") is not None:
                caption, spans = target["caption"], target["spans"]
            elif self.build_prompt is not None:
                caption, spans = self.build_prompt(target)
            else:
                raise ValueError("a detection sample needs a prompt builder: pass build_prompt to GroundingCollator")
            prompt, positive = tokenize_sample(self.processor, caption, spans)
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
            boxes = rescale_boxes(boxes, original, size)  # original pixels -> network input
            prompts.append(prompt)
            targets.append(GroundingTarget(boxes=boxes, positive_map=positive))
        length = max(p.num_tokens for p in prompts)
        input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, : p.num_tokens] = p.input_ids[0]
            attention_mask[i, : p.num_tokens] = 1
        return GroundingBatch(batch.pixel_values, batch.image_sizes, input_ids, attention_mask, targets)


class GroundingModel(nn.Module):
    """GLIP plus the prompt-feature step, as one module the training engine can call (and DDP can wrap).

    `prompt_hook` may edit P0 before fusion (prompt tuning adds its offset there); with a frozen
    language backbone BERT runs without grad and stays in eval mode.
    """

    def __init__(self, glip: GLIP, *, train_text: bool = False,
                 prompt_hook: Callable[[PromptFeatures], PromptFeatures] | None = None):
        super().__init__()
        self.glip = glip
        self.train_text = train_text
        self.prompt_hook = prompt_hook
        if glip.text is not None and not train_text:
            glip.text.requires_grad_(False)

    def train(self, mode: bool = True) -> "GroundingModel":
        super().train(mode)
        if self.glip.text is not None and not self.train_text:
            self.glip.text.eval()
        return self

    def forward(self, batch: GroundingBatch) -> HeadOutputs:
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            prompt = self.glip.encode_prompt(batch.input_ids, batch.attention_mask)
        if self.prompt_hook is not None:
            prompt = self.prompt_hook(prompt)
        return self.glip(prompt, batch.pixel_values, batch.image_sizes)


def grounding_loss_fn(loss: GroundingLoss | None = None):
    """`loss_fn(model, batch)` for the training engine."""
    loss = loss or GroundingLoss()

    def compute(model: nn.Module, batch: GroundingBatch) -> dict[str, Tensor]:
        return loss(model(batch), batch.targets)

    return compute
