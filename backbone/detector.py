"""The user-facing detector, in the style of transformers' zero-shot detectors.

    detector = GLIPDetector.from_pretrained("glip-nano")
    [dets] = detector.detect("photo.jpg", ["fish", "shark"], threshold=0.4)
    dets.boxes, dets.scores, dets.labels, dets.names

Beyond the official code: any number of categories (long lists run as chunks of ≤256 tokens over
visual features computed once, then merged before NMS), a different prompt per image, and
precomputed prompt features (P0) so the language backbone need not run at all.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from backbone.device import autocast, resolve_device, resolve_dtype
from backbone.model import GLIP
from backbone.outputs import Detections, PromptFeatures, VisualFeatures
from backbone.postprocess import Candidates, Postprocessor
from backbone.processor import CategoryPrompt, GLIPProcessor, ImageBatch, TokenizedPrompt, rescale_boxes

Categories = Sequence[str | CategoryPrompt]


def split_prompt(prompt: str) -> list[str]:
    """'fish. jellyfish. penguin' -> ['fish', 'jellyfish', 'penguin'] (GLIP's detection-prompt separator)."""
    names = [part.strip() for part in prompt.split(".")]
    return [n for n in names if n]


class GLIPDetector:
    """Detection with a GLIP on the device its weights are on, computing in `dtype`.

    A `dtype` below float32 runs the network under autocast (weights stay float32); post-processing always runs
    in float32 on the network's outputs.
    """

    def __init__(self, model: GLIP, processor: GLIPProcessor, postprocessor: Postprocessor | None = None, *,
                 dtype: torch.dtype | str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.postprocessor = postprocessor or Postprocessor.from_config(model.config)
        self.dtype = resolve_dtype(dtype, self.device)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "glip-nano", *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, **kwargs) -> "GLIPDetector":
        """`device`: cpu, cuda or cuda:N (None: CUDA when available); `dtype`: float32, bfloat16, float16 (CUDA)."""
        device = resolve_device(device)
        resolve_dtype(dtype, device)  # refuse an impossible dtype before loading weights
        model = GLIP.from_pretrained(name_or_path, **kwargs).to(device)
        return cls(model, GLIPProcessor.from_config(model.config), dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compute(self):
        """The precision context of every network call (autocast, or nothing in float32)."""
        return autocast(self.device, self.dtype)

    def tokenize(self, categories: Categories | str, max_categories: int | None = None) -> list[TokenizedPrompt]:
        if isinstance(categories, str):
            categories = split_prompt(categories)
        return self.processor.tokenize(list(categories), max_categories=max_categories)

    @torch.no_grad()
    def detect(self, images, categories: Categories | str | Sequence[Categories], threshold: float = 0.5,
               resize: bool = True, max_categories: int | None = None) -> list[Detections]:
        """Detect `categories` in `images` (paths, bytes, PIL images or RGB arrays; one or a list).

        `categories` is one category list (or a "a. b. c" prompt) for all images, or one list per image; a long
        list runs as chunks that fill the token limit, or of at most `max_categories` categories each.
        Returns one `Detections` per image, boxes xyxy in original pixels, scores > threshold.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        per_image = _per_image_categories(categories, len(images))
        batch = self.processor.preprocess(list(images), resize=resize).to(self.device)
        with self.compute():
            visual = self.model.encode_images(batch.pixel_values, batch.image_sizes)
        results = []
        for index, cats in enumerate(per_image):
            prompts = self.tokenize(cats, max_categories)
            candidates = Candidates.cat([self._candidates(visual[index], p) for p in prompts])
            final = self.postprocessor.select(candidates)
            names = [n for p in prompts for n in p.categories]
            results.append(self._to_detections(final, batch, index, names, threshold))
        return results

    @torch.no_grad()
    def detect_with_features(self, batch: ImageBatch, prompt: PromptFeatures, positive_map: Tensor,
                             categories: list[str], threshold: float = 0.0,
                             visual: VisualFeatures | None = None) -> list[Detections]:
        """Detect with precomputed P0 (e.g. a prompt adapter's), skipping the language backbone."""
        with self.compute():
            if visual is None:
                visual = self.model.encode_images(batch.pixel_values.to(self.device), batch.image_sizes)
            outputs = self.model.fuse_and_predict(visual, prompt.to(self.device))
        finals = self.postprocessor(outputs.to(dtype=torch.float32), positive_map.to(self.device))
        return [self._to_detections(f, batch, i, categories, threshold) for i, f in enumerate(finals)]

    def _candidates(self, visual: VisualFeatures, prompt: TokenizedPrompt) -> Candidates:
        with self.compute():
            features = self.model.encode_prompt(prompt.input_ids.to(self.device),
                                                prompt.attention_mask.to(self.device))
            outputs = self.model.fuse_and_predict(visual, features)
        levels = self.postprocessor.level_candidates(outputs.to(dtype=torch.float32), 0,
                                                     prompt.positive_map.to(self.device),
                                                     label_offset=prompt.category_offset)
        return Candidates.cat(levels)

    @staticmethod
    def _to_detections(final: Candidates, batch: ImageBatch, index: int, names: list[str],
                       threshold: float) -> Detections:
        keep = final.scores > threshold
        boxes = rescale_boxes(final.boxes[keep].cpu(), batch.image_sizes[index], batch.original_sizes[index])
        return Detections(boxes=boxes, scores=final.scores[keep].cpu(), labels=final.labels[keep].cpu(),
                          categories=list(names))


def _per_image_categories(categories, num_images: int) -> list:
    if isinstance(categories, str):
        return [categories] * num_images
    categories = list(categories)
    if not categories:
        raise ValueError("no categories given: pass at least one category name to detect")
    if all(isinstance(c, (list, tuple)) for c in categories):
        if len(categories) != num_images:
            raise ValueError(f"got {len(categories)} category lists for {num_images} images; pass one list for "
                             "all images or one per image")
        return categories
    return [categories] * num_images
