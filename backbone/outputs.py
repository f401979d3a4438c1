"""Typed values that travel between GLIP's stages: prompt features P0, visual features, head outputs, detections."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from glip_io.coco import detections_to_results

@dataclass
class PromptFeatures:
    """P0: every language tensor the fusion and the head consume, for a batch of prompts.

    Only real tokens are kept (GLIP's `PAD_MAX False` layout); prompts of different lengths are
    right-padded with zeros and masked.

    Attributes:
        hidden: (B, T, D) last BERT layer; the stream that deep fusion updates.
        embedded: (B, T, D) the same, zeroed at padding; what the head uses without deep fusion.
        mask: (B, T) int64, 1 on real tokens (incl. [CLS], [SEP] and separators), 0 on padding.
    """

    hidden: Tensor
    embedded: Tensor
    mask: Tensor

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    def to(self, *args, **kwargs) -> "PromptFeatures":
        hidden = self.hidden.to(*args, **kwargs)
        return PromptFeatures(hidden, self.embedded.to(*args, **kwargs), self.mask.to(device=hidden.device))

    def detach(self) -> "PromptFeatures":
        return PromptFeatures(self.hidden.detach(), self.embedded.detach(), self.mask)

    def expand(self, batch_size: int) -> "PromptFeatures":
        """Repeat a single prompt for a batch of images."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot broadcast {self.batch_size} prompts to {batch_size} images; "
                             "pass one prompt, or one per image")
        return PromptFeatures(self.hidden.expand(batch_size, -1, -1), self.embedded.expand(batch_size, -1, -1),
                              self.mask.expand(batch_size, -1))

    def trimmed(self) -> "PromptFeatures":
        """Drop trailing positions that are padding in every prompt of the batch."""
        length = int(self.mask.sum(1).max())
        return PromptFeatures(self.hidden[:, :length], self.embedded[:, :length], self.mask[:, :length])

    def __getitem__(self, index) -> "PromptFeatures":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return PromptFeatures(self.hidden[index], self.embedded[index], self.mask[index])

    @staticmethod
    def stack(prompts: list["PromptFeatures"]) -> "PromptFeatures":
        """Batch prompts of different lengths: pad each to the longest and mask the padding."""
        if not prompts:
            raise ValueError("no prompts to stack")
        length = max(p.length for p in prompts)

        def pad(t: Tensor) -> Tensor:
            extra = length - t.shape[1]
            if extra == 0:
                return t
            shape = (t.shape[0], extra) + tuple(t.shape[2:])
            return torch.cat([t, t.new_zeros(shape)], dim=1)

        return PromptFeatures(
            hidden=torch.cat([pad(p.hidden) for p in prompts]),
            embedded=torch.cat([pad(p.embedded) for p in prompts]),
            mask=torch.cat([pad(p.mask) for p in prompts]),
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {"hidden": self.hidden.contiguous(), "embedded": self.embedded.contiguous(),
                "mask": self.mask.contiguous()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor]) -> "PromptFeatures":
        return cls(hidden=tensors["hidden"], embedded=tensors["embedded"], mask=tensors["mask"].long())


@dataclass
class VisualFeatures:
    """O0: FPN levels (finest first) for a batch of padded images, plus their unpadded sizes.

    Depends only on the images, so a caller may compute it once and reuse it for many prompts.
    """

    levels: list[Tensor]  # each (B, C, H_l, W_l)
    image_sizes: list[tuple[int, int]]  # (h, w) of each image before padding, network-input pixels

    @property
    def batch_size(self) -> int:
        return self.levels[0].shape[0]

    def __getitem__(self, index) -> "VisualFeatures":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return VisualFeatures([lvl[index] for lvl in self.levels], self.image_sizes[index])

    @staticmethod
    def cat(items: list["VisualFeatures"]) -> "VisualFeatures":
        return VisualFeatures([torch.cat(parts) for parts in zip(*(i.levels for i in items))],
                              [s for i in items for s in i.image_sizes])


