"""Evaluation of a detector on a task split with pycocotools, under the prompt protocols we report.

Protocols:
  * "task": the task's prompt (its categories, with descriptions where the task has them), chunked
    if longer than the token limit — zero-shot evaluation and tuned evaluation alike.
  * "per-image-N": for held-in validation, each image gets its own prompt of N names (its present
    categories plus random absent ones, seeded by image id), as in GLIP's detection pretraining.
  * "all-chunked": every category of the task in one prompt, split into chunks that fill ≤256 tokens;
    "all-chunked-N": chunks of at most N categories (GLIP's LVIS evaluation uses 40).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torchvision.ops import box_convert, box_iou

from backbone.detector import GLIPDetector
from backbone.outputs import Detections
from backbone.processor import CategoryPrompt
from tasks.evaluate import detections_to_results, evaluate_detections

# The figures a run is judged by: COCO AP/AP50 and whether the right name wins (see naming_rate, name_blind_floor).
HEADLINE_METRICS = ("AP", "AP50", "hit_rate", "naming_rate", "name_blind_floor_AP50")


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """What `evaluate` measured: COCO AP in percent (None where no ground truth is in that area range) and how
    often the right name wins. `to_dict()` is its JSON form."""

    AP: float
    AP50: float
    AP75: float
    APs: float | None
    APm: float | None
    APl: float | None
    AR1: float
    AR10: float
    AR100: float
    ARs: float | None
    ARm: float | None
    ARl: float | None
    per_category: dict[str, float | None] = field(metadata={"help": "AP per category name (None: no ground truth)"})
    num_detections: int
    num_images: int
    protocol: str
    seconds_per_image: float
    hit_rate: float = field(metadata={"help": "% of ground-truth boxes some detection hits at IoU 0.5"})
    naming_rate: float = field(metadata={"help": "% of hit boxes whose best hit carries the right name"})
    name_blind_floor_AP50: float | None = field(default=None, metadata={
        "help": "AP50 of perfect boxes with random names under a per-image prompt protocol"})

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["name_blind_floor_AP50"] is None:
            del out["name_blind_floor_AP50"]
        return out

    def headline(self) -> dict[str, float]:
        """The HEADLINE_METRICS this evaluation has."""
        return {k: getattr(self, k) for k in HEADLINE_METRICS if getattr(self, k) is not None}

    def summary(self) -> dict:
        """AP by IoU and area, per category and the speed: what an adapter file and a tune report keep."""
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_category", "seconds_per_image")
        return {k: getattr(self, k) for k in keys}


def task_prompt(categories, use_descriptions: bool = True) -> list[CategoryPrompt]:
    """The detector prompt of a task's categories (prefix/phrase/suffix as the task defines them)."""
    return [CategoryPrompt(c.prompt_phrase, prefix=c.prefix if use_descriptions else "",
                           suffix=c.suffix if use_descriptions else "") for c in categories]


def per_image_names(dataset, image_id: int, num_names: int, seed: int = 0) -> list[int]:
    """Labels for an image's own prompt: its present categories plus random absent ones (deterministic)."""
    present = sorted({int(label) for label in dataset.target(image_id)["labels"]})
    rng = random.Random(f"per-image-prompt|{seed}|{image_id}")
    absent = [i for i in range(len(dataset.categories)) if i not in set(present)]
    labels = present + rng.sample(absent, max(0, min(len(absent), num_names - len(present))))
    rng.shuffle(labels)
    return labels


def run_detection(detector: GLIPDetector, dataset, labels_for_image: Callable[[int], Sequence[int]] | None,
                  batch_size: int = 8, limit: int | None = None,
                  detect_fn: Callable[[list, list], list[Detections]] | None = None,
                  max_categories: int | None = None) -> tuple[list[dict], float]:
    """COCO results for `dataset` (a tasks CocoDetection); returns (results, seconds per image)."""
    prompts = task_prompt(dataset.categories)
    image_ids = dataset.image_ids[:limit] if limit else dataset.image_ids
    results, started = [], time.perf_counter()
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        images = [dataset.load_image(i) for i in ids]
        label_lists = [list(labels_for_image(i)) if labels_for_image else list(range(len(prompts))) for i in ids]
        if detect_fn is not None:
            detections = detect_fn(images, label_lists)
        else:
            detections = detector.detect(images, [[prompts[j] for j in labels] for labels in label_lists],
                                         threshold=0.0, max_categories=max_categories)
        for image_id, labels, dets in zip(ids, label_lists, detections):
            task_labels = torch.tensor(labels, dtype=torch.long)[dets.labels] if len(dets) else dets.labels
            results += detections_to_results(image_id, dets.boxes, dets.scores, task_labels, dataset.label_to_cat_id)
    return results, (time.perf_counter() - started) / max(len(image_ids), 1)


