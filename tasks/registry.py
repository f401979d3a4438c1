"""Flat registry of tasks (name -> Task) and user task files.

A dataset folder is a task: its format (COCO as Roboflow exports it or in the standard layout, YOLO,
Pascal VOC) is detected by `tasks.formats`. A user task file (YAML or JSON) names such a folder and can add
prompt descriptions::

    name: my-parts                 # optional, default: the file name
    data: ../exports/parts         # folder, relative to this file; any format tasks.formats detects
    categories:                    # optional: prompt descriptions, matched to the data's categories by name
      - {name: washer, suffix: " which is flat and round"}
    eval_split: test               # optional

Or it lists COCO files itself, categories then matched by position (or `id`) rather than by name::

    data: ../exports/parts
    categories: [screw, washer]    # optional, default: read from the first annotation file
    splits:
      train: {ann_file: train/_annotations.coco.json, img_dir: train}

`get_task("path/to/task.yaml")` loads a task file, `get_task("path/to/folder")` a dataset folder, and
`get_task("aquarium")` looks the name up.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

from tasks.category import Category
from tasks.formats import folder_task
from tasks.task import SPLIT_ALIASES, SplitSpec, Task

TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_FILE_KEYS = {"name", "data", "categories", "splits", "eval_split", "description"}
_CATEGORY_KEYS = {"name", "prefix", "suffix", "phrase", "id"}


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def default_data_root() -> Path:
    """Where data lives when no root is given: the user cache dir (the CLI also honours $ADAPT_DATA)."""
    return Path.home() / ".cache" / "glip-adapt" / "data"


@lru_cache(maxsize=1)
def _builtin() -> dict[str, Task]:
    from tasks.icons.suite import icon_tasks
    from tasks.odinw import odinw_tasks

    return {**odinw_tasks(), **icon_tasks()}


_USER: dict[str, Task] = {}


def registry() -> dict[str, Task]:
    """All registered tasks by name (built-in, then `register_task` additions)."""
    return {**_builtin(), **_USER}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    if not overwrite and task.name in registry():
        raise ValueError(f"a task named {task.name!r} is already registered; pass overwrite=True to replace it")
    _USER[task.name] = task
    return task


def list_tasks(suite: str | None = None) -> list[str]:
    """Registered task names, optionally of one suite ("odinw13", "odinw35", "icons", "user")."""
    tasks = registry()
    if suite is None:
        return list(tasks)
    if suite == "odinw35":
        return [n for n, t in tasks.items() if t.suite in ("odinw13", "odinw35")]
    return [n for n, t in tasks.items() if t.suite == suite]


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_task(name_or_path: str | Path, data_root: str | Path | None = None) -> Task:
    """A task by registry name (case and punctuation ignored: "thermalDogsAndPeople" works), task file path or
    dataset folder (`tasks.formats.folder_task`).

    A name that is both a registered task and a folder here is the registered task; write `./name` for the folder.
    Built-in tasks are bound to `data_root` (default `default_data_root()`).
    Raises:
        UnknownTaskError: no such task; the message lists close matches.
        FileNotFoundError: a path that does not exist.
        tasks.coco.DataError: a folder of no known format; the message says what each format needs.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(TASK_FILE_SUFFIXES) or path.is_file():
        return load_task_file(path)
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or os.sep in text or text.startswith((".", "~"))
    if looks_like_path:
        if not path.is_dir():
            raise FileNotFoundError(f"{text}: no such dataset folder or task file")
        return folder_task(path)
    tasks = registry()
    task = tasks.get(text)
    if task is None:
        by_key = {_key(n): t for n, t in tasks.items()}
        task = by_key.get(_key(text))
    if task is None and path.is_dir():
        return folder_task(path)
    if task is None:
        close = difflib.get_close_matches(text.lower(), list(tasks), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownTaskError(f"unknown task {text!r}.{hint} (see `adapt tasks list`; a task file must end in "
                               f"{'/'.join(TASK_FILE_SUFFIXES)}; a dataset folder must exist)")
    return task.bind(data_root if data_root is not None else default_data_root())


def load_task_file(path: str | Path) -> Task:
    """A task from a YAML/JSON file pointing at a dataset folder (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ValueError(f"{path}: cannot parse task file ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a task file is a mapping with at least `data: <folder>`")
    _check_keys(spec, _FILE_KEYS, f"{path}")
    if "data" not in spec:
        raise ValueError(f"{path}: missing `data:` (the dataset folder, relative to the task file)")
    root = (path.parent / str(spec["data"])).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{path}: data folder {root} does not exist")
    eval_split = SPLIT_ALIASES.get(str(spec.get("eval_split", "")), spec.get("eval_split"))
    if spec.get("splits") is None:  # the folder's own layout, in any format; this file names it and describes
        descriptions = _file_categories(spec["categories"], {}, root, path) if spec.get("categories") else ()
        return folder_task(root, name=str(spec.get("name") or path.stem), descriptions=descriptions,
                           eval_split=eval_split, description=str(spec.get("description", "")),
                           task_file=path)
    splits = _file_splits(spec["splits"], path)
    categories = _file_categories(spec.get("categories"), splits, root, path)
    if eval_split is None:
        eval_split = next((s for s in ("test", "valid", "val") if s in splits), next(iter(splits)))
    if eval_split not in splits:
        raise ValueError(f"{path}: eval_split {eval_split!r} is not one of the splits {sorted(splits)}")
    return Task(name=str(spec.get("name") or path.stem), categories=categories, splits=splits, root=root,
                eval_split=eval_split, suite="user", description=str(spec.get("description", "")),
                source=f"task file {path}")


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; allowed: {sorted(allowed)}")


def _file_splits(spec, path: Path) -> dict[str, SplitSpec]:
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{path}: `splits` maps split names to {{ann_file, img_dir}}")
    out = {}
    for name, entry in spec.items():
        if not isinstance(entry, dict) or "ann_file" not in entry:
            raise ValueError(f"{path}: split {name!r} needs `ann_file` (and `img_dir`, default: its folder)")
        _check_keys(entry, {"ann_file", "img_dir"}, f"{path}: split {name!r}")
        ann = str(entry["ann_file"])
        out[SPLIT_ALIASES.get(str(name), str(name))] = SplitSpec((ann,), str(entry.get("img_dir", Path(ann).parent)))
    return out


def _file_categories(spec, splits: dict[str, SplitSpec], root: Path, path: Path) -> tuple[Category, ...]:
    if spec is None:  # read them from the first split's annotation file (Roboflow's id 0 dropped)
        from tasks.coco import CocoDetection

        first = next(iter(splits.values()))
        return tuple(CocoDetection(root / first.ann_files[0], root / first.img_dir, check_files=False).categories)
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"{path}: `categories` is a list of names or {{name, prefix, suffix}} mappings")
    cats = []
    for k, entry in enumerate(spec):
        if isinstance(entry, str):
            cats.append(Category(entry, id=k + 1))
        elif isinstance(entry, dict) and "name" in entry:
            _check_keys(entry, _CATEGORY_KEYS, f"{path}: categories[{k}]")
            cats.append(Category(str(entry["name"]), prefix=str(entry.get("prefix", "")),
                                 suffix=str(entry.get("suffix", "")), phrase=entry.get("phrase"),
                                 id=int(entry.get("id", k + 1))))
        else:
            raise ValueError(f"{path}: categories[{k}] must be a name or a mapping with `name`, got {entry!r}")
    return tuple(cats)
