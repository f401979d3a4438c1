"""K-shot subsets following the GLIP/ODinW protocol.

"K-shot" means at least K images per category, where an image counts for every category it contains:
one greedy pass keeps an image if any of its categories still needs examples (`modulated_coco.py`,
`CocoGrounding`). The official README pass runs over image ids in sorted order, so it ignores the seed;
GLIP's seeded subsets (seeds 3, 30, 300) ship as `fewshot_train_shot{K}_seed{S}.json` with the ODinW
downloads. Here:

- `source="official-file"`: that file is present beside the split's annotation file (and wanted): its
  images are used as they are;
- `source="seeded"`: our own subset: image ids sorted, shuffled by the seed with a platform-independent
  RNG (Fisher-Yates over `random.Random(seed).random()`, the one draw Python keeps stable), then the pass;
- `seed=None` gives the official unshuffled pass (`source="sorted"`).
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SOURCES = ("seeded", "official-file", "sorted")


@dataclass(frozen=True)
class FewShotSubset:
    """The chosen training images and how they were chosen.

    Attributes:
        image_ids: chosen image ids, in pass order.
        shots: K.
        seed: the seed (None for the sorted pass).
        source: "seeded", "official-file" or "sorted".
        images_per_category: category name -> number of chosen images containing it (>= shots).
        file: the official split file, when used.
    """

    image_ids: tuple[int, ...]
    shots: int
    seed: int | None
    source: str
    images_per_category: dict[str, int] = field(default_factory=dict)
    file: Path | None = None

    def describe(self) -> str:
        how = {"seeded": f"seeded subset (seed {self.seed}, our greedy pass)",
               "official-file": f"official split file {self.file}",
               "sorted": "official unshuffled pass over sorted image ids"}[self.source]
        return f"{self.shots}-shot: {len(self.image_ids)} images from {how}"


def stable_shuffle(items: Sequence, seed: int) -> list:
    """Fisher-Yates driven only by `random.Random(seed).random()`: the same order on every platform/version."""
    rnd = random.Random(seed).random
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = min(i, int(rnd() * (i + 1)))
        out[i], out[j] = out[j], out[i]
    return out


def official_split_file(ann_file: str | Path, shots: int, seed: int) -> Path:
    return Path(ann_file).parent / f"fewshot_train_shot{shots}_seed{seed}.json"


def sample_few_shot(dataset_or_coco, shots: int, seed: int | None, *, use_official: bool = True,
                    official_file: str | Path | None = None) -> FewShotSubset:
    """A K-shot subset of a training split.

    Args:
        dataset_or_coco: a `tasks.coco.CocoDetection` (preferred: it knows the task's categories and its
            annotation file) or a pycocotools `COCO`.
        shots: K >= 1.
        seed: shuffle seed; None for the unshuffled official pass.
        use_official: use `fewshot_train_shot{K}_seed{S}.json` beside the annotation file when present.
        official_file: an explicit official split file (overrides the lookup).

    Raises:
        ValueError: no training images, or some category has fewer than K images (named in the message).
    """
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    coco, image_ids, labels_of, names, ann_file = _view(dataset_or_coco)
    if not image_ids:
        raise ValueError(f"{ann_file or 'dataset'}: no training images to sample {shots}-shot from")
    if official_file is None and use_official and seed is not None and ann_file is not None:
        candidate = official_split_file(ann_file, shots, seed)
        official_file = candidate if candidate.is_file() else None
    if official_file is not None:
        ids = _read_official(Path(official_file), coco, set(image_ids))
        return FewShotSubset(tuple(ids), shots, seed, "official-file", _counts(ids, labels_of, names),
                             Path(official_file))
    order = sorted(image_ids) if seed is None else stable_shuffle(sorted(image_ids), seed)
    need = {label: shots for label in range(len(names))}
    chosen = []
    for image_id in order:
        present = labels_of(image_id)
        if any(need[label] > 0 for label in present):
            chosen.append(image_id)
            for label in present:
                need[label] -= 1
    short = {names[label]: shots - left for label, left in need.items() if left > 0}
    if short:
        listing = ", ".join(f"{n!r} has {have}" for n, have in short.items())
        raise ValueError(f"{ann_file or 'dataset'}: cannot draw {shots}-shot: {listing} training image(s) "
                         f"(need {shots} each); use fewer shots")
    return FewShotSubset(tuple(chosen), shots, seed, "seeded" if seed is not None else "sorted",
                         _counts(chosen, labels_of, names))


def _view(obj):
    """(coco, image ids, image_id -> set of 0-based labels, category names, annotation file or None)."""
    if hasattr(obj, "image_labels") and hasattr(obj, "coco"):  # tasks.coco.CocoDetection
        return obj.coco, list(obj.image_ids), obj.image_labels, obj.category_names, getattr(obj, "ann_file", None)
    coco = obj
    cat_ids = sorted(coco.cats)
    label = {cid: i for i, cid in enumerate(cat_ids)}

    def labels_of(image_id: int) -> set[int]:
        return {label[a["category_id"]] for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)}

    return coco, sorted(coco.imgs), labels_of, [coco.cats[c]["name"] for c in cat_ids], None


def _counts(ids, labels_of, names) -> dict[str, int]:
    counts = {n: 0 for n in names}
    for image_id in ids:
        for label in labels_of(image_id):
            counts[names[label]] += 1
    return counts


def _read_official(path: Path, coco, known_ids: set[int]) -> list[int]:
    """Image ids of an official split file, matched to this split by file name (ids may be renumbered)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable few-shot split file ({e})") from None
    by_name = {img["file_name"]: img["id"] for img in coco.imgs.values()}
    ids, missing = [], []
    for img in data.get("images", []):
        image_id = by_name.get(img.get("file_name"))
        if image_id is None or image_id not in known_ids:
            missing.append(img.get("file_name"))
        else:
            ids.append(image_id)
    if missing:
        raise ValueError(f"{path}: {len(missing)} image(s) are not in the training split, e.g. {missing[:3]}")
    if not ids:
        raise ValueError(f"{path}: the few-shot split file lists no images")
    return ids
