"""The two numbers that read a per-image-prompt AP: the naming rate, and the AP50 of a name-blind detector."""
from __future__ import annotations

import torch

from adapt.evaluation import name_blind_floor, naming_rate
from tasks import detections_to_results
from tests._coco_helpers import ground_truth_as_predictions


def test_naming_rate_counts_hit_boxes_and_their_best_name(split):
    ids = split.image_ids
    perfect = ground_truth_as_predictions(split)
    assert naming_rate(split, perfect, ids) == {"hit_rate": 100.0, "naming_rate": 100.0}
    # Every box found, but a wrong name outscores the right one on image 1's two boxes.
    t = split.target(1)
    wrong = detections_to_results(1, t["boxes"], torch.full((2,), 0.9), 1 - t["labels"], split.label_to_cat_id)
    right = detections_to_results(1, t["boxes"], torch.full((2,), 0.5), t["labels"], split.label_to_cat_id)
    others = [r for r in perfect if r["image_id"] != 1]
    rates = naming_rate(split, wrong + right + others, ids)
    assert rates == {"hit_rate": 100.0, "naming_rate": 50.0}  # 2 of 4 boxes named right
    # A box nobody found counts against the hit rate, not the naming rate.
    assert naming_rate(split, others, ids) == {"hit_rate": 50.0, "naming_rate": 100.0}


def test_name_blind_floor_is_high_with_few_names_and_falls_with_more(split):
    ids = split.image_ids
    present_only = name_blind_floor(split, ids, lambda i: sorted({int(l) for l in split.target(i)["labels"]}))
    with_absent = name_blind_floor(split, ids, lambda i: [0, 1])
    # perfect boxes under random names: AP50 well above zero, and lower once absent names join the prompt
    assert 100 > present_only > with_absent > 0
