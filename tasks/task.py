"""A detection task: name, ordered categories (with optional prompt descriptions), data location, splits.

Prompts follow the official GLIP evaluation/fine-tuning format (`od_to_grounding.py`,
`create_queries_and_maps`): for each category in order, `prefix + name + suffix`, joined by ". ", with no
trailing separator; only the *name* characters are positive for the category, the description is context.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.category import Category
from tasks.coco import CocoDetection

SEPARATOR = ". "
SPLIT_ALIASES = {"val": "valid", "validation": "valid", "mini_val": "minival"}


@dataclass(frozen=True)
class SplitSpec:
    """Where a split lives, relative to the task's root.

    Attributes:
        ann_files: candidate annotation files; the first that exists is used (the loader reports which).
        img_dir: folder the `file_name`s of the annotation file are relative to.
        read: for data in another format (a YOLO or VOC folder, see `tasks.formats`): a function returning
            the split as a COCO dict and the lines of the records it skipped; `ann_files` then name the
            source for messages.
    """

    ann_files: tuple[str, ...]
    img_dir: str
    read: Callable[[], tuple[dict, list[str]]] | None = field(default=None, compare=False, repr=False)


def roboflow_splits(prefix: str = "", names: Sequence[str] = ("train", "valid", "test"),
                    ann_files: Sequence[str] = ("_annotations.coco.json",)) -> dict[str, SplitSpec]:
    """Roboflow/ODinW layout: `<prefix>/<split>/<ann file>` with the images beside it."""
    out = {}
    for name in names:
        folder = f"{prefix}/{name}" if prefix else name
        out[SPLIT_ALIASES.get(name, name)] = SplitSpec(tuple(f"{folder}/{a}" for a in ann_files), folder)
    return out


def build_prompt(categories: Sequence[Category], *, use_descriptions: bool = True,
                 separator: str = SEPARATOR) -> tuple[str, list[tuple[int, int]]]:
    """The detection prompt for `categories` and the character span `[beg, end)` of each phrase.

    >>> build_prompt([Category("fish"), Category("penguin", suffix=" , which is black and white")])
    ('fish. penguin , which is black and white', [(0, 4), (6, 13)])
    """
    caption, spans = "", []
    for i, cat in enumerate(categories):
        if use_descriptions:
            caption += cat.prefix
        phrase = cat.prompt_phrase
        if not phrase.strip():
            raise ValueError(f"category {cat.name!r} has an empty prompt phrase; set Category.phrase")
        spans.append((len(caption), len(caption) + len(phrase)))
        caption += phrase
        if use_descriptions:
            caption += cat.suffix
        if i < len(categories) - 1:
            caption += separator
    return caption, spans


class DataNotFoundError(FileNotFoundError):
    """A task's data is not on disk; the message says which command gets it."""


@dataclass(frozen=True, kw_only=True)
class Task:
    """A detection task.

    Attributes:
        name: registry name (what users type).
        categories: ordered categories; label i of a target is `categories[i]`.
        splits: split name -> `SplitSpec`, paths relative to `root`.
        subdir: for built-in tasks, the task folder relative to a data root.
        root: the task folder on disk, once known (`bind(data_root)` or a user task file).
        eval_split: the split reported by default (the official ODinW configs evaluate on "val"/"minival").
        suite: "odinw13", "odinw35", "icons" or "user".
        source: where the data comes from, for `adapt tasks show`.
        fetch_file: Hub path (`odinw_35/<Name>.zip` in GLIPModel/GLIP) for downloadable tasks.
        generate: for generated tasks, a function `generate(root)` that writes the data into `root`.
    """

    name: str
    categories: tuple[Category, ...]
    splits: Mapping[str, SplitSpec]
    subdir: str = ""
    root: Path | None = None
    eval_split: str = "test"
    suite: str = "user"
    description: str = ""
    source: str = ""
    fetch_file: str | None = None
    generate: Callable[[Path], object] | None = field(default=None, compare=False, repr=False)

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def has_descriptions(self) -> bool:
        return any(c.has_description for c in self.categories)

    def bind(self, data_root: str | Path) -> Task:
        """This task with `root` resolved under `data_root` (user tasks keep their own root)."""
        if self.root is not None and not self.subdir:
            return self
        return dataclasses.replace(self, root=Path(data_root).expanduser() / self.subdir)

    def prompt(self, *, use_descriptions: bool = True) -> tuple[str, list[tuple[int, int]]]:
        return build_prompt(self.categories, use_descriptions=use_descriptions)

    def split_name(self, name: str) -> str:
        key = SPLIT_ALIASES.get(name, name)
        if key not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {name!r}; its splits are {sorted(self.splits)}")
        return key

    def split_paths(self, name: str) -> tuple[Path, Path]:
        """(annotation file, image folder) of a split; the annotation file is the first candidate present."""
        spec = self.splits[self.split_name(name)]
        root = self._require_root()
        for candidate in spec.ann_files:
            if (root / candidate).is_file():
                return root / candidate, root / spec.img_dir
        tried = ", ".join(str(root / c) for c in spec.ann_files)
        raise DataNotFoundError(f"task {self.name!r}, split {name!r}: no annotation file (tried {tried}). "
                                f"{self.how_to_get()}")

    def is_available(self) -> bool:
        try:
            return all(self.split_paths(s) for s in self.splits)
        except (DataNotFoundError, ValueError):
            return False

    def prepare(self) -> Path:
        """Make sure the data is on disk: generate it if this task is generated, else explain how to get it."""
        root = self._require_root()
        if self.is_available():
            return root
        if self.generate is not None:
            self.generate(root)
            return root
        raise DataNotFoundError(f"task {self.name!r}: data not found under {root}. {self.how_to_get()}")

    def how_to_get(self) -> str:
        if self.generate is not None:
            return f"Generate it with `adapt tasks generate {self.name}` (or any command that loads it)."
        if self.fetch_file is not None:
            return (f"Download it with `adapt tasks fetch {self.name}` (data root: --root DIR or $ADAPT_DATA).")
        return "Check the paths in the task file."

    def split(self, name: str, **loader_options):
        """The dataset of split `name` (generated on first use for generated tasks).

        Keyword arguments go to `tasks.coco.CocoDetection` (e.g. `box_policy`).
        """
        try:
            ann_file, img_dir = self.split_paths(name)
        except DataNotFoundError:
            if self.generate is None:
                raise
            self.prepare()
            ann_file, img_dir = self.split_paths(name)
        read = self.splits[self.split_name(name)].read
        data, skipped = read() if read is not None else (None, ())
        return CocoDetection(ann_file, img_dir, categories=self.categories, data=data, skipped=skipped,
                             **loader_options)

    def _require_root(self) -> Path:
        if self.root is None:
            raise ValueError(f"task {self.name!r} has no data location yet; use get_task(name, data_root=...) "
                             "or task.bind(data_root)")
        return self.root
