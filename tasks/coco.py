"""COCO-format detection data: Roboflow/ODinW exports and plain COCO, validated on load.

Loading policy (nothing is dropped without being counted in `CocoDetection.report`):

- Missing or duplicate image/annotation/category ids, annotations on unknown images or categories,
  non-numeric or non-finite boxes, boxes with non-positive width/height, and boxes lying entirely outside
  their image are **rejected**: `DataError` names the file and the records (all of them, up to 20).
- Boxes that stick out of their image are **clipped** to it (default `box_policy="clip"`); the count goes
  to `report.clipped_boxes` and one warning. With `box_policy="error"` they are rejected instead.
- Roboflow's dataset-level category (id 0, e.g. "creatures", the supercategory of all real categories)
  is dropped as the official GLIP configs do; annotations that use it are an error.
- Crowd annotations (`iscrowd=1`) stay in the ground truth for evaluation but are excluded from training
  targets (counted in `report.crowd_annotations`).
- Images load with EXIF orientation applied; any mode (16-bit, palette, alpha, CMYK, ...) becomes RGB.
  Missing or unreadable images raise `DataError` naming the file and image id.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.category import Category

BOX_POLICIES = ("clip", "error")
_MAX_LISTED = 20


class DataError(ValueError):
    """Bad annotation data or an unreadable image; the message names the file and the records."""


@dataclass
class LoadReport:
    """What the loader did to the data, so that nothing happens silently."""

    ann_file: str
    num_images: int = 0
    num_annotations: int = 0
    clipped_boxes: int = 0
    crowd_annotations: int = 0
    dropped_categories: list[str] = field(default_factory=list)
    renamed_categories: list[str] = field(default_factory=list)
    images_without_annotations: int = 0
    exif_ignored: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.num_images} images, {self.num_annotations} boxes"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} records skipped (first: {self.skipped[0]})")
        if self.images_without_annotations:
            parts.append(f"{self.images_without_annotations} images without boxes")
        if self.clipped_boxes:
            parts.append(f"{self.clipped_boxes} boxes clipped to their image")
        if self.crowd_annotations:
            parts.append(f"{self.crowd_annotations} crowd boxes kept for evaluation only")
        if self.dropped_categories:
            parts.append(f"dropped Roboflow dataset category {', '.join(self.dropped_categories)}")
        if self.renamed_categories:
            parts.append(f"task names override file names: {', '.join(self.renamed_categories)}")
        return "; ".join(parts)


def load_rgb(path: str | Path, image_id: int | str | None = None,
             expected_size: tuple[int, int] | None = None, report: LoadReport | None = None) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert any mode to 8-bit RGB.

    If `expected_size` (width, height) matches the raw pixels but not the EXIF-rotated ones, the
    annotations were made on the raw pixels: the orientation is then ignored (counted in
    `report.exif_ignored`). A size that matches neither is an error.
    """
    where = f"{path}" + (f" (image id {image_id})" if image_id is not None else "")
    try:
        with Image.open(path) as raw:
            raw.load()
            image = ImageOps.exif_transpose(raw)
            if expected_size is not None and image.size != tuple(expected_size):
                if raw.size == tuple(expected_size):
                    image = raw.copy()
                    if report is not None:
                        report.exif_ignored += 1
                else:
                    raise DataError(f"{where}: image is {image.size[0]}x{image.size[1]} but the annotation "
                                    f"file says {expected_size[0]}x{expected_size[1]}")
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16/32-bit and float scaled to 0-255, alpha composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            arr = arr / 257.0
        else:  # 32-bit int or float: stretch the used range
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class CocoDetection:
    """A COCO-format split: `dataset[i] -> (PIL RGB image, target)`.

    target = {"image_id": int, "boxes": float32 tensor (K, 4) xyxy pixels, "labels": int64 tensor (K,)
    0-based indices into `categories`, "orig_size": (height, width)}.

    Args:
        ann_file: the COCO json.
        img_dir: folder the image `file_name`s are relative to.
        categories: the task's categories; their `id` (or position + 1) selects the file category. None
            takes the file's categories in id order (after dropping Roboflow's id 0).
        box_policy: "clip" (default) or "error" for boxes partly outside their image.
        check_files: verify on load that every image file exists.
        data: the COCO dict itself, read from another format (`tasks.formats`); `ann_file` then names the
            source in messages.
        skipped: the records that reader left out, one line each; kept in `report.skipped` and warned once.
    """

    def __init__(self, ann_file: str | Path, img_dir: str | Path, *, categories: Sequence[Category] | None = None,
                 box_policy: str = "clip", check_files: bool = True, data: dict | None = None,
                 skipped: Sequence[str] = ()):
        if box_policy not in BOX_POLICIES:
            raise ValueError(f"box_policy must be one of {BOX_POLICIES}, got {box_policy!r}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.report = LoadReport(ann_file=str(self.ann_file), skipped=list(skipped))
        if skipped:
            warnings.warn(f"{self.ann_file}: {len(skipped)} records skipped, first: {skipped[0]} "
                          "(`adapt tasks inspect` lists them all)", stacklevel=3)
        data = _read_json(self.ann_file) if data is None else data
        self.categories, file_cats = self._resolve_categories(data, categories)
        self._validate_and_clean(data, file_cats, box_policy)
        if check_files:
            self._check_files(data)
        self.coco = _build_coco(data)
        self.image_ids: list[int] = sorted(img["id"] for img in data["images"])
        self.cat_id_to_label = {cat_id: i for i, cat_id in enumerate(file_cats)}
        self.label_to_cat_id = list(file_cats)
        self.report.num_images = len(self.image_ids)
        self.report.num_annotations = len(data["annotations"])
        with_boxes = {a["image_id"] for a in data["annotations"]}
        self.report.images_without_annotations = sum(1 for i in self.image_ids if i not in with_boxes)

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        return self.load_image(image_id), self.target(image_id)

    def subset(self, image_ids: Sequence[int]) -> CocoDetection:
        """A view of this split restricted to `image_ids` (same COCO ground truth, same categories)."""
        unknown = sorted(set(image_ids) - set(self.image_ids))
        if unknown:
            raise KeyError(f"image ids {unknown[:10]} are not in {self.ann_file}")
        view = object.__new__(CocoDetection)
        view.__dict__.update(self.__dict__)
        view.image_ids = list(image_ids)
        return view

    def image_info(self, image_id: int) -> dict:
        return self.coco.imgs[image_id]

    def load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        return load_rgb(self.img_dir / info["file_name"], image_id, (info["width"], info["height"]), self.report)

    def target(self, image_id: int) -> dict:
        """Training target of one image (crowd boxes excluded)."""
        import torch

        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        labels = [self.cat_id_to_label[a["category_id"]] for a in anns]
        info = self.coco.imgs[image_id]
        return {
            "image_id": image_id,
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (K, 4) xyxy pixels
            "labels": torch.tensor(labels, dtype=torch.int64),  # (K,)
            "orig_size": (info["height"], info["width"]),
        }

    def image_labels(self, image_id: int) -> set[int]:
        """0-based labels present in an image (no crowd boxes), without loading pixels."""
        return {self.cat_id_to_label[a["category_id"]] for a in self.coco.imgToAnns.get(image_id, [])
                if not a.get("iscrowd", 0)}

    # -- loading ------------------------------------------------------------------------------------------

    def _resolve_categories(self, data: dict, categories: Sequence[Category] | None):
        where = str(self.ann_file)
        problems: list[str] = []
        cats = data.get("categories")
        if not isinstance(cats, list):
            raise DataError(f"{where}: 'categories' must be a list of {{id, name}} records")
        by_id: dict[int, dict] = {}
        for i, cat in enumerate(cats):
            cid = cat.get("id") if isinstance(cat, dict) else None
            if not isinstance(cid, int) or isinstance(cid, bool):
                problems.append(f"categories[{i}]: missing or non-integer id ({cat!r})")
            elif cid in by_id:
                problems.append(f"categories[{i}]: duplicate category id {cid} "
                                f"({by_id[cid].get('name')!r} and {cat.get('name')!r})")
            elif "name" not in cat:
                problems.append(f"categories[{i}]: category id {cid} has no name")
            else:
                by_id[cid] = cat
        _raise_if(problems, where)
        if 0 in by_id and _is_roboflow_dataset_category(by_id[0], by_id.values()):
            used = sum(1 for a in data.get("annotations", []) if isinstance(a, dict) and a.get("category_id") == 0)
            if used:
                raise DataError(f"{where}: {used} annotations use category id 0 ({by_id[0]['name']!r}), which is "
                                "Roboflow's dataset-level category; relabel them or remove the category")
            self.report.dropped_categories.append(f"id 0 {by_id[0]['name']!r}")
            del by_id[0]
            data["categories"] = [c for c in cats if not (isinstance(c, dict) and c.get("id") == 0)]
        if categories is None:
            ids = sorted(by_id)
            return [Category(str(by_id[i]["name"]), id=i) for i in ids], ids
        ids = [c.id if c.id is not None else k + 1 for k, c in enumerate(categories)]
        missing = [f"{c.name!r} (id {cid})" for c, cid in zip(categories, ids) if cid not in by_id]
        extra = [f"{by_id[cid]['name']!r} (id {cid})" for cid in sorted(set(by_id) - set(ids))]
        if missing or extra:
            msg = []
            if missing:
                msg.append(f"task categories not in the file: {', '.join(missing)}")
            if extra:
                msg.append(f"file categories not in the task: {', '.join(extra)}")
            raise DataError(f"{where}: categories do not match the task ({'; '.join(msg)})")
        for c, cid in zip(categories, ids):
            if str(by_id[cid]["name"]).strip().lower() != c.name.strip().lower():
                self.report.renamed_categories.append(f"{by_id[cid]['name']!r}->{c.name!r}")
        return list(categories), ids

    def _validate_and_clean(self, data: dict, cat_ids: Sequence[int], box_policy: str) -> None:
        where = str(self.ann_file)
        images, anns = data.get("images"), data.get("annotations")
        if not isinstance(images, list) or not isinstance(anns, list):
            raise DataError(f"{where}: 'images' and 'annotations' must both be lists")
        problems: list[str] = []
        img_by_id: dict[int, dict] = {}
        for i, img in enumerate(images):
            iid = img.get("id") if isinstance(img, dict) else None
            if not isinstance(iid, int) or isinstance(iid, bool):
                problems.append(f"images[{i}]: missing or non-integer id ({_short(img)})")
            elif iid in img_by_id:
                problems.append(f"images[{i}]: duplicate image id {iid} "
                                f"({img_by_id[iid].get('file_name')!r} and {img.get('file_name')!r})")
            elif not img.get("file_name"):
                problems.append(f"images[{i}]: image id {iid} has no file_name")
            elif not _positive_int(img.get("width")) or not _positive_int(img.get("height")):
                problems.append(f"images[{i}]: image id {iid} ({img['file_name']!r}) needs positive integer "
                                f"width and height, got {img.get('width')!r}x{img.get('height')!r}")
            else:
                img_by_id[iid] = img
        known_cats = set(cat_ids)
        seen_ann: set[int] = set()
        clipped, first_clipped = 0, None
        for i, ann in enumerate(anns):
            aid = ann.get("id") if isinstance(ann, dict) else None
            label = ann.get("origin") or f"annotations[{i}] (id {aid})"  # origin: the line a format reader read
            if not isinstance(aid, int) or isinstance(aid, bool):
                problems.append(f"annotations[{i}]: missing or non-integer id ({_short(ann)})")
                continue
            if aid in seen_ann:
                problems.append(f"{label}: duplicate annotation id {aid}")
                continue
            seen_ann.add(aid)
            img = img_by_id.get(ann.get("image_id"))
            if img is None:
                problems.append(f"{label}: unknown image id {ann.get('image_id')!r}")
                continue
            if ann.get("category_id") not in known_cats:
                problems.append(f"{label}: unknown category id {ann.get('category_id')!r} "
                                f"(image {img['file_name']!r})")
                continue
            box = ann.get("bbox")
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in box)):
                problems.append(f"{label}: bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
                continue
            x, y, w, h = (float(v) for v in box)
            if w <= 0 or h <= 0:
                problems.append(f"{label}: box {box} has non-positive size (image {img['file_name']!r})")
                continue
            W, H = img["width"], img["height"]
            if x >= 0 and y >= 0 and x + w <= W and y + h <= H:
                continue
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
            if x1 <= x0 or y1 <= y0:
                problems.append(f"{label}: box {box} lies outside its {W}x{H} image {img['file_name']!r}")
            elif box_policy == "error":
                problems.append(f"{label}: box {box} extends outside its {W}x{H} image {img['file_name']!r}")
            else:
                ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
                ann["area"] = (x1 - x0) * (y1 - y0)
                clipped += 1
                first_clipped = first_clipped or f"{label} {box} in {W}x{H} image {img['file_name']!r}"
        _raise_if(problems, where)
        for ann in anns:
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        self.report.crowd_annotations = sum(1 for a in anns if a["iscrowd"])
        self.report.clipped_boxes = clipped
        if clipped:
            warnings.warn(f"{where}: clipped {clipped} boxes that extend outside their image "
                          f"(first: {first_clipped}); pass box_policy='error' to reject them", stacklevel=3)

    def _check_files(self, data: dict) -> None:
        missing = [f"{img['file_name']!r} (image id {img['id']})" for img in data["images"]
                   if not (self.img_dir / img["file_name"]).is_file()]
        if missing:
            _raise_if([f"image file not found: {m}" for m in missing], f"{self.ann_file} (images in {self.img_dir})")


def _is_roboflow_dataset_category(cat0: dict, cats) -> bool:
    """Roboflow exports put the dataset name at id 0 as the supercategory of every real category."""
    others = [c for c in cats if c.get("id") != 0]
    return cat0.get("supercategory") == "none" or (
        bool(others) and all(c.get("supercategory") == cat0.get("name") for c in others))


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object with images/annotations/categories")
    return data


def _build_coco(data: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _raise_if(problems: list[str], where: str) -> None:
    if not problems:
        return
    listed = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise DataError(f"{where}: {len(problems)} problem(s):\n  {listed}{more}")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def find_coco_splits(folder: str | Path) -> dict[str, tuple[Path, Path]]:
    """Detect the layout of a COCO-format folder; returns split -> (annotation file, image folder).

    Understands the Roboflow/ODinW layout (`train/ valid/ test/` each with `_annotations.coco.json` or
    `annotations_without_background.json`) and plain COCO (`<split>2017/`, `images/<split>2017/` or `images/`
    with `annotations/instances_*.json`, else `annotations/*.json`, the split taken from the file name:
    `instances_val2017.json` -> "val"). Captions and keypoints files beside the instances files are no splits.
    """
    folder = Path(folder)
    found: dict[str, tuple[Path, Path]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        for ann in ("_annotations.coco.json", "annotations_without_background.json"):
            if (sub / ann).is_file():
                found.setdefault(sub.name, (sub / ann, sub))
    if found:
        return found
    ann_dir = folder / "annotations"
    anns = (sorted(ann_dir.glob("instances_*.json")) or sorted(ann_dir.glob("*.json"))) if ann_dir.is_dir() else []
    for ann in anns:
        split = ann.stem.split("_")[-1]  # instances_train2017 -> train2017
        img_dir = next((d for d in (folder / split, folder / "images" / split) if d.is_dir()), folder / "images")
        found[split.removesuffix("2017").removesuffix("2014") or ann.stem] = (ann, img_dir)
    if not found:
        raise DataError(f"{folder}: no COCO data found (expected train/ valid/ test/ with _annotations.coco.json, "
                        "or images/ with annotations/*.json)")
    return found
