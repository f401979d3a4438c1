"""COCO results records, the one format every JSON output of detections uses (evaluation files, `adapt detect`
and `adapt predict --json`, the server's answers).

A leaf module like the rest of `glip_io`, so the core's `Detections.to_coco`, the task evaluation and the
server all build their records here.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def xyxy_to_xywh(boxes):
    """(x0, y0, x1, y1) -> (x, y, w, h) on the last axis; list, numpy array or torch tensor in, same type out."""
    if isinstance(boxes, (list, tuple)):
        if boxes and not isinstance(boxes[0], (list, tuple)):
            x0, y0, x1, y1 = boxes
            return [x0, y0, x1 - x0, y1 - y0]
        return [xyxy_to_xywh(b) for b in boxes]
    out = boxes.clone() if hasattr(boxes, "clone") else np.array(boxes, copy=True)
    out[..., 2] = boxes[..., 2] - boxes[..., 0]
    out[..., 3] = boxes[..., 3] - boxes[..., 1]
    return out


def detections_to_results(image_id: int | None, boxes_xyxy, scores, labels,
                          label_to_category_id: Sequence[int] | None = None, *,
                          category_names: Sequence[str] | None = None, file_name: str | None = None) -> list[dict]:
    """COCO result records of one image: the one builder behind every JSON output (evaluation, `adapt detect` and
    `adapt predict --json`, the server's detections), so they all carry the same keys.

    A record is {"image_id", "file_name", "category_id", "category", "bbox": [x, y, w, h], "score"}; `labels` are
    0-based task labels and `label_to_category_id[label]` their category ids (`CocoDetection.label_to_cat_id`;
    default label + 1, COCO's 1-based ids). "category" (`category_names[label]`) and "file_name" are there when
    given, "image_id" unless it is None (a one-image answer, as the server's).
    """
    boxes = np.asarray(_to_numpy(boxes_xyxy), dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(_to_numpy(scores), dtype=np.float64).reshape(-1)
    labels = np.asarray(_to_numpy(labels)).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    records = []
    for box, score, label in zip(xyxy_to_xywh(boxes).tolist(), scores.tolist(), labels.astype(int).tolist()):
        record = {} if image_id is None else {"image_id": int(image_id)}
        if file_name is not None:
            record["file_name"] = file_name
        record["category_id"] = int(label_to_category_id[label]) if label_to_category_id is not None else label + 1
        if category_names is not None:
            record["category"] = category_names[label]
        records.append({**record, "bbox": box, "score": score})
    return records


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x
