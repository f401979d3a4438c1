"""From head outputs to detections: phrase scores, thresholding, box decoding and class-aware NMS.

microsoft/GLIP `modeling/rpn/inference.py` (ATSSPostProcessor, convert_grounding_to_od_logits).
Per level: a phrase's probability is the mean of its tokens' sigmoid probabilities;
candidates have probability > threshold; at most `pre_nms_top_n` per level by probability x
centerness; boxes are decoded and clipped to the unpadded image (x ≤ W-1); score = sqrt(p · c).
Over all levels: class-aware NMS with "+1" IoU, then keep scores ≥ the `max_detections`-th largest.
Unlike the official code, any number of phrases works (no 80-column cap), and the candidates of
several prompt chunks can be merged before NMS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torchvision.ops import batched_nms, nms

from backbone.anchors import BoxCoder
from backbone.config import GLIPConfig, PostprocessConfig
from backbone.outputs import HeadOutputs


@dataclass
class Candidates:
    """Scored boxes of one image before NMS, in network-input pixels."""

    boxes: Tensor  # (K, 4) xyxy
    scores: Tensor  # (K,) sqrt(phrase probability x centerness)
    labels: Tensor  # (K,) 0-based phrase index

    @staticmethod
    def cat(items: list["Candidates"]) -> "Candidates":
        return Candidates(torch.cat([c.boxes for c in items]), torch.cat([c.scores for c in items]),
                          torch.cat([c.labels for c in items]))


def phrase_probabilities(alignment_logits: Tensor, positive_map: Tensor) -> Tensor:
    """(N, T) token logits and (C, T) bool phrase->token map -> (N, C) mean token probability per phrase."""
    weights = positive_map.to(alignment_logits.dtype)
    counts = weights.sum(1).clamp(min=1)
    return (alignment_logits.sigmoid() @ weights.T) / counts


def class_aware_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's batched_nms. A size that depends on the data and is not known yet (tracing under fake tensors
    with a ShapeEnv) cannot pass its emptiness check, so there it runs the coordinate-offset form batched_nms
    itself uses for small inputs: each class shifted past the previous one's boxes, then one NMS."""
    if not free_unbacked_symbols(boxes.shape[0]):
        return batched_nms(boxes, scores, labels, iou_threshold)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


class Postprocessor:
    def __init__(self, config: PostprocessConfig = PostprocessConfig(),
                 box_coder: BoxCoder | None = None):
        self.config = config
        self.box_coder = box_coder or BoxCoder()

    @classmethod
    def from_config(cls, config: GLIPConfig) -> "Postprocessor":
        """The post-processor of a model: its thresholds and its box coder's weights (the one place that builds one)."""
        return cls(config.postprocess, BoxCoder(config.head.box_coder_weights))

    def level_candidates(self, outputs: HeadOutputs, image: int, positive_map: Tensor,
                         label_offset: int = 0) -> list[Candidates]:
        """Candidates of one image, per pyramid level, for the phrases of `positive_map` (C, T)."""
        height, width = outputs.image_sizes[image]
        positive_map = positive_map[:, : outputs.alignment_logits.shape[-1]]
        per_level = zip(outputs.split_levels(outputs.alignment_logits[image], 0),
                        outputs.split_levels(outputs.centerness[image], 0),
                        outputs.split_levels(outputs.box_deltas[image], 0),
                        outputs.split_levels(outputs.anchors, 0))
        results = []
        for logits, centerness, deltas, anchors in per_level:
            probs = phrase_probabilities(logits, positive_map)  # (n, C)
            candidate = probs > self.config.score_threshold
            # The top pre_nms_top_n candidates by probability x centerness: non-candidates score -1 (below any
            # product of probabilities), so one static-size topk over all pairs replaces counting the candidates
            # first, which would be a host sync.
            combined = torch.where(candidate, probs * centerness.sigmoid()[:, None], -1.0).flatten()  # (n*C,)
            combined, order = combined.topk(min(self.config.pre_nms_top_n, combined.shape[0]), sorted=False)
            chosen = combined >= 0
            combined, order = combined[chosen], order[chosen]
            locations, labels = order // probs.shape[1], order % probs.shape[1]
            boxes = self.box_coder.decode(deltas[locations], anchors[locations])
            boxes = torch.stack([boxes[:, 0].clamp(0, width - 1), boxes[:, 1].clamp(0, height - 1),
                                 boxes[:, 2].clamp(0, width - 1), boxes[:, 3].clamp(0, height - 1)], dim=1)
            results.append(Candidates(boxes, combined.sqrt(), labels + label_offset))
        return results

    def select(self, candidates: Candidates) -> Candidates:
        """Class-aware NMS (legacy +1 IoU, suppress IoU > threshold), then the max_detections cut."""
        # Adding 1 to x2, y2 turns torchvision's IoU into the legacy (x2 - x1 + 1) one exactly.
        boxes = candidates.boxes
        legacy = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
        keep = class_aware_nms(legacy, candidates.scores, candidates.labels, self.config.nms_threshold)
        keep = keep.sort().values  # the official kernel returns kept boxes in their original order
        scores = candidates.scores[keep]
        order = scores.argsort(descending=True, stable=True)  # stable: ties keep the original order
        keep, scores = keep[order], scores[order]
        limit = self.config.max_detections
        if limit > 0:  # keep scores >= the limit-th largest (ties at the cut stay, as upstream)
            keep = keep[scores >= scores[:limit][-1:]]
        return Candidates(candidates.boxes[keep], candidates.scores[keep], candidates.labels[keep])

    def __call__(self, outputs: HeadOutputs, positive_maps: list[Tensor] | Tensor,
                 label_offsets: list[int] | None = None) -> list[Candidates]:
        """Detections for every image of a batch; `positive_maps` is one (C, T) map or one per image."""
        batch = outputs.alignment_logits.shape[0]
        if isinstance(positive_maps, Tensor):
            positive_maps = [positive_maps] * batch
        label_offsets = label_offsets or [0] * batch
        return [self.select(Candidates.cat(self.level_candidates(outputs, i, positive_maps[i], label_offsets[i])))
                for i in range(batch)]
