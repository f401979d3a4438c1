"""GLIP's grounding loss on hand-made cases: ATSS assignment, token targets, focal/GIoU/centerness values.

The anchor set used throughout: two levels, strides 8 and 16, anchor sides 16 and 32 (base size 2),
on a 4x4 and a 2x2 grid = 20 anchors. Level 0 anchor i = 4y + x is [-4, -4, 11, 11] + 8(x, y, x, y)
with centre (3.5 + 8x, 3.5 + 8y); level 1 anchor 16 + 2y + x is [-8, -8, 23, 23] + 16(x, y, x, y)
with centre (7.5 + 16x, 7.5 + 16y).
"""
from __future__ import annotations

import math

import pytest
import torch

from backbone.anchors import BoxCoder, grid_anchors
from backbone.loss import (
    GroundingLoss,
    _box_iou_plus_one,
    GroundingTarget,
    alignment_loss,
    assign_targets,
    centerness_targets,
    giou_loss,
    token_targets,
)
from backbone.outputs import HeadOutputs

SHAPES = [(4, 4), (2, 2)]
ANCHORS = grid_anchors(SHAPES, (8, 16), base_size=2)  # (20, 4)
N = ANCHORS.shape[0]

# Box A's centre-y edge sits 0.005 below anchor 6's centre (11.5): inside by less than the 0.01 margin.
BOX_A = [11.0, 2.0, 28.0, 11.505]
BOX_A_MARGIN_OK = [11.0, 2.0, 28.0, 11.52]  # the same box, 0.02 beyond anchor 6's centre
BOX_B = [12.0, 5.0, 27.0, 20.0]  # overlaps anchor 6 = [12, 4, 27, 19] almost exactly


def positives(matched: torch.Tensor) -> list[int]:
    return (matched >= 0).nonzero().flatten().tolist()


def target(boxes: list[list[float]], positive_map: list[list[int]] | None = None, num_tokens: int = 6):
    if positive_map is None:
        positive_map = [[0] * num_tokens for _ in boxes]
    return GroundingTarget(torch.tensor(boxes).reshape(-1, 4),
                           torch.tensor(positive_map, dtype=torch.bool).reshape(len(boxes), -1))


def head_outputs(logits: torch.Tensor, text_mask: torch.Tensor | None = None, deltas: torch.Tensor | None = None,
                 centerness: torch.Tensor | None = None) -> HeadOutputs:
    batch, _, num_tokens = logits.shape
    return HeadOutputs(
        box_deltas=torch.zeros(batch, N, 4) if deltas is None else deltas,
        centerness=torch.zeros(batch, N) if centerness is None else centerness,
        alignment_logits=logits,
        anchors=ANCHORS,
        level_shapes=SHAPES,
        image_sizes=[(32, 32)] * batch,
        text_mask=torch.ones(batch, num_tokens, dtype=torch.long) if text_mask is None else text_mask,
        fused_text=torch.zeros(batch, num_tokens, 1),
        fused_visual=[],
    )


