"""Dataset folders as tasks: the format is detected, and every format reads into the same COCO model.

    task = folder_task("exports/myfood")      # what get_task("exports/myfood") returns
    train = task.split("train")                # a tasks.coco.CocoDetection, whatever the format

Formats, tried in this order (the first that matches is used):

- COCO as Roboflow exports it: `train/ valid/ test/`, each with `_annotations.coco.json`;
- COCO in its standard layout: `annotations/instances_<split>.json` beside the image folders;
- YOLO: `data.yaml` with `names` and per-split image folders, `labels/` beside `images/`;
- Pascal VOC: `Annotations/*.xml`, `JPEGImages/`, `ImageSets/Main/{train,val,test}.txt`.

The same data in any of them gives the same task: categories in the same order, the same boxes, and image
ids derived from file names, so few-shot sampling picks the same images.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.coco import DataError
from tasks.formats import coco, voc, yolo
from tasks.formats.convert import FolderScan
from tasks.category import Category
from tasks.task import Task


@dataclass(frozen=True)
class Format:
    """A dataset folder format: its name, what a folder needs to be one, its test and its reader."""

    name: str
    needs: str
    matches: Callable[[Path], bool]
    scan: Callable[[Path], FolderScan]


FORMATS = (
    Format(coco.ROBOFLOW, coco.ROBOFLOW_NEEDS, coco.matches_roboflow, coco.scan_roboflow),
    Format(coco.STANDARD, coco.STANDARD_NEEDS, coco.matches_standard, coco.scan_standard),
    Format(yolo.NAME, yolo.NEEDS, yolo.matches, yolo.scan),
    Format(voc.NAME, voc.NEEDS, voc.matches, voc.scan),
)


def detect_format(folder: str | Path) -> Format:
    """The format of a dataset folder.

    Raises:
        FileNotFoundError: no such folder.
        DataError: the folder matches no format; the message says what each format needs.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    for fmt in FORMATS:
        if fmt.matches(folder):
            return fmt
    needs = "; ".join(f"{fmt.name} needs {fmt.needs}" for fmt in FORMATS)
    raise DataError(f"{folder} is no dataset folder of a known format: {needs}")


def scan_folder(folder: str | Path) -> FolderScan:
    """Detect the format of `folder` and read its categories and splits (no split is loaded yet)."""
    folder = Path(folder).expanduser().resolve()
    return detect_format(folder).scan(folder)


def folder_task(folder: str | Path, *, name: str | None = None, descriptions: Sequence[Category] = (),
                eval_split: str | None = None, description: str = "", task_file: Path | None = None) -> Task:
    """The task of a dataset folder in any detected format.

    Args:
        folder: the dataset folder.
        name: task name (default: the folder's name).
        descriptions: categories carrying prompt text (prefix, suffix, phrase), matched to the folder's by
            name; the folder's order and ids stay.
        eval_split: the split reported by default (default: test, else valid, else the first).
        description: shown by `adapt tasks show`.
        task_file: the task file that names this folder, if any (named in `Task.source`).
    """
    folder = Path(folder).expanduser().resolve()
    scan = scan_folder(folder)
    if scan.notes:
        warnings.warn(f"{folder}: {'; '.join(scan.notes)}", stacklevel=2)
    splits = scan.splits
    if eval_split is None:
        eval_split = next((s for s in ("test", "valid") if s in splits), next(iter(splits)))
    elif eval_split not in splits:
        raise ValueError(f"{folder}: eval_split {eval_split!r} is not one of its splits {sorted(splits)}")
    return Task(name=name or folder.name, categories=describe(scan.categories, descriptions, str(folder)),
                splits=splits, root=folder, eval_split=eval_split, suite="user", description=description,
                source=f"{scan.format} folder {folder}" + (f", named by task file {task_file}" if task_file else ""))


def describe(categories: Sequence[Category], descriptions: Sequence[Category], where: str) -> tuple[Category, ...]:
    """`categories` with the prompt text of the `descriptions` of the same name (case ignored)."""
    by_name = {c.name.strip().lower(): c for c in categories}
    unknown = [d.name for d in descriptions if d.name.strip().lower() not in by_name]
    if unknown:
        raise ValueError(f"{where}: categories {unknown} are not in the data; its categories are "
                         f"{[c.name for c in categories]}")
    extra = {d.name.strip().lower(): d for d in descriptions}
    out = []
    for cat in categories:
        text = extra.get(cat.name.strip().lower())
        out.append(cat if text is None else replace(cat, prefix=text.prefix, suffix=text.suffix, phrase=text.phrase))
    return tuple(out)


__all__ = ["FORMATS", "Format", "FolderScan", "describe", "detect_format", "folder_task", "scan_folder"]
