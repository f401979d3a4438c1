"""COCO box evaluation through pycocotools' COCOeval (AP@[.5:.95], maxDets 100, as ODinW reports).

Detections enter as COCO result dicts `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`; model
boxes are xyxy, so convert them once with `xyxy_to_xywh` (or build the dicts with `detections_to_results`).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from glip_io.coco import detections_to_results, xyxy_to_xywh

__all__ = ["detections_to_results", "evaluate_detections", "load_results", "save_results", "xyxy_to_xywh"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RECALLS = ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def evaluate_detections(coco_gt, results: list[dict], *, image_ids: Sequence[int] | None = None,
                        category_names: dict[int, str] | None = None) -> dict:
    """COCOeval bbox metrics in percent (0-100).

    Args:
        coco_gt: pycocotools COCO ground truth (e.g. `CocoDetection.coco`).
        results: COCO result dicts; an empty list gives AP 0 (not a crash).
        image_ids: evaluate on these images only (default: every ground-truth image).
        category_names: category id -> name for `per_category` (default: the ground truth's names).

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", ..., "per_category": {name: AP or None when the
        category has no ground truth in these images}, "num_detections": int, "num_images": int}.
        Area-range metrics without ground truth in that range are None.
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    names = category_names or {cid: c["name"] for cid, c in coco_gt.cats.items()}
    _check_results(coco_gt, results)
    if not coco_gt.getAnnIds(imgIds=image_ids):
        raise ValueError("the ground truth has no boxes on these images: AP is undefined")
    if not results:
        out = {k: 0.0 for k in METRICS + RECALLS}
        out["per_category"] = {names[c]: (0.0 if coco_gt.getAnnIds(imgIds=image_ids, catIds=[c]) else None)
                               for c in sorted(coco_gt.cats)}
        return {**out, "num_detections": 0, "num_images": len(image_ids)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: _percent(v) for k, v in zip(METRICS + RECALLS, ev.stats)}
    precision = ev.eval["precision"]  # (T IoUs, R recalls, K categories, A areas, M maxDets)
    per_category = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_category[names[cat_id]] = float(p.mean() * 100.0) if p.size else None
    n_det = sum(1 for r in results if r["image_id"] in set(image_ids))
    return {**out, "per_category": per_category, "num_detections": n_det, "num_images": len(image_ids)}


def save_results(results: list[dict], path: str | Path) -> Path:
    """Write COCO results json (the format `COCO.loadRes` and evaluation servers read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def load_results(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: COCO results are a list of {{image_id, category_id, bbox, score}}")
    return data


def _percent(v: float) -> float | None:
    return None if v < 0 else float(v) * 100.0


def _check_results(coco_gt, results: list[dict]) -> None:
    for i, r in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise ValueError(f"{where}: needs image_id, category_id, bbox [x, y, w, h] and score, got {r!r}")
        if r["image_id"] not in coco_gt.imgs:
            raise ValueError(f"{where}: image_id {r['image_id']!r} is not in the ground truth")
        if r["category_id"] not in coco_gt.cats:
            raise ValueError(f"{where}: category_id {r['category_id']!r} is not in the ground truth "
                             f"(ids: {sorted(coco_gt.cats)})")
        box = r["bbox"]
        if len(box) != 4 or not all(math.isfinite(float(v)) for v in box) or box[2] < 0 or box[3] < 0:
            raise ValueError(f"{where}: bbox must be finite [x, y, w, h] with w, h >= 0 (COCO xywh), got {box!r}")