def focal_by_hand(logit: float, positive: bool, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if positive:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


# ---------------------------------------------------------------- assignment


def test_anchor_set_is_the_documented_one():
    assert ANCHORS[2].tolist() == [12.0, -4.0, 27.0, 11.0]
    assert ANCHORS[6].tolist() == [12.0, 4.0, 27.0, 19.0]
    assert ANCHORS[17].tolist() == [8.0, -8.0, 39.0, 23.0]


def test_iou_uses_the_legacy_plus_one_widths():
    # Anchor 2 = [12, -4, 27, 11] (16 x 16 pixels), box A (18 x 10.505): inter 16 x 10 = 160.
    iou = _box_iou_plus_one(ANCHORS[[2, 15]], torch.tensor([BOX_A]))
    torch.testing.assert_close(iou, torch.tensor([[160 / (256 + 18 * 10.505 - 160)], [0.0]]))
    # Boxes sharing the column x = 9 overlap by one pixel column: 10 / (100 + 100 - 10).
    touching = _box_iou_plus_one(torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.tensor([[9.0, 0.0, 18.0, 9.0]]))
    assert touching.item() == pytest.approx(10 / 190)


def test_atss_one_box_mean_std_and_centre_inside():
    # Box A, topk 4. Centre (19.5, 6.7525). Candidates by centre distance:
    #   level 0 (4 of 16): 2 (2.25), 6 (5.75), 1 and 3 (8.31); next is 5 at 9.85;
    #   level 1 (min(4, 4) = all): 17, 16, 19, 18.
    # IoU (+1 widths), e.g. anchor 2: inter 16·10 = 160, areas 256 and 18·10.505 → 160/285.09 = 0.5612.
    # IoUs 2: .5612, 6: .4404, 1/3: .2535, 17: .1847, 16: .1269, 19: .0716, 18: .0507
    # mean .2428 + unbiased std .1788 = threshold .4216 → above: 2 and 6.
    # Centre inside by > 0.01: 2 yes; 6 no (its centre y 11.5 is 0.005 from the bottom edge);
    # 1, 3, 17 are inside but below the threshold.
    matched = assign_targets(ANCHORS, SHAPES, target([BOX_A]), topk=4)
    assert positives(matched) == [2]
    assert matched[2] == 0

    # The same box 0.015 taller puts anchor 6's centre inside by 0.02: now positive too.
    matched = assign_targets(ANCHORS, SHAPES, target([BOX_A_MARGIN_OK]), topk=4)
    assert positives(matched) == [2, 6]


def test_atss_threshold_uses_unbiased_std():
    # topk 9: level 0 keeps 9 of 16, level 1 all 4 = 13 candidates.
    # Candidate IoUs: 15: .7343, 11: .3740, 14: .3405, 19: .2344, 10: .1952, ... mean .1637.
    # Unbiased std .2143 → threshold .3780: only anchor 15. The population std (.2059, threshold
    # .3696) would also take anchor 11, whose centre (27.5, 19.5) is inside the box.
    matched = assign_targets(ANCHORS, SHAPES, target([[19.0, 19.0, 34.0, 33.0]]), topk=9)
    assert positives(matched) == [15]


def test_atss_anchor_positive_for_two_boxes_takes_the_higher_iou():
    # Anchor 6 is positive for box A' (IoU .4411) and for box B (IoU .8824): B wins. Anchor 2 stays with A'.
    for order in ([BOX_A_MARGIN_OK, BOX_B], [BOX_B, BOX_A_MARGIN_OK]):
        matched = assign_targets(ANCHORS, SHAPES, target(order), topk=4)
        a, b = order.index(BOX_A_MARGIN_OK), order.index(BOX_B)
        assert positives(matched) == [2, 6]
        assert matched[2].item() == a and matched[6].item() == b


def test_atss_no_boxes_is_all_background():
    matched = assign_targets(ANCHORS, SHAPES, GroundingTarget.empty(6))
    assert matched.dtype == torch.long and matched.tolist() == [-1] * N


def test_atss_rejects_level_shapes_that_do_not_match_the_anchors():
    with pytest.raises(ValueError, match="describe 16 anchors"):
        assign_targets(ANCHORS, [(4, 4)], target([BOX_A]))


# ---------------------------------------------------------------- targets


def test_two_phrases_token_targets_land_on_their_tokens():
    # Prompt "[CLS] red fish . sea star [SEP]" (T = 7): phrase 0 = tokens 1, 2; phrase 1 = tokens 4, 5.
    pm = [[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]]
    boxes = [BOX_A_MARGIN_OK, [1.0, 15.0, 15.0, 27.0]]
    outputs = head_outputs(torch.zeros(1, N, 7))
    matched, tokens = GroundingLoss(topk=4).assign(outputs, [target(boxes, pm)])
    assert (matched[0] == 0).nonzero().flatten().tolist() == [2, 6]
    assert (matched[0] == 1).nonzero().flatten().tolist() == [8, 9]
    for anchor in (2, 6):
        assert tokens[0, anchor].tolist() == [0, 1, 1, 0, 0, 0, 0]
    for anchor in (8, 9):
        assert tokens[0, anchor].tolist() == [0, 0, 0, 0, 1, 1, 0]
    background = matched[0] < 0
    assert background.sum() == N - 4 and tokens[0, background].sum() == 0  # no [NoObj] target


def test_token_targets_pad_a_narrower_positive_map_and_reject_a_wider_one():
    matched = torch.tensor([1, -1, 0])
    pm = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    assert token_targets(matched, pm, 4).tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="beyond the prompt"):
        token_targets(matched, torch.tensor([[0, 0, 1]], dtype=torch.bool), 2)


