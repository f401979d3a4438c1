"""What the format readers share: image listing and sizes, stable image ids, the skip log, the COCO dict.

Every reader turns its split into one COCO dict (boxes in pixels, `[x, y, w, h]`), so that loading,
few-shot sampling and pycocotools evaluation run the same code whatever the format on disk.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tasks.coco import DataError
from tasks.category import Category
from tasks.task import SplitSpec

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 degrees: width and height swap


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (any depth), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown, EXIF orientation applied, read from the header only.

    Raises:
        ValueError: the file is not a readable image.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image ({type(error).__name__}: {error})") from None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def stable_image_ids(keys: Sequence[str]) -> dict[str, int]:
    """Image ids derived from file names only, so every format of the same data numbers its images alike.

    A key is the image's path relative to its split's image folder, without suffix ("00042", "sub/cat").
    When every key is a distinct decimal number (COCO's "000000391895", generated "00042"), the id is that
    number, which keeps the ids of the COCO files such names come from; otherwise ids are 1, 2, ... in
    sorted key order. Few-shot sampling orders images by id, so it then picks the same images everywhere.
    """
    if all(k.isdigit() for k in keys) and len({int(k) for k in keys}) == len(keys):
        return {k: int(k) for k in keys}
    return {k: i + 1 for i, k in enumerate(sorted(keys))}


def relative(path: Path, root: Path) -> str:
    """`path` as shown in messages: relative to the dataset folder when inside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass
class SplitBuilder:
    """Collects one split's images, boxes and skipped records, then emits its COCO dict.

    Category ids are 1-based positions in `names`. Boxes are xyxy pixels; a box partly outside its image
    is kept for the loader to clip (counted there); one entirely outside or without area is a skip.
    """

    names: Sequence[str]
    root: Path
    skipped: list[str] = field(default_factory=list)
    _images: dict[str, dict] = field(default_factory=dict)
    _boxes: dict[str, list[dict]] = field(default_factory=dict)

    def skip(self, path: Path, where: str | int | None, what: str) -> None:
        """Record one left-out record: '<file>[:<line>| <record>]: <what>'."""
        self.skipped.append(f"{self.place(path, where)}: {what}")

    def place(self, path: Path, where: str | int | None) -> str:
        """'<file>:<line>' or '<file> <record>', the file relative to the dataset folder."""
        place = relative(path, self.root)
        if where is not None:
            place += f":{where}" if isinstance(where, int) else f" {where}"
        return place

    def add_image(self, key: str, file_name: str, width: int, height: int) -> None:
        self._images[key] = {"file_name": file_name, "width": int(width), "height": int(height)}
        self._boxes[key] = []

    def add_box(self, key: str, label: int, box: Sequence[float], path: Path, where: str | int,
                crowd: bool = False) -> bool:
        """Add an xyxy pixel box of category `label` (0-based); False (and a skip) when it cannot be a box."""
        x0, y0, x1, y1 = (float(v) for v in box)
        image = self._images[key]
        width, height = image["width"], image["height"]
        shown = f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}]"
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            self.skip(path, where, f"box {shown} is not finite; skipped")
            return False
        if not x1 > x0 or not y1 > y0:
            self.skip(path, where, f"box {shown} (xyxy pixels) has no area; skipped")
            return False
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            self.skip(path, where, f"box {shown} (xyxy pixels) lies outside its {width}x{height} image; skipped")
            return False
        # `origin` lets the COCO loader name the source line in its own messages (e.g. a clipped box)
        self._boxes[key].append({"category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                 "area": (x1 - x0) * (y1 - y0), "iscrowd": int(crowd),
                                 "origin": self.place(path, where)})
        return True

    def build(self, source: str | Path) -> dict:
        """The COCO dict: images numbered by `stable_image_ids`, annotations in image-id order.

        Raises:
            DataError: the split has no images (`source` names it).
        """
        if not self._images:
            why = f"; {len(self.skipped)} records were skipped, first: {self.skipped[0]}" if self.skipped else ""
            raise DataError(f"{source}: the split has no images{why}")
        ids = stable_image_ids(list(self._images))
        images, annotations = [], []
        for key in sorted(self._images, key=ids.__getitem__):
            images.append({"id": ids[key], **self._images[key]})
            for box in self._boxes[key]:
                annotations.append({"id": len(annotations) + 1, "image_id": ids[key], **box})
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.names)]
        return {"images": images, "annotations": annotations, "categories": categories}


@dataclass(frozen=True)
class FolderScan:
    """What a format reader found in a dataset folder.

    Attributes:
        format: the format's display name.
        categories: the categories in label order; `id` is the category id of the converted COCO dict.
        splits: split name -> where it lives; `SplitSpec.read` converts it to a COCO dict.
        notes: things the reader left out of the task, one line each (shown by `adapt tasks inspect`).
    """

    format: str
    categories: tuple[Category, ...]
    splits: dict[str, SplitSpec]
    notes: tuple[str, ...] = ()


def check_names(names: Iterable[str], where: str) -> tuple[str, ...]:
    """Category names as given, refusing empty or repeated ones (labels and prompts need them distinct)."""
    out = tuple(str(n).strip() for n in names)
    if not out:
        raise DataError(f"{where}: no category names")
    empty = [i for i, n in enumerate(out) if not n]
    if empty:
        raise DataError(f"{where}: category {empty[0]} has an empty name")
    seen: set[str] = set()
    for name in out:
        if name in seen:
            raise DataError(f"{where}: category name {name!r} appears twice; names must be distinct")
        seen.add(name)
    return out


def numbered(names: Sequence[str]) -> tuple[Category, ...]:
    """Categories of a converted split: ids 1, 2, ... in label order, as `SplitBuilder.build` writes them."""
    return tuple(Category(name, id=k + 1) for k, name in enumerate(names))
