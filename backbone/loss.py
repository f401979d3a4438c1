"""GLIP's training objective: ATSS anchor assignment, token focal loss, GIoU box loss, centerness BCE.

Facts (not code) from the official GLIP (microsoft/GLIP): `ATSSLossComputation` in
`maskrcnn_benchmark/modeling/rpn/loss.py` (`prepare_targets`, `compute_centerness_targets`, `GIoULoss`,
`__call__`), `token_sigmoid_binary_focal_loss` in `maskrcnn_benchmark/layers/sigmoid_focal_loss.py` and
`boxlist_iou` in `maskrcnn_benchmark/structures/boxlist_ops.py`. ATSS is Zhang et al. 2020,
"Bridging the Gap Between Anchor-based and Anchor-free Detection" (arXiv 1912.02424).

The official `__call__` is one 352-line function; here each step is its own function:
`assign_targets` (ATSS, per image) -> `token_targets` / `centerness_targets` -> `alignment_loss`,
`box_loss`, `centerness_loss`, and `GroundingLoss` strings them together.

Device discipline: every tensor made here is made on the device (and float dtype) of the tensors it meets,
and nothing reads a value back to the host except the input checks, which run only when the data is on
the CPU (where reading a value costs nothing; on CUDA they would stall the stream every step). The one
data-dependent size is the set of positive anchors (`nonzero`), inherent to the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from backbone.anchors import BoxCoder
from backbone.outputs import HeadOutputs

# An anchor is inside a box only if its centre is farther than this from every side (official value).
_INSIDE_MARGIN = 0.01
# The official GIoU adds this to the union and the enclosing area.
_GIOU_EPS = 1e-7


@dataclass
class GroundingTarget:
    """The annotations of one image.

    Attributes:
        boxes: (K, 4) xyxy boxes in network-input pixels; K may be 0.
        positive_map: (K, T) bool, the prompt tokens of each box's phrase (every sub-word of the phrase).
            It may be narrower than the batch's padded prompt length; missing columns are negatives.
    """

    boxes: Tensor
    positive_map: Tensor

    def __post_init__(self):
        if self.boxes.numel() == 0:
            self.boxes = self.boxes.reshape(0, 4)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (K, 4) xyxy, got shape {tuple(self.boxes.shape)}")
        if not self.boxes.is_floating_point():
            self.boxes = self.boxes.float()
        if self.positive_map.ndim != 2 or self.positive_map.shape[0] != self.boxes.shape[0]:
            raise ValueError(f"positive_map must be (K, T) with K = {self.boxes.shape[0]} boxes, "
                             f"got shape {tuple(self.positive_map.shape)}")
        if self.positive_map.dtype != torch.bool:
            self.positive_map = self.positive_map > 0  # accepts 0/1 and GLIP's row-normalised maps

    @classmethod
    def empty(cls, num_tokens: int = 0) -> "GroundingTarget":
        """An image without boxes: every anchor is background for every token."""
        return cls(torch.zeros(0, 4), torch.zeros(0, num_tokens, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Assignment


def _box_iou_plus_one(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(N, 4), (K, 4) xyxy -> (N, K) IoU with the legacy "+1" widths of maskrcnn_benchmark's boxlist_iou."""
    area1 = (boxes1[:, 2] - boxes1[:, 0] + 1) * (boxes1[:, 3] - boxes1[:, 1] + 1)  # (N,)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + 1) * (boxes2[:, 3] - boxes2[:, 1] + 1)  # (K,)
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, K, 2)
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, K, 2)
    wh = (bottom_right - top_left + 1).clamp(min=0)  # (N, K, 2)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def _box_centres(boxes: Tensor) -> Tensor:
    return (boxes[..., :2] + boxes[..., 2:]) / 2  # (..., 2)


def _candidates(distances: Tensor, level_sizes: list[int], topk: int) -> Tensor:
    """(N, K) anchor-to-GT centre distances -> (C, K) indices of the `topk` closest anchors of every level."""
    per_level, start = [], 0
    for size in level_sizes:
        k = min(topk, size)
        if k > 0:
            nearest = distances[start:start + size].topk(k, dim=0, largest=False).indices  # (k, K)
            per_level.append(nearest + start)
        start += size
    return torch.cat(per_level)