def evaluate(detector: GLIPDetector, dataset, protocol: str = "task", *, limit: int | None = None,
             seed: int = 0, batch_size: int = 8, detect_fn=None) -> EvalResult:
    """Detect on every image of `dataset` under `protocol` and score with COCOeval (metrics in percent)."""
    chooser, max_categories = None, None
    if protocol == "task" or protocol == "all-chunked":
        pass
    elif protocol.startswith("all-chunked-") and protocol.rsplit("-", 1)[1].isdigit():
        max_categories = int(protocol.rsplit("-", 1)[1])
    elif protocol.startswith("per-image-"):
        num_names = int(protocol.rsplit("-", 1)[1])

        def chooser(image_id: int) -> list[int]:
            return per_image_names(dataset, image_id, num_names, seed)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; use 'task', 'all-chunked', 'all-chunked-N' or 'per-image-N'")
    results, per_image = run_detection(detector, dataset, chooser, batch_size, limit, detect_fn, max_categories)
    image_ids = dataset.image_ids[:limit] if limit else dataset.image_ids
    metrics = evaluate_detections(dataset.coco, results, image_ids=image_ids)
    metrics.update(protocol=protocol, seconds_per_image=per_image, **naming_rate(dataset, results, image_ids))
    if chooser is not None:
        metrics["name_blind_floor_AP50"] = name_blind_floor(dataset, image_ids, chooser, seed)
    return EvalResult(**metrics)


def naming_rate(dataset, results: list[dict], image_ids: Sequence[int], iou: float = 0.5) -> dict:
    """How often the right name wins where a box is found: of the ground-truth boxes that some detection hits at
    IoU >= `iou` (under any name), the share whose best-scoring hitting detection carries the right category.

    Returns {"hit_rate": % of ground-truth boxes hit, "naming_rate": % of hit boxes named right} (percent).
    """
    by_image: dict[int, list[dict]] = {}
    for record in results:
        by_image.setdefault(record["image_id"], []).append(record)
    boxes_hit = named = total = 0
    for image_id in image_ids:
        target = dataset.target(image_id)
        total += len(target["labels"])
        found = by_image.get(image_id, [])
        if not found or not len(target["labels"]):
            continue
        detected = box_convert(torch.tensor([r["bbox"] for r in found], dtype=torch.float32), "xywh", "xyxy")
        scores = torch.tensor([r["score"] for r in found])
        categories = torch.tensor([dataset.cat_id_to_label[r["category_id"]] for r in found])
        hits = box_iou(target["boxes"], detected) >= iou  # (gt, det)
        for gt, row in enumerate(hits):
            if row.any():
                boxes_hit += 1
                best = torch.where(row, scores, -1.0).argmax()
                named += int(categories[best] == target["labels"][gt])
    return {"hit_rate": 100.0 * boxes_hit / max(total, 1), "naming_rate": 100.0 * named / max(boxes_hit, 1)}


def name_blind_floor(dataset, image_ids: Sequence[int], labels_for_image: Callable[[int], Sequence[int]],
                     seed: int = 0) -> float:
    """AP50 of a detector that finds every box perfectly but cannot tell names apart: each ground-truth box is
    reported once for every prompted name of its image, with random scores. Per-image prompts of few names score
    well above zero this way, which is what a model's AP50 under that protocol must be read against."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for image_id in image_ids:
        boxes = dataset.target(image_id)["boxes"]
        for label in labels_for_image(image_id):
            scores = torch.rand(len(boxes), generator=generator)
            labels = torch.full((len(boxes),), int(label), dtype=torch.long)
            results += detections_to_results(image_id, boxes, scores, labels, dataset.label_to_cat_id)
    return evaluate_detections(dataset.coco, results, image_ids=image_ids)["AP50"]