def test_centerness_targets_by_hand():
    # Anchor 2 centre (19.5, 3.5) in box A': l = r = 8.5, t = 1.5, b = 8.02 → sqrt(1.5 / 8.02).
    # Anchor 6 centre (19.5, 11.5): t = 9.5, b = 0.02 → sqrt(0.02 / 9.5).
    boxes = torch.tensor([BOX_A_MARGIN_OK, BOX_A_MARGIN_OK])
    got = centerness_targets(ANCHORS[[2, 6]], boxes)
    expected = torch.tensor([math.sqrt(1.5 / 8.02), math.sqrt(0.02 / 9.5)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


# ---------------------------------------------------------------- loss values


def test_focal_loss_single_pair_matches_the_formula():
    # FL = -α (1 - p)^γ log p for a positive, -(1 - α) p^γ log(1 - p) for a negative, p = σ(x).
    logit = torch.tensor([[[0.5]]])
    mask = torch.ones(1, 1)
    pos = alignment_loss(logit, torch.ones(1, 1, 1), mask, normaliser=1.0)
    neg = alignment_loss(logit, torch.zeros(1, 1, 1), mask, normaliser=1.0)
    assert pos.item() == pytest.approx(focal_by_hand(0.5, True), rel=1e-6)
    assert pos.item() == pytest.approx(0.0168934, rel=1e-5)  # 0.25 · 0.142537 · 0.474077
    assert neg.item() == pytest.approx(focal_by_hand(0.5, False), rel=1e-6)
    assert neg.item() == pytest.approx(0.2830587, rel=1e-5)  # 0.75 · 0.387456 · 0.974077
    assert alignment_loss(logit, torch.ones(1, 1, 1), mask, normaliser=4.0).item() == pytest.approx(pos.item() / 4)


def test_giou_loss_by_hand():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [3.0, 3.0, 1.0, 1.0]])  # the second is inverted
    tgt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    # 1: inter 1, union 7, enclosing 9 → 1 - (1/7 - 2/9). 2: collapses to a point at (3, 3): union 4,
    # enclosing 9 → 1 - (0 - 5/9).
    torch.testing.assert_close(giou_loss(pred, tgt), torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 5 / 9]))
    assert giou_loss(tgt, tgt).abs().max() < 1e-6


