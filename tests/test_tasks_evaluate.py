"""COCOeval wrapper: box conversion, perfect predictions, zero detections, export, input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks import detections_to_results, evaluate_detections, save_results, xyxy_to_xywh
from tasks.evaluate import load_results
from tests._coco_helpers import ground_truth_as_predictions


def test_xyxy_to_xywh_for_lists_arrays_and_tensors():
    assert xyxy_to_xywh([10, 20, 30, 60]) == [10, 20, 20, 40]
    assert xyxy_to_xywh([[0, 0, 1, 2], [5, 5, 6, 9]]) == [[0, 0, 1, 2], [5, 5, 1, 4]]
    arr = np.array([[10.0, 20.0, 30.0, 60.0]])
    out = xyxy_to_xywh(arr)
    assert out.tolist() == [[10, 20, 20, 40]] and arr.tolist() == [[10, 20, 30, 60]]  # input untouched
    t = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    assert xyxy_to_xywh(t).tolist() == [[1, 2, 3, 6]] and isinstance(xyxy_to_xywh(t), torch.Tensor)


def test_ground_truth_as_predictions_gives_ap_100(split, capsys):
    results = ground_truth_as_predictions(split)
    assert results[0] == {"image_id": 1, "category_id": 1, "bbox": [4.0, 4.0, 20.0, 16.0], "score": 1.0}
    metrics = evaluate_detections(split.coco, results)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP75"] == pytest.approx(100.0)
    assert metrics["per_category"] == {"fish": pytest.approx(100.0), "shark": pytest.approx(100.0)}
    assert metrics["num_detections"] == 4 and metrics["num_images"] == 3
    assert capsys.readouterr().out == ""  # pycocotools' console output is suppressed


def test_zero_detections_give_ap_zero(split):
    metrics = evaluate_detections(split.coco, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["num_detections"] == 0
    assert metrics["per_category"] == {"fish": 0.0, "shark": 0.0}


def test_partial_and_shifted_predictions_score_between(split):
    results = ground_truth_as_predictions(split)
    fish_only = [r for r in results if r["category_id"] == 1]
    m = evaluate_detections(split.coco, fish_only)
    assert m["per_category"]["fish"] == pytest.approx(100.0) and m["per_category"]["shark"] == 0.0
    assert m["AP"] == pytest.approx(50.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + 0.3 * r["bbox"][2], *r["bbox"][1:]]} for r in results]
    m2 = evaluate_detections(split.coco, shifted)  # IoU ~0.54: counts at 0.5 only
    assert m2["AP50"] == pytest.approx(100.0) and m2["AP75"] == 0.0 and 0 < m2["AP"] < 20


def test_image_subset_and_missing_categories(split):
    results = ground_truth_as_predictions(split)
    m = evaluate_detections(split.coco, results, image_ids=[2])
    assert m["per_category"] == {"fish": None, "shark": pytest.approx(100.0)} and m["num_images"] == 1
    assert m["num_detections"] == 1


def test_results_export_round_trip(split, tmp_path):
    results = ground_truth_as_predictions(split)
    path = save_results(results, tmp_path / "out" / "results.json")
    assert load_results(path) == results
    assert evaluate_detections(split.coco, load_results(path))["AP"] == pytest.approx(100.0)


def test_bad_results_are_rejected(split):
    good = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "score": 0.5}
    with pytest.raises(ValueError, match=r"results\[0\]: image_id 99"):
        evaluate_detections(split.coco, [{**good, "image_id": 99}])
    with pytest.raises(ValueError, match=r"results\[1\]: category_id 0 is not in the ground truth"):
        evaluate_detections(split.coco, [good, {**good, "category_id": 0}])
    with pytest.raises(ValueError, match="COCO xywh"):
        evaluate_detections(split.coco, [{**good, "bbox": [10, 10, 5, -2]}])
    with pytest.raises(ValueError, match="needs image_id, category_id, bbox"):
        evaluate_detections(split.coco, [{"image_id": 1}])
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        detections_to_results(1, [[0, 0, 1, 1], [0, 0, 2, 2]], [0.5], [0, 0], [1])
