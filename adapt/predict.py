"""Detection with an adapter: the adapter's P0 (no language backbone run) on its base model."""
from __future__ import annotations

import torch

from adapt.adapter import Adapter, apply_adapter, load_adapter
from backbone.detector import GLIPDetector
from backbone.device import resolve_device, resolve_dtype
from backbone.model import GLIP
from backbone.outputs import Detections
from backbone.processor import GLIPProcessor


class AdapterDetector:
    """One task's detector: a base GLIP with one adapter folded in (for CLI use; the server shares its base)."""

    def __init__(self, base: GLIP, adapter: Adapter, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None):
        device = resolve_device(device)
        apply_adapter(base, adapter)
        self.adapter = adapter
        self.detector = GLIPDetector(base.to(device), GLIPProcessor.from_config(base.config), dtype=dtype)

    @classmethod
    def load(cls, adapter_path, base: str | None = None, *, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> "AdapterDetector":
        """From an adapter file or `hf://` reference (on its base, or `base`), or from a merged single-task model
        file."""
        from adapt.adapter import AdapterError, read_adapter_header, read_merged
        from adapt.hub import open_adapter

        resolve_dtype(dtype, resolve_device(device))  # refuse an impossible device or dtype before loading
        label, adapter_path = str(adapter_path), open_adapter(adapter_path)
        merged = read_merged(adapter_path)
        if merged is not None:
            return cls(GLIP.from_pretrained(str(adapter_path)), merged, device=device, dtype=dtype)
        name = base or read_adapter_header(adapter_path, label).get("base_model")  # refuses non-adapters first
        if not name:
            raise AdapterError(f"{label} does not name its base model; pass --base CHECKPOINT")
        glip = GLIP.from_pretrained(name)
        return cls(glip, load_adapter(adapter_path, base=glip, source=label), device=device, dtype=dtype)

    @property
    def categories(self) -> list[str]:
        return self.adapter.category_names

    @property
    def category_ids(self) -> list[int]:
        return self.adapter.category_ids

    @property
    def processor(self) -> GLIPProcessor:
        return self.detector.processor

    @property
    def model(self) -> GLIP:
        return self.detector.model

    @property
    def postprocessor(self):
        return self.detector.postprocessor

    def detect(self, images, threshold: float = 0.0) -> list[Detections]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = self.processor.preprocess(list(images))
        return self.detector.detect_with_features(batch, self.adapter.prompt, self.adapter.positive_map,
                                                  self.categories, threshold)

    def detect_fn(self):
        """For adapt.evaluation.evaluate(detect_fn=...): the adapter's own category order is the task's."""
        return lambda images, label_lists: self.detect(images, threshold=0.0)
