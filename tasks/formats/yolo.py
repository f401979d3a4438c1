"""YOLO detection folders (Ultralytics and Roboflow exports).

`data.yaml` holds `names` (a list, or a mapping index -> name) and one entry per split (`train`, `val`,
`test`): an image folder, a list of them, or a .txt file listing images. Each image's labels live in the
same path with `images` replaced by `labels` and the suffix by `.txt`, one object per line:
`class cx cy w h` normalised to the image size (a polygon `class x1 y1 x2 y2 ...` gives its bounding
box). Paths are relative to `path:` when it exists, else to the folder of `data.yaml`; Roboflow's
`../train/images` is read as `train/images`, as Ultralytics does.

An empty label file marks an image without objects. Every line or file that cannot be used is skipped and
reported with its file and line: an image without a label file, a label file without an image, a
malformed line, a class index out of range, a box without area or outside the image.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import yaml

from tasks.coco import DataError
from tasks.formats.convert import (FolderScan, SplitBuilder, check_names, numbered, image_size, is_image, list_images,
                                   relative)
from tasks.task import SPLIT_ALIASES, SplitSpec

NAME = "YOLO"
NEEDS = "data.yaml with `names` and train/val/test image folders, labels/ beside images/ holding <image>.txt"
DATA_FILES = ("data.yaml", "data.yml")
SPLIT_KEYS = ("train", "val", "valid", "test")


def matches(folder: Path) -> bool:
    return any((folder / name).is_file() for name in DATA_FILES)


def scan(folder: Path) -> FolderScan:
    data_file = next(folder / n for n in DATA_FILES if (folder / n).is_file())
    spec = _read_yaml(data_file)
    names = _names(spec, data_file)
    base, notes = _base(spec, folder, data_file)
    splits: dict[str, SplitSpec] = {}
    for key in SPLIT_KEYS:
        if spec.get(key) is None:
            continue
        split = SPLIT_ALIASES.get(key, key)
        sources = spec[key] if isinstance(spec[key], list) else [spec[key]]
        paths = [_resolve(base, str(s)) for s in sources]
        missing = [str(s) for s, p in zip(sources, paths) if not p.exists()]
        if missing:
            notes.append(f"{data_file.name}: {key}: {', '.join(missing)} not found under {base}; split left out")
            continue
        # one image folder: file names relative to it, as COCO's are; else relative to the dataset folder
        img_dir = paths[0] if len(paths) == 1 and paths[0].is_dir() else folder
        read = functools.partial(read_split, tuple(paths), names, folder, data_file, img_dir)
        splits[split] = SplitSpec((data_file.name,), relative(img_dir, folder), read=read)
    if not splits:
        raise DataError(f"{data_file}: no usable split: give `train:` (and `val:`, `test:`) as image folders "
                        f"relative to {base}" + (f" ({'; '.join(notes)})" if notes else ""))
    return FolderScan(NAME, numbered(names), splits, tuple(notes))


def read_split(sources: tuple[Path, ...], names: tuple[str, ...], root: Path, data_file: Path,
               img_dir: Path) -> tuple[dict, list]:
    """The COCO dict of one split and the lines of what was skipped."""
    out = SplitBuilder(names, root)
    images: dict[str, Path] = {}
    label_dirs = []
    for source in sources:
        for key, path in _images(source, out):
            if key in images:
                out.skip(path, None, f"another image of this split has the same name ({relative(images[key], root)}); "
                                     "skipped")
                continue
            images[key] = path
        if source.is_dir():
            label_dirs.append(label_path(source))
    known_labels = set()
    for key, path in images.items():
        label_file = label_path(path).with_suffix(".txt")
        known_labels.add(label_file)
        if not label_file.is_file():
            out.skip(path, None, f"no label file {relative(label_file, root)}; image skipped "
                                 "(an empty label file marks an image without objects)")
            continue
        try:
            width, height = image_size(path)
        except ValueError as error:
            out.skip(path, None, f"{error}; image skipped")
            continue
        out.add_image(key, relative(path, img_dir), width, height)
        _read_labels(label_file, key, width, height, len(names), out)
    for folder in label_dirs:
        for label_file in sorted(folder.rglob("*.txt")) if folder.is_dir() else []:
            if label_file not in known_labels:
                out.skip(label_file, None, "label file without an image; skipped")
    return out.build(f"{data_file} ({', '.join(relative(p, root) for p in sources)})"), out.skipped


def label_path(image_path: Path) -> Path:
    """The YOLO label location of an image or image folder: the last `images` part becomes `labels`."""
    parts = list(image_path.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    raise DataError(f"{image_path}: YOLO images live in an `images/` folder with `labels/` beside it")


def _read_labels(label_file: Path, key: str, width: int, height: int, num_names: int, out: SplitBuilder) -> None:
    try:
        lines = label_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        out.skip(label_file, None, f"unreadable label file ({error}); its boxes skipped")
        return
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            out.skip(label_file, number, f"not numbers: {line.strip()!r}; line skipped")
            continue
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            out.skip(label_file, number, f"expected `class cx cy w h` (or a polygon `class x1 y1 x2 y2 ...`), "
                                         f"got {len(values)} fields; line skipped")
            continue
        if not all(math.isfinite(v) for v in values):
            out.skip(label_file, number, f"non-finite value in {line.strip()!r}; line skipped")
            continue
        label = values[0]
        if not label.is_integer() or not 0 <= label < num_names:
            out.skip(label_file, number, f"class {fields[0]} out of range (data.yaml names {num_names} "
                                         f"categories: 0..{num_names - 1}); line skipped")
            continue
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        else:
            xs, ys = values[1::2], values[2::2]
            box = (min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height)
        out.add_box(key, int(label), box, label_file, number)


def _images(source: Path, out: SplitBuilder) -> list[tuple[str, Path]]:
    """(key, path) of a split source: a folder of images or a .txt file listing them."""
    if source.is_dir():
        return [(p.relative_to(source).with_suffix("").as_posix(), p) for p in list_images(source)]
    found = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        path = (source.parent / line.strip()).resolve()
        if not line.strip():
            continue
        if not is_image(path) or not path.is_file():
            out.skip(source, number, f"{line.strip()!r} is not an image file; skipped")
            continue
        found.append((path.with_suffix("").name, path))
    return found


def _read_yaml(path: Path) -> dict:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a mapping with `names` and `train`/`val`/`test` image folders")
    return spec


def _names(spec: dict, path: Path) -> tuple[str, ...]:
    names = spec.get("names")
    if names is None:
        raise DataError(f"{path}: no `names`; list the class names in label order (`names: [cat, dog]`) "
                        "or map indices to them (`names: {0: cat, 1: dog}`)")
    if isinstance(names, dict):
        keys = sorted(names, key=lambda k: int(k) if str(k).isdigit() else -1)
        if [str(k) for k in keys] != [str(i) for i in range(len(names))]:
            raise DataError(f"{path}: `names` keys must be the class indices 0..{len(names) - 1}, got "
                            f"{list(names)}")
        names = [names[k] for k in keys]
    if not isinstance(names, list):
        raise DataError(f"{path}: `names` must be a list or a mapping index -> name, got {names!r}")
    out = check_names(names, f"{path}: names")
    if "nc" in spec and spec["nc"] != len(out):
        raise DataError(f"{path}: nc is {spec['nc']!r} but `names` has {len(out)} entries; make them agree")
    return out


def _base(spec: dict, folder: Path, data_file: Path) -> tuple[Path, list[str]]:
    if spec.get("path") is None:
        return folder, []
    base = _resolve(folder, str(spec["path"]))
    if base.is_dir():
        return base, []
    return folder, [f"{data_file.name}: path {spec['path']!r} does not exist here; paths are read from {folder}"]


def _resolve(base: Path, text: str) -> Path:
    path = (base / Path(text).expanduser()).resolve()
    if not path.exists() and text.startswith("../"):  # Roboflow writes ../train/images beside data.yaml
        path = (base / text[3:]).resolve()
    return path