@torch.no_grad()
def assign_targets(anchors: Tensor, level_shapes: list[tuple[int, int]], target: GroundingTarget,
                   topk: int = 9) -> Tensor:
    """ATSS: the ground-truth box each anchor regresses and grounds, as in the official GLIP.

    For every box: on each level take the `topk` anchors whose centres are closest to the box centre
    (Euclidean); among these candidates, keep those whose IoU (legacy +1 widths) is at least the mean plus
    the unbiased standard deviation of the candidates' IoUs and whose centre lies inside the box by more
    than 0.01 on every side. An anchor kept for several boxes goes to the one it overlaps most.
    (With a single candidate in all, torch.std is NaN and, as in the official code, nothing is positive.)

    Args:
        anchors: (N, 4) xyxy anchors of all levels, finest first.
        level_shapes: (h, w) of every level; their areas must sum to N.
        target: the image's boxes (its positive map is not used here).
        topk: candidates per level and box (official `ATSS.TOPK`).

    Returns:
        (N,) long: the index of the matched box, -1 for background.
    """
    level_sizes = [h * w for h, w in level_shapes]
    if sum(level_sizes) != anchors.shape[0]:
        raise ValueError(f"level_shapes {level_shapes} describe {sum(level_sizes)} anchors, "
                         f"but anchors has {anchors.shape[0]}; pass the shapes the anchors were made from")
    matched = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
    boxes = target.boxes.to(device=anchors.device, dtype=anchors.dtype)  # (K, 4)
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return matched

    ious = _box_iou_plus_one(anchors, boxes)  # (N, K)
    anchor_centres = _box_centres(anchors)  # (N, 2)
    distances = (anchor_centres[:, None] - _box_centres(boxes)[None]).pow(2).sum(-1).sqrt()  # (N, K)
    candidates = _candidates(distances, level_sizes, topk)  # (C, K)

    candidate_ious = ious.gather(0, candidates)  # (C, K)
    if candidates.shape[0] > 1:
        std = candidate_ious.std(0)  # unbiased, as the official torch.std call
    else:
        std = torch.full_like(candidate_ious[0], float("nan"))
    is_positive = candidate_ious >= candidate_ious.mean(0) + std  # (C, K)

    centres = anchor_centres[candidates]  # (C, K, 2)
    sides = torch.cat([centres - boxes[:, :2], boxes[:, 2:] - centres], dim=-1)  # (C, K, 4) l, t, r, b
    is_positive &= sides.min(-1).values > _INSIDE_MARGIN

    # Highest IoU wins among the boxes an anchor is positive for; -inf marks "not positive". A column of
    # `candidates` never repeats an anchor (levels are disjoint ranges), so the scatter has no collisions.
    positive_ious = torch.full_like(ious, float("-inf"))  # (N, K)
    positive_ious.scatter_(0, candidates, candidate_ious.masked_fill(~is_positive, float("-inf")))
    best_iou, best_box = positive_ious.max(dim=1)
    return torch.where(best_iou > float("-inf"), best_box, matched)


def token_targets(matched_gt_index: Tensor, positive_map: Tensor, num_tokens: int) -> Tensor:
    """(N,) matched box per anchor, (K, T') positive map -> (N, num_tokens) float token targets.

    A positive anchor takes its box's row; background anchors are all zeros. (The official code puts a 1
    on the last of 256 positions for background, the "[NoObj]" token, but the text mask then drops it
    unless a prompt fills all 256 tokens.)
    """
    num_boxes, width = positive_map.shape
    if width > num_tokens:
        if _host_check(positive_map) and positive_map[:, num_tokens:].any():
            raise ValueError(f"positive_map marks tokens at positions >= {num_tokens}, beyond the prompt the "
                             "logits were computed for; tokenize the prompt and the phrases together")
        positive_map = positive_map[:, :num_tokens]
    table = positive_map.new_zeros(num_boxes + 1, num_tokens, dtype=torch.float32)  # last row: background
    table[:num_boxes, :positive_map.shape[1]] = positive_map.float()
    rows = torch.where(matched_gt_index >= 0, matched_gt_index, num_boxes)
    return table[rows]


def centerness_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
    """(P, 4) anchors, (P, 4) their boxes -> (P,) sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b)).

    l, t, r, b are the distances from the anchor centre to the box sides (FCOS centerness).
    """
    centres = _box_centres(anchors)  # (P, 2)
    near = centres - boxes[:, :2]  # (P, 2) l, t
    far = boxes[:, 2:] - centres  # (P, 2) r, b
    ratios = torch.minimum(near, far) / torch.maximum(near, far)  # (P, 2)
    return torch.sqrt(ratios[:, 0] * ratios[:, 1])


def _host_check(data: Tensor) -> bool:
    """Whether to run a value check on `data`: only on the CPU, where reading a value back is free."""
    return data.device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# Losses


