"""Pascal VOC folders: `Annotations/<id>.xml`, `JPEGImages/<id>.<ext>`, `ImageSets/Main/<split>.txt`.

Category order comes from `labels.txt` (one name a line) or `labelmap.txt` (CVAT's `name:color:...`
lines; its `background` entry is not a category), else from the sorted names in the XML files. Box
corners are 1-based inclusive pixel indices, so `xmin=1, xmax=W` covers the whole width: the box becomes
`[xmin - 1, ymin - 1, xmax, ymax]` in COCO pixel coordinates. `difficult` objects are kept for
evaluation as ignored regions (COCO `iscrowd`) and left out of training, as VOC evaluation ignores them.

An id listed without its XML or image, an XML without `size`, an object of an unknown class or with a
box without area or outside the image: each is skipped and reported with its file and line or object.
"""
from __future__ import annotations

import functools
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from tasks.coco import DataError
from tasks.formats.convert import IMAGE_SUFFIXES, FolderScan, SplitBuilder, check_names, numbered, relative
from tasks.task import SPLIT_ALIASES, SplitSpec

NAME = "Pascal VOC"
NEEDS = "Annotations/*.xml, JPEGImages/ and ImageSets/Main/{train,val,test}.txt"
LABEL_FILES = ("labels.txt", "labelmap.txt")
SET_NAMES = ("train", "val", "test")
_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


def matches(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "ImageSets" / "Main").is_dir()


def scan(folder: Path) -> FolderScan:
    if not (folder / "JPEGImages").is_dir():
        raise DataError(f"{folder}: a Pascal VOC folder needs its images in JPEGImages/")
    sets_dir, notes = folder / "ImageSets" / "Main", []
    set_files = {SPLIT_ALIASES.get(n, n): sets_dir / f"{n}.txt" for n in SET_NAMES if (sets_dir / f"{n}.txt").is_file()}
    if "train" not in set_files and (sets_dir / "trainval.txt").is_file():
        set_files["train"] = sets_dir / "trainval.txt"
        notes.append("ImageSets/Main/trainval.txt is the train split (there is no train.txt)")
    if not set_files:
        raise DataError(f"{sets_dir}: no train.txt, val.txt or test.txt; list each split's image ids there")
    names, source, label_notes = _label_file_names(folder)
    notes += label_notes
    if names is None:
        found = {name for f in set_files.values() for xml in _xml_files(folder, f) for name in _object_names(xml)}
        if not found:
            raise DataError(f"{folder}: no objects in the XML files of {', '.join(sorted(set_files))} "
                            f"and no {' or '.join(LABEL_FILES)} naming the categories")
        names, source = tuple(sorted(found)), "the sorted names in the XML files"
    splits = {split: SplitSpec((relative(path, folder),), "JPEGImages",
                               read=functools.partial(read_split, path, names, source, folder))
              for split, path in set_files.items()}
    return FolderScan(NAME, numbered(names), splits, tuple(notes))


def read_split(set_file: Path, names: tuple[str, ...], names_source: str, root: Path) -> tuple[dict, list]:
    """The COCO dict of the split listed in `set_file` and the lines of what was skipped."""
    out = SplitBuilder(names, root)
    index = {name: k for k, name in enumerate(names)}
    seen: set[str] = set()
    for number, image_id in _set_ids(set_file):
        if image_id in seen:
            out.skip(set_file, number, f"{image_id!r} is listed twice; skipped")
            continue
        seen.add(image_id)
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            out.skip(set_file, number, f"{image_id!r} has no Annotations/{image_id}.xml; image skipped")
            continue
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as error:
            out.skip(xml, None, f"not valid XML ({error}); image skipped")
            continue
        image = _image_file(root / "JPEGImages", image_id, tree.findtext("filename"))
        if image is None:
            out.skip(xml, None, f"no image JPEGImages/{image_id}.<{'|'.join(s[1:] for s in IMAGE_SUFFIXES)}>; "
                                "skipped")
            continue
        width, height = _size(tree)
        if width is None:
            out.skip(xml, None, "no <size> with positive integer <width> and <height>; image skipped")
            continue
        out.add_image(image_id, image.name, width, height)
        for k, obj in enumerate(tree.findall("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            where = f"object {k} ({name!r})"
            if name not in index:
                out.skip(xml, where, f"class {name!r} is not one of the categories (from {names_source}); "
                                     "object skipped")
                continue
            corners = _corners(obj)
            if corners is None:
                out.skip(xml, where, "needs a <bndbox> with numeric xmin, ymin, xmax, ymax; object skipped")
                continue
            xmin, ymin, xmax, ymax = corners
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            out.add_box(image_id, index[name], (xmin - 1, ymin - 1, xmax, ymax), xml, where, crowd=difficult)
    return out.build(set_file), out.skipped


def _set_ids(set_file: Path) -> list[tuple[int, str]]:
    """(line number, image id) of a split file; per-class files add a second column, which is ignored."""
    lines = set_file.read_text(encoding="utf-8").splitlines()
    return [(n, line.split()[0]) for n, line in enumerate(lines, start=1) if line.strip()]


def _xml_files(root: Path, set_file: Path) -> list[Path]:
    paths = (root / "Annotations" / f"{image_id}.xml" for _, image_id in _set_ids(set_file))
    return [p for p in paths if p.is_file()]


def _object_names(xml: Path) -> list[str]:
    try:
        return [(o.findtext("name") or "").strip() for o in ET.parse(xml).getroot().findall("object")
                if (o.findtext("name") or "").strip()]
    except ET.ParseError:
        return []  # reported when the split is read


def _label_file_names(folder: Path) -> tuple[tuple[str, ...] | None, str, list[str]]:
    for file_name in LABEL_FILES:
        path = folder / file_name
        if not path.is_file():
            continue
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        notes = []
        if file_name == "labelmap.txt":
            lines = [line.split(":", 1)[0].strip() for line in lines]
            if "background" in lines:
                lines.remove("background")
                notes.append("labelmap.txt: `background` is not a category; left out")
        return check_names(lines, str(path)), file_name, notes
    return None, "", []


def _image_file(folder: Path, image_id: str, file_name: str | None) -> Path | None:
    if file_name and Path(file_name.strip()).stem == image_id and (folder / file_name.strip()).is_file():
        return folder / file_name.strip()
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{image_id}{suffix}", folder / f"{image_id}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _size(tree: ET.Element) -> tuple[int, int] | tuple[None, None]:
    size = tree.find("size")
    try:
        width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    except (AttributeError, TypeError, ValueError):
        return None, None
    return (width, height) if width > 0 and height > 0 else (None, None)


def _corners(obj: ET.Element) -> tuple[float, float, float, float] | None:
    box = obj.find("bndbox")
    try:
        values = tuple(float(box.findtext(tag)) for tag in _BOX_TAGS)
    except (AttributeError, TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None
