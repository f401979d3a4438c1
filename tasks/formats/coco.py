"""COCO folders: Roboflow exports and the standard layout.

- Roboflow: `train/ valid/ test/`, each with `_annotations.coco.json` (ODinW's copies:
  `annotations_without_background.json`) beside its images.
- Standard: `annotations/instances_<split>.json` beside the image folders (`<split>/`, else `images/`);
  `instances_val2017.json` is the split "val" (an alias of "valid").

The COCO file is validated as every COCO task is (`tasks.coco.CocoDetection`: a bad record is an error
naming the file and record). Read as a folder, two things are added: image ids are renumbered from the
file names, as in every folder format (`convert.stable_image_ids`), and image files in a split's own
folder that its annotation file does not list are reported.
"""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from tasks.coco import CocoDetection, DataError, _read_json, find_coco_splits
from tasks.formats.convert import FolderScan, list_images, relative, stable_image_ids
from tasks.task import SPLIT_ALIASES, SplitSpec

ROBOFLOW = "COCO (Roboflow export)"
ROBOFLOW_NEEDS = "train/, valid/, test/ folders, each with _annotations.coco.json beside its images"
STANDARD = "COCO"
STANDARD_NEEDS = "annotations/instances_<split>.json beside the image folders"
ROBOFLOW_FILES = ("_annotations.coco.json", "annotations_without_background.json")


def matches_roboflow(folder: Path) -> bool:
    return any((sub / name).is_file() for sub in folder.iterdir() if sub.is_dir() for name in ROBOFLOW_FILES)


def matches_standard(folder: Path) -> bool:
    return (folder / "annotations").is_dir() and any((folder / "annotations").glob("*.json"))


def scan_roboflow(folder: Path) -> FolderScan:
    return _scan(folder, ROBOFLOW)


def scan_standard(folder: Path) -> FolderScan:
    return _scan(folder, STANDARD)


def _scan(folder: Path, name: str) -> FolderScan:
    found = find_coco_splits(folder)
    shared = Counter(img_dir for _, img_dir in found.values())
    splits = {SPLIT_ALIASES.get(split, split): SplitSpec(
                  (relative(ann, folder),), relative(img_dir, folder),
                  read=functools.partial(read_split, ann, img_dir, folder, shared[img_dir] == 1))
              for split, (ann, img_dir) in found.items()}
    # Categories from the smallest file (the standard layout's train file can be large); every split is
    # checked against them when loaded.
    ann, img_dir = min(found.values(), key=lambda pair: pair[0].stat().st_size)
    categories = tuple(CocoDetection(ann, img_dir, check_files=False).categories)
    return FolderScan(name, categories, splits)


def read_split(ann_file: Path, img_dir: Path, root: Path, own_folder: bool) -> tuple[dict, list]:
    """The split's COCO dict with image ids from file names, and the images its folder holds unlisted."""
    data = _read_json(ann_file)
    if isinstance(data.get("images"), list) and not data["images"]:
        raise DataError(f"{ann_file}: the split has no images")
    renumber_by_file_name(data)
    skipped = []
    if own_folder and isinstance(data.get("images"), list):
        listed = {img_dir / img["file_name"] for img in data["images"]
                  if isinstance(img, dict) and isinstance(img.get("file_name"), str)}
        skipped = [f"{relative(path, root)}: image not listed in {ann_file.name}; ignored"
                   for path in list_images(img_dir) if path not in listed]
    return data, skipped


def renumber_by_file_name(data: dict) -> bool:
    """Give images the ids `stable_image_ids` derives from their file names (in place).

    A file whose image records or references are inconsistent is left as it is, for the loader to report.
    """
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        return False
    if not all(isinstance(img, dict) and isinstance(img.get("file_name"), str) and img["file_name"]
               and isinstance(img.get("id"), int) and not isinstance(img["id"], bool) for img in images):
        return False
    old_ids = [img["id"] for img in images]
    if len(set(old_ids)) != len(old_ids):
        return False
    known = set(old_ids)
    if not all(isinstance(a, dict) and a.get("image_id") in known for a in annotations):
        return False
    keys = _keys([img["file_name"] for img in images])
    new_ids = stable_image_ids(keys)
    by_old = {old: new_ids[key] for old, key in zip(old_ids, keys)}
    for img, key in zip(images, keys):
        img["id"] = new_ids[key]
    for ann in annotations:
        ann["image_id"] = by_old[ann["image_id"]]
    return True


def _keys(file_names: list[str]) -> list[str]:
    """File stems when they are distinct (as a YOLO or VOC copy names the images), else fuller names."""
    for keys in ([Path(n).stem for n in file_names], [Path(n).with_suffix("").as_posix() for n in file_names]):
        if len(set(keys)) == len(keys):
            return keys
    return list(file_names)