def _mean_over_processes(value: Tensor) -> Tensor:
    """Sum over processes / world size when torch.distributed is initialised (the official reduce_sum)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def alignment_loss(logits: Tensor, targets: Tensor, text_mask: Tensor, normaliser: Tensor | float,
                   alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Token-level sigmoid focal loss, summed over (anchor, real token) pairs, divided by `normaliser`.

    Args:
        logits: (B, N, T) alignment logits.
        targets: (B, N, T) 0/1 token targets.
        text_mask: (B, T) 1 on real tokens; padding contributes nothing (and gets no gradient).
        normaliser: the number of positive anchors (official: averaged over processes, at least 1).
        alpha, gamma: focal loss parameters (official TOKEN_ALPHA, TOKEN_GAMMA).
    """
    valid = text_mask.bool()[:, None, :].expand_as(logits)  # (B, N, T)
    # Zero padded logits before computing so that they cannot leak NaN/inf into the sum or its gradient
    # (a masked fill instead of a boolean selection: no data-dependent size, no host sync).
    losses = sigmoid_focal_loss(logits.masked_fill(~valid, 0.0), targets, alpha=alpha, gamma=gamma, reduction="none")
    return losses.masked_fill(~valid, 0.0).sum() / normaliser


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """(P, 4), (P, 4) xyxy -> (P,) 1 - GIoU, with the official conventions.

    Areas without "+1"; a predicted box with x2 < x1 (or y2 < y1) is collapsed to zero width; 1e-7 is
    added to the union and the enclosing area.
    """
    x1, y1 = pred_boxes[:, 0], pred_boxes[:, 1]
    x2, y2 = torch.maximum(x1, pred_boxes[:, 2]), torch.maximum(y1, pred_boxes[:, 3])
    tx1, ty1, tx2, ty2 = target_boxes.unbind(-1)
    pred_area = (x2 - x1) * (y2 - y1)
    target_area = (tx2 - tx1) * (ty2 - ty1)
    inter = ((torch.minimum(x2, tx2) - torch.maximum(x1, tx1)).clamp(min=0)
             * (torch.minimum(y2, ty2) - torch.maximum(y1, ty1)).clamp(min=0))
    enclosing = (torch.maximum(x2, tx2) - torch.minimum(x1, tx1)) * (torch.maximum(y2, ty2) - torch.minimum(y1, ty1))
    enclosing = enclosing + _GIOU_EPS
    union = pred_area + target_area - inter + _GIOU_EPS
    giou = inter / union - (enclosing - union) / enclosing
    return 1 - giou


def box_loss(box_deltas: Tensor, anchors: Tensor, target_boxes: Tensor, weights: Tensor,
             normaliser: Tensor | float, box_coder: BoxCoder) -> Tensor:
    """GIoU loss of the decoded predictions of positive anchors, weighted, divided by `normaliser`.

    Args:
        box_deltas: (P, 4) predicted deltas of the positive anchors.
        anchors: (P, 4) those anchors.
        target_boxes: (P, 4) their matched boxes, xyxy.
        weights: (P,) per-anchor weights (official: the centerness targets; ignored if they sum to 0).
        normaliser: official: the sum of the centerness targets, averaged over processes.
        box_coder: decodes `box_deltas` relative to `anchors`.

    With no positive anchor, returns a zero that still depends on `box_deltas` (branch-free: P may be a
    data-dependent size, so it is never read on the host).
    """
    losses = giou_loss(box_coder.decode(box_deltas, anchors), target_boxes)  # (P,)
    total = torch.where(weights.sum() > 0, (losses * weights).sum(), losses.sum())
    if isinstance(normaliser, Tensor):  # 0 only without positives, where total is 0 too
        normaliser = torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))
    return total / normaliser


