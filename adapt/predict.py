"""Detection with an adapter: the adapter's P0 (no language backbone run) on its base model."""
from __future__ import annotations

import torch

from adapt.adapter import Adapter, apply_adapter, load_adapter
from backbone.model import GLIP
from backbone.outputs import Detections
from backbone.postprocess import Postprocessor
from backbone.processor import GLIPProcessor, rescale_boxes


class AdapterDetector:
    """One task's detector: a base GLIP with one adapter folded in (for CLI use; the server shares its base)."""

    def __init__(self, base: GLIP, adapter: Adapter):
        apply_adapter(base, adapter)
        self.model = base.eval()
        self.adapter = adapter
        self.processor = GLIPProcessor.from_config(base.config)
        self.postprocessor = Postprocessor.from_config(base.config)

    @classmethod
    def load(cls, adapter_path, base: str | None = None) -> "AdapterDetector":
        """From an adapter file (on its base, or `base`), or from a merged single-task model file."""
        from adapt.adapter import AdapterError, read_merged, read_metadata

        merged = read_merged(adapter_path)
        if merged is not None:
            return cls(GLIP.from_pretrained(str(adapter_path)), merged)
        name = base or read_metadata(adapter_path).get("base_model")  # read_metadata refuses non-adapters first
        if not name:
            raise AdapterError(f"{adapter_path} does not name its base model; pass --base CHECKPOINT")
        glip = GLIP.from_pretrained(name)
        return cls(glip, load_adapter(adapter_path, base=glip))

    @property
    def categories(self) -> list[str]:
        return self.adapter.category_names

    @torch.no_grad()
    def detect(self, images, threshold: float = 0.0) -> list[Detections]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = self.processor.preprocess(list(images))
        outputs = self.model(self.adapter.prompt, batch.pixel_values, batch.image_sizes)
        finals = self.postprocessor(outputs, self.adapter.positive_map)
        results = []
        for i, final in enumerate(finals):
            keep = final.scores > threshold
            boxes = rescale_boxes(final.boxes[keep], batch.image_sizes[i], batch.original_sizes[i])
            results.append(Detections(boxes, final.scores[keep], final.labels[keep], self.categories))
        return results

    def detect_fn(self):
        """For adapt.evaluation.evaluate(detect_fn=...): the adapter's own category order is the task's."""
        return lambda images, label_lists: self.detect(images, threshold=0.0)
