"""The one training path: samples with boxes and phrases -> a CPU `GroundingBatch` -> the model's step -> GLIP's loss.

Shared by pretraining and every adaptation strategy (detectron2's one DatasetMapper -> model -> loss):
- A sample is `(image, target)`; the target holds "boxes" (K, 4) xyxy pixels of the image as given and
  either "labels" into a fixed task prompt (adaptation), or "caption" + "spans" (grounding), or whatever a
  prompt builder needs (pretraining's detection samples: "phrases"). Optional "min_size" (a training
  scale) and "key" (a fixed training view, so its frozen features can be cached).
- `GroundingCollator` builds CPU tensors only: pixels, per-image targets and, when samples carry their own
  prompts, the padded token ids. It never runs a model.
- The Trainer moves the batch to the model's device; the model step (`adapt.strategies.AdaptedGLIP`,
  `GroundingModel`) computes the backbone features there, from the cache when one is attached.
- `grounding_loss_fn` is the one loss closure.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from backbone.config import GLIPConfig
from backbone.loss import GroundingLoss, GroundingTarget
from backbone.model import GLIP
from backbone.outputs import HeadOutputs, PromptFeatures
from backbone.processor import GLIPProcessor, TokenizedPrompt, rescale_boxes

# (caption, per-box list of (beg, end) spans) for one sample
PromptBuilder = Callable[[dict], tuple[str, list[list[tuple[int, int]]]]]


@dataclass
class GroundingBatch:
    """One training (or evaluation) batch, built on the CPU by `GroundingCollator`.

    Attributes:
        pixel_values: (B, 3, H, W) normalised, padded pixels.
        image_sizes: (h, w) of every image inside the padding.
        targets: one `GroundingTarget` per image (empty for evaluation).
        input_ids, attention_mask: (B, T) per-image prompts padded with 0 (pretraining); None when the
            model holds one task prompt (adaptation).
        keys: per image, the fixed training view it is (image id, scale, flip); None when views are not
            fixed. Frozen features of a keyed view may be cached.
    """

    pixel_values: Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[GroundingTarget]
    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    keys: list | None = None

    def pin_memory(self) -> "GroundingBatch":
        """Page-locked copies (DataLoader calls this with pin_memory=True), so copies to CUDA can overlap."""
        def pin(value):
            if isinstance(value, Tensor):
                return value.pin_memory()
            if isinstance(value, list):
                return [pin(v) for v in value]
            if isinstance(value, GroundingTarget):
                return GroundingTarget(pin(value.boxes), pin(value.positive_map))
            return value

        return replace(self, **{f.name: pin(getattr(self, f.name)) for f in fields(self)})


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
    """Collate `(image, target)` samples into a CPU `GroundingBatch` (see the module docstring for targets).

    Args:
        processor: resizes, normalises, pads and tokenizes.
        task_prompt: the fixed prompt of an adaptation task; targets then carry "labels" (category indices).
        build_prompt: for samples without a caption, `target -> (caption, box spans)`.
        resize: apply the model's resize rule (False feeds pixels as they are).
    """

    def __init__(self, processor: GLIPProcessor, *, task_prompt: TokenizedPrompt | None = None,
                 build_prompt: PromptBuilder | None = None, resize: bool = True):
        self.processor, self.task_prompt = processor, task_prompt
        self.build_prompt, self.resize = build_prompt, resize

    def __call__(self, samples: list[tuple[object, dict]]) -> GroundingBatch:
        targets = [target for _, target in samples]
        batch = self.processor.preprocess([image for image, _ in samples], resize=self.resize,
                                          min_sizes=[t.get("min_size") for t in targets])
        keys = [t["key"] for t in targets] if all("key" in t for t in targets) else None
        input_ids = attention_mask = None
        if self.task_prompt is not None:
            positives = [self.task_prompt.positive_map[t["labels"]] for t in targets]
        else:
            prompts, positives = zip(*(self._prompt(t) for t in targets))
            input_ids, attention_mask = _pad_prompts(prompts)
        grounding = []
        for target, positive, size, original in zip(targets, positives, batch.image_sizes, batch.original_sizes):
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
            boxes = rescale_boxes(boxes, original, size)  # original pixels -> network input
            grounding.append(GroundingTarget(boxes=boxes, positive_map=positive))
        return GroundingBatch(batch.pixel_values, batch.image_sizes, grounding, input_ids, attention_mask, keys)

    def _prompt(self, target: dict) -> tuple[TokenizedPrompt, Tensor]:
        if target.get("caption") is not None:
            caption, spans = target["caption"], target["spans"]
        elif self.build_prompt is not None:
            caption, spans = self.build_prompt(target)
        else:
            raise ValueError("a detection sample needs a prompt: pass task_prompt= (targets with 'labels') or "
                             "build_prompt= to GroundingCollator")
        return tokenize_sample(self.processor, caption, spans)


def _pad_prompts(prompts: Sequence[TokenizedPrompt]) -> tuple[Tensor, Tensor]:
    """(B, T) input ids and attention mask, each prompt padded with 0 to the longest."""
    length = max(p.num_tokens for p in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : p.num_tokens] = p.input_ids[0]
        attention_mask[i, : p.num_tokens] = 1
    return input_ids, attention_mask


class GroundingModel(nn.Module):
    """GLIP plus the prompt-feature step for batches that carry their own prompts (pretraining).

    `prompt_hook` may edit P0 before fusion; with a frozen language backbone BERT runs without grad and
    stays in eval mode.
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
        if batch.input_ids is None:
            raise ValueError("GroundingModel needs batches with their own prompts (input_ids); for a fixed task "
                             "prompt train an adapt.strategies model instead")
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            prompt = self.glip.encode_prompt(batch.input_ids, batch.attention_mask)
        if self.prompt_hook is not None:
            prompt = self.prompt_hook(prompt)
        return self.glip(prompt, batch.pixel_values, batch.image_sizes)


def grounding_loss(config: GLIPConfig | None = None) -> GroundingLoss:
    """GLIP's objective with the box coder the model's head was built for."""
    return GroundingLoss(box_coder_weights=config.head.box_coder_weights) if config else GroundingLoss()


def grounding_loss_fn(loss: GroundingLoss | None = None):
    """`loss_fn(model, batch)` for the training engine: the model's outputs against the batch's targets."""
    loss = loss or GroundingLoss()

    def compute(model: nn.Module, batch: GroundingBatch) -> dict[str, Tensor]:
        return loss(model(batch), batch.targets)

    return compute
