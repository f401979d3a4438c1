"""Helpers of the task tests (the fixtures built on them are in tests/conftest.py): a small COCO split on disk,
and ground truth turned into predictions."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from tasks import CocoDetection, detections_to_results


def write_coco(folder: Path, *, images=None, annotations=None, categories=None, roboflow=True,
               ann_name="_annotations.coco.json", sizes=None) -> Path:
    """A small valid COCO split in `folder` (PNG images written for every image record)."""
    folder.mkdir(parents=True, exist_ok=True)
    if images is None:
        sizes = sizes or [(64, 48), (64, 48), (32, 32)]
        images = [{"id": i + 1, "file_name": f"img{i + 1}.png", "width": w, "height": h}
                  for i, (w, h) in enumerate(sizes)]
    if categories is None:
        categories = [{"id": 1, "name": "fish", "supercategory": "creatures"},
                      {"id": 2, "name": "shark", "supercategory": "creatures"}]
        if roboflow:
            categories = [{"id": 0, "name": "creatures", "supercategory": "none"}] + categories
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 0},
        ]
    for img in images:
        if isinstance(img, dict) and "file_name" in img and "width" in img:
            Image.new("RGB", (img["width"], img["height"]), (10, 20, 30)).save(folder / img["file_name"])
    path = folder / ann_name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ground_truth_as_predictions(ds: CocoDetection) -> list[dict]:
    results = []
    for image_id in ds.image_ids:
        t = ds.target(image_id)
        results += detections_to_results(image_id, t["boxes"], torch.ones(len(t["labels"])), t["labels"],
                                         ds.label_to_cat_id)
    return results