@dataclass
class HeadOutputs:
    """What GLIP's forward returns, in training and evaluation alike.

    Anchor-wise tensors concatenate all levels (finest first, row-major y, x within a level).

    Attributes:
        box_deltas: (B, N, 4) box regression (after the per-level scale), for BoxCoder weights.
        centerness: (B, N) centerness logits.
        alignment_logits: (B, N, T) token logits S = proj(O)·proj(P)ᵀ / exp(log_scale) + bias.
        anchors: (N, 4) xyxy anchors in padded-input pixels (legacy "+1" widths).
        level_shapes: (h, w) of every level.
        image_sizes: unpadded (h, w) of every image.
        text_mask: (B, T) the prompt mask the logits were computed with.
        fused_text: (B, T, D) text features after the DyHead tower (the deep-fused P).
        fused_visual: DyHead tower outputs per level, (B, C, h, w).
    """

    box_deltas: Tensor
    centerness: Tensor
    alignment_logits: Tensor
    anchors: Tensor
    level_shapes: list[tuple[int, int]]
    image_sizes: list[tuple[int, int]]
    text_mask: Tensor
    fused_text: Tensor
    fused_visual: list[Tensor]

    def split_levels(self, tensor: Tensor, dim: int = 1) -> list[Tensor]:
        """Split an anchor-wise tensor back into levels (use dim=0 for `anchors`)."""
        return list(torch.split(tensor, [h * w for h, w in self.level_shapes], dim=dim))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "HeadOutputs":
        """Floating tensors moved and cast (e.g. bf16 outputs to float32 for post-processing); masks keep their dtype."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(self, box_deltas=move(self.box_deltas), centerness=move(self.centerness),
                       alignment_logits=move(self.alignment_logits), anchors=move(self.anchors),
                       text_mask=move(self.text_mask), fused_text=move(self.fused_text),
                       fused_visual=[move(t) for t in self.fused_visual])


@dataclass
class Detections:
    """Detections for one image.

    Attributes:
        boxes: (K, 4) xyxy in original image pixels.
        scores: (K,) confidence.
        labels: (K,) index into `categories`.
        categories: the category (phrase) names the labels index.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    categories: list[str]

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def names(self) -> list[str]:
        return [self.categories[int(i)] for i in self.labels]

    def to_coco(self, image_id: int | None, category_ids: list[int] | None = None, *,
                file_name: str | None = None) -> list[dict]:
        """COCO results records, each naming its category (`glip_io.coco.detections_to_results`: bbox x, y, w, h;
        `category_ids[i]` is the id of category i, default i + 1)."""
        return detections_to_results(image_id, self.boxes, self.scores, self.labels, category_ids,
                                     category_names=self.categories, file_name=file_name)

    def select(self, keep: Tensor) -> "Detections":
        return replace(self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep])

    def to_supervision(self):
        """These detections as a `supervision.Detections` (xyxy, confidence, class_id, data["class_name"]), for
        its annotators, trackers and zones. Needs the optional supervision package (the `supervision` extra)."""
        try:
            import supervision as sv
        except ImportError:
            raise ImportError("Detections.to_supervision needs the supervision package; install it with "
                              "`pip install \"glip-adapt[supervision]\"`") from None
        import numpy as np

        return sv.Detections(xyxy=self.boxes.detach().float().cpu().numpy().reshape(-1, 4),
                             confidence=self.scores.detach().float().cpu().numpy(),
                             class_id=self.labels.detach().cpu().numpy().astype(int),
                             data={"class_name": np.array(self.names, dtype=str)})


def detach_outputs(outputs: HeadOutputs) -> HeadOutputs:
    values = {}
    for f in fields(outputs):
        v = getattr(outputs, f.name)
        if isinstance(v, Tensor):
            v = v.detach()
        elif isinstance(v, list) and v and isinstance(v[0], Tensor):
            v = [t.detach() for t in v]
        values[f.name] = v
    return HeadOutputs(**values)