def centerness_loss(logits: Tensor, targets: Tensor, normaliser: Tensor | float) -> Tensor:
    """(P,) centerness logits of the positive anchors vs (P,) targets: BCE-with-logits sum / `normaliser`."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / normaliser


# --------------------------------------------------------------------------------------------------
# The objective


class GroundingLoss(nn.Module):
    """GLIP's grounding objective on `HeadOutputs`, with the official weights and normalisation.

    Returns `loss_alignment` (token focal loss / number of positive anchors), `loss_box` (GIoU weighted
    by the centerness targets / their sum, × `box_weight`), `loss_centerness` (BCE / number of positive
    anchors) and `loss`, their sum. Under torch.distributed both normalisers are averaged over
    processes, as in the official code. Inputs are computed in float32 (the official `custom_fwd`).

    Args:
        focal_alpha: token focal loss α (official TOKEN_ALPHA).
        focal_gamma: token focal loss γ (official TOKEN_GAMMA).
        alignment_weight: official DOT_PRODUCT_TOKEN_LOSS_WEIGHT.
        box_weight: official ATSS.REG_LOSS_WEIGHT.
        centerness_weight: the official code applies none (1.0).
        topk: ATSS candidates per level and box (official ATSS.TOPK).
        box_coder_weights: (wx, wy, ww, wh) of the BoxCoder the head's deltas are for.
    """

    def __init__(self, *, focal_alpha: float = 0.25, focal_gamma: float = 2.0, alignment_weight: float = 1.0,
                 box_weight: float = 2.0, centerness_weight: float = 1.0, topk: int = 9,
                 box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)):
        super().__init__()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.alignment_weight = alignment_weight
        self.box_weight = box_weight
        self.centerness_weight = centerness_weight
        self.topk = topk
        self.box_coder = BoxCoder(box_coder_weights)

    def assign(self, outputs: HeadOutputs, targets: list[GroundingTarget]) -> tuple[Tensor, Tensor]:
        """ATSS for every image -> (B, N) matched box index (-1 background), (B, N, T) token targets."""
        batch, _, num_tokens = outputs.alignment_logits.shape
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images; pass one per image "
                             "(GroundingTarget.empty() for an image without boxes)")
        anchors = outputs.anchors.float()
        text_mask = outputs.text_mask.bool()
        matched, tokens = [], []
        for i, target in enumerate(targets):
            positive_map = target.positive_map.to(anchors.device)
            width = min(positive_map.shape[1], num_tokens)
            if _host_check(positive_map) and (positive_map[:, :width] & ~text_mask[i, :width]).any():
                raise ValueError(f"image {i}: positive_map marks tokens where text_mask is 0 (padding); "
                                 "the phrases must be tokens of that image's prompt")
            matched.append(assign_targets(anchors, outputs.level_shapes, target, self.topk))
            tokens.append(token_targets(matched[-1], positive_map, num_tokens))
        return torch.stack(matched), torch.stack(tokens)

    def forward(self, outputs: HeadOutputs, targets: list[GroundingTarget]) -> dict[str, Tensor]:
        logits = outputs.alignment_logits.float()  # (B, N, T)
        if outputs.text_mask.shape != (logits.shape[0], logits.shape[2]):
            raise ValueError(f"text_mask has shape {tuple(outputs.text_mask.shape)}, expected (B, T) = "
                             f"{(logits.shape[0], logits.shape[2])} from alignment_logits")
        anchors = outputs.anchors.float()  # (N, 4)
        matched, tokens = self.assign(outputs, targets)  # (B, N), (B, N, T)

        positive = matched >= 0  # (B, N)
        num_positive = _mean_over_processes(positive.sum().float()).clamp(min=1.0)
        loss_alignment = alignment_loss(logits, tokens, outputs.text_mask, num_positive,
                                        alpha=self.focal_alpha, gamma=self.focal_gamma)

        image_index, anchor_index = positive.nonzero(as_tuple=True)  # (P,), (P,)
        starts = [sum(t.boxes.shape[0] for t in targets[:i]) for i in range(len(targets))]
        batch_match = torch.stack([row + start for row, start in zip(matched, starts)])  # into all_boxes
        all_boxes = torch.cat([t.boxes.to(anchors) for t in targets])  # (sum K, 4)
        pos_anchors = anchors[anchor_index]  # (P, 4)
        gt_boxes = all_boxes[batch_match[image_index, anchor_index]]  # (P, 4)
        # The official code regresses decode(encode(gt)): equal to gt unless the width ratio hits the clamp.
        gt_boxes = self.box_coder.decode(self.box_coder.encode(gt_boxes, pos_anchors), pos_anchors)
        ctr_targets = centerness_targets(pos_anchors, gt_boxes)  # (P,)
        ctr_sum = _mean_over_processes(ctr_targets.sum())  # called on every process, positives or not

        loss_box = box_loss(outputs.box_deltas.float()[image_index, anchor_index], pos_anchors, gt_boxes,
                            ctr_targets, ctr_sum, self.box_coder)
        loss_centerness = centerness_loss(outputs.centerness.float()[image_index, anchor_index], ctr_targets,
                                          num_positive)
        losses = {
            "loss_alignment": loss_alignment * self.alignment_weight,
            "loss_box": loss_box * self.box_weight,
            "loss_centerness": loss_centerness * self.centerness_weight,
        }
        losses["loss"] = losses["loss_alignment"] + losses["loss_box"] + losses["loss_centerness"]
        return losses