def test_image_without_boxes_gives_only_negative_alignment_terms():
    torch.manual_seed(0)
    logits = torch.randn(1, N, 5, requires_grad=True)
    deltas = torch.randn(1, N, 4, requires_grad=True)
    centerness = torch.randn(1, N, requires_grad=True)
    losses = GroundingLoss()(head_outputs(logits, deltas=deltas, centerness=centerness),
                             [GroundingTarget.empty(5)])
    expected = sum(focal_by_hand(x, False) for x in logits.detach().flatten().tolist())  # / max(0 positives, 1)
    assert losses["loss_alignment"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_box"].item() == 0 and losses["loss_centerness"].item() == 0
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    losses["loss"].backward()
    assert logits.grad.abs().sum() > 0
    assert deltas.grad is not None and deltas.grad.abs().sum() == 0  # a grad path, no signal
    assert centerness.grad is not None and centerness.grad.abs().sum() == 0


def test_no_positive_anchor_in_the_batch_is_finite():
    # No anchor centre lies inside [0, 0, 2, 2] (the nearest is at 3.5, 3.5): a box but no positive.
    logits = torch.zeros(1, N, 4, requires_grad=True)
    deltas = torch.zeros(1, N, 4, requires_grad=True)
    losses = GroundingLoss()(head_outputs(logits, deltas=deltas), [target([[0.0, 0.0, 2.0, 2.0]], [[0, 1, 0, 0]])])
    assert losses["loss_alignment"].item() == pytest.approx(N * 4 * focal_by_hand(0.0, False), rel=1e-5)
    assert losses["loss_box"].item() == 0 and losses["loss_centerness"].item() == 0
    losses["loss"].backward()
    assert torch.isfinite(deltas.grad).all() and torch.isfinite(logits.grad).all()


def perfect_case(boxes, pm, num_tokens, topk=4):
    """Logits ±30 on the right tokens, deltas = encode(gt, anchor), centerness logits = logit(target)."""
    coder = BoxCoder()
    tgt = target(boxes, pm, num_tokens)
    loss = GroundingLoss(topk=topk)
    matched, tokens = loss.assign(head_outputs(torch.zeros(1, N, num_tokens)), [tgt])
    pos = matched[0] >= 0
    gt = tgt.boxes[matched[0][pos]]
    deltas = torch.zeros(1, N, 4)
    deltas[0, pos] = coder.encode(gt, ANCHORS[pos])
    ctr = centerness_targets(ANCHORS[pos], gt)
    centerness = torch.zeros(1, N)
    centerness[0, pos] = torch.logit(ctr.double()).float()
    logits = torch.where(tokens > 0, 30.0, -30.0)
    return loss, head_outputs(logits, deltas=deltas, centerness=centerness), tgt, ctr


def test_perfect_predictions_give_near_zero_alignment_and_box_loss():
    pm = [[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]]
    loss, outputs, tgt, ctr = perfect_case([BOX_A_MARGIN_OK, [1.0, 15.0, 15.0, 27.0]], pm, 7)
    losses = loss(outputs, [tgt])
    assert losses["loss_alignment"].item() < 1e-9
    assert losses["loss_box"].item() < 1e-5
    # Centerness BCE cannot go below the targets' entropy: Σ H(c) / num_pos with the 4 positives.
    entropy = sum(-c * math.log(c) - (1 - c) * math.log(1 - c) for c in ctr.tolist()) / 4
    assert losses["loss_centerness"].item() == pytest.approx(entropy, rel=1e-4)

    # Moving one positive's box off target raises the box loss; it stays GIoU weighted by centerness × 2.
    bad = outputs.box_deltas.clone()
    bad[0, 2, 0] += 5.0
    worse = loss(head_outputs(outputs.alignment_logits, deltas=bad, centerness=outputs.centerness), [tgt])
    assert worse["loss_box"].item() > 0.1


def test_box_loss_value_by_hand():
    # One positive (anchor 15 for box [19, 19, 34, 33]), predicted box = the anchor itself (zero deltas).
    # GIoU loss × centerness / centerness = the GIoU loss, × REG_LOSS_WEIGHT 2.
    box = [19.0, 19.0, 34.0, 33.0]
    losses = GroundingLoss(topk=9)(head_outputs(torch.zeros(1, N, 3)), [target([box], [[0, 1, 0]], 3)])
    pred = ANCHORS[15]  # [20, 20, 35, 35]: inter 14·13 = 182, areas 225 and 210, enclosing 16·16 = 256
    union = 225 + 210 - 182
    expected = 2 * (1 - (182 / union - (256 - union) / 256))
    assert pred.tolist() == [20.0, 20.0, 35.0, 35.0]
    assert losses["loss_box"].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- gradients and batching


def test_gradients_reach_logits_deltas_and_centerness():
    torch.manual_seed(1)
    logits = torch.randn(1, N, 6, requires_grad=True)
    deltas = (0.1 * torch.randn(1, N, 4)).requires_grad_()
    centerness = torch.randn(1, N, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    outputs = head_outputs(logits, text_mask=mask, deltas=deltas, centerness=centerness)
    losses = GroundingLoss(topk=4)(outputs, [target([BOX_A_MARGIN_OK], [[0, 1, 1, 0, 0, 0]])])
    losses["loss"].backward()
    assert logits.grad[..., :4].abs().sum() > 0
    assert logits.grad[..., 4:].abs().sum() == 0  # padding tokens get nothing
    assert deltas.grad[0, [2, 6]].abs().sum() > 0 and deltas.grad[0, [0, 1, 3]].abs().sum() == 0
    assert centerness.grad[0, [2, 6]].abs().sum() > 0 and centerness.grad[0, 0] == 0


def test_different_length_prompts_in_one_batch():
    # Image 0: 6 tokens, box A'. Image 1: 4 real tokens + 2 padding, its positive map only 4 wide, box B.
    torch.manual_seed(2)
    logits = torch.randn(2, N, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    deltas = 0.1 * torch.randn(2, N, 4)
    centerness = torch.randn(2, N)
    targets = [target([BOX_A_MARGIN_OK], [[0, 0, 0, 1, 1, 0]]),
               GroundingTarget(torch.tensor([BOX_B]), torch.tensor([[0, 1, 1, 0]], dtype=torch.bool))]
    loss = GroundingLoss(topk=4)
    batched = loss(head_outputs(logits, mask, deltas, centerness), targets)

    # Whatever sits at image 1's padded positions, even NaN, changes nothing.
    poisoned = logits.clone()
    poisoned[1, :, 4:] = float("nan")
    poisoned = poisoned.requires_grad_()
    again = loss(head_outputs(poisoned, mask, deltas, centerness), targets)
    for name in batched:
        assert again[name].item() == pytest.approx(batched[name].item(), rel=1e-6)
    again["loss"].backward()
    assert torch.isfinite(poisoned.grad).all()

    # Batched == per image: the sums over pairs / positives add up (2 positives in image 0, 1 in image 1).
    single = [loss(head_outputs(logits[i:i + 1, :, :length], mask[i:i + 1, :length], deltas[i:i + 1],
                                centerness[i:i + 1]), [targets[i]])
              for i, length in ((0, 6), (1, 4))]
    matched, _ = loss.assign(head_outputs(logits, mask), targets)
    counts = (matched >= 0).sum(1).tolist()
    assert counts == [2, 1]
    for name in ("loss_alignment", "loss_centerness"):
        assert batched[name].item() * 3 == pytest.approx(sum(s[name].item() * c for s, c in zip(single, counts)),
                                                         rel=1e-5)


def test_an_image_without_boxes_next_to_one_with_boxes_adds_only_negative_terms():
    torch.manual_seed(3)
    logits = torch.randn(2, N, 5)
    targets = [target([BOX_A_MARGIN_OK], [[0, 1, 1, 0, 0]], 5), GroundingTarget.empty(5)]
    loss = GroundingLoss(topk=4)
    both = loss(head_outputs(logits), targets)
    first = loss(head_outputs(logits[:1]), targets[:1])
    negatives = sum(focal_by_hand(x, False) for x in logits[1].flatten().tolist())
    # Both normalised by the same 2 positives (all in image 0).
    assert both["loss_alignment"].item() == pytest.approx(first["loss_alignment"].item() + negatives / 2, rel=1e-5)
    assert both["loss_box"].item() == pytest.approx(first["loss_box"].item(), rel=1e-6)
    assert both["loss_centerness"].item() == pytest.approx(first["loss_centerness"].item(), rel=1e-6)


def test_bad_targets_are_rejected_with_the_reason():
    outputs = head_outputs(torch.zeros(1, N, 4), text_mask=torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="where text_mask is 0"):
        GroundingLoss()(outputs, [target([BOX_A], [[0, 0, 1, 0]], 4)])
    with pytest.raises(ValueError, match="one per image"):
        GroundingLoss()(outputs, [])
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        GroundingTarget(torch.zeros(2, 5), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="K = 2 boxes"):
        GroundingTarget(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.bool))


def test_single_process_group_gives_the_same_losses(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    torch.manual_seed(4)
    outputs = head_outputs(torch.randn(1, N, 5), deltas=0.1 * torch.randn(1, N, 4), centerness=torch.randn(1, N))
    targets = [target([BOX_A_MARGIN_OK], [[0, 1, 1, 0, 0]], 5)]
    plain = GroundingLoss(topk=4)(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reduced = GroundingLoss(topk=4)(outputs, targets)
    finally:
        dist.destroy_process_group()
    for name in plain:
        assert reduced[name].item() == pytest.approx(plain[name].item(), rel=1e-6)
