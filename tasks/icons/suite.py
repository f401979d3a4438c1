"""The ODinW-like downstream suite over held-out icon categories, written in Roboflow COCO layout.

Each task differs from pretraining the way ODinW tasks differ from GLIP's pretraining data:

- icons-aquarium: marine life on water-coloured backgrounds;
- icons-vehicles: vehicles on road-grey backgrounds, little rotation;
- icons-thermal: a thermal-camera domain (grayscale, inverted);
- icons-aerial: many tiny objects, any rotation, on ground-coloured textures;
- icons-described: categories best found with a description naming pretraining concepts
  ("mammoth which looks like a hairy elephant").

Plus `icons-heldin`: pretraining categories in unseen scenes (a held-in validation split).

Layout under `<data root>/icons/<task>/`: `train/ valid/ test/`, each with `_annotations.coco.json`
(Roboflow export, including its dataset-level category id 0) and PNG images; `README.txt` and
`dataset_info.json` carry the OpenMoji attribution. Scene i of split s is a pure function of
(task, split, seed, i).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tasks.icons.corpus import _atomic_dir, _progress, dataset_info, write_readme
from tasks.icons.rng import Rng
from tasks.icons.scene import IconWorld, SceneStyle
from tasks.icons.split import HELDOUT, Icon, load_category_split
from tasks.category import Category
from tasks.task import Task, roboflow_splits

ICONS_DIR = "icons"
DEFAULT_SIZES = {"train": 200, "valid": 100, "test": 200}
HELDIN_SIZES = {"valid": 200, "test": 200}
GENERATOR_VERSION = 1  # bump when generation changes; stored in dataset_info.json


@dataclass(frozen=True, kw_only=True)
class IconTaskSpec:
    """How one icon task is generated."""

    name: str
    description: str
    categories: tuple[Category, ...]
    style: SceneStyle = SceneStyle()
    objects: tuple[int, int] = (1, 6)  # labelled icons per image
    distractors: tuple[int, int] = (0, 2)  # unlabelled icons per image, from the distractor pool
    empty_fraction: float = 0.03  # images with distractors only
    exclude_distractors: tuple[str, ...] = ()  # pretraining names never used as distractors here
    sizes: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))


# Descriptions name pretraining concepts (checked in tests): GLIP CAPTION_PROMPT style suffixes.
DESCRIBED = {
    "mammoth": (" which looks like a hairy elephant", ("elephant",)),
    "orangutan": (" which looks like an orange gorilla", ("gorilla",)),
    "llama": (" which looks like a camel without a hump", ("dromedary camel",)),
    "bagel": (" which looks like a brown doughnut", ("doughnut",)),
    "beaver": (" which looks like a big rat with a flat tail", ("rat",)),
    "dodo": (" which looks like a grey turkey", ("turkey",)),
}


def _plain(task: str) -> tuple[Category, ...]:
    return tuple(Category(name) for name in HELDOUT[task])


ICON_TASKS: dict[str, IconTaskSpec] = {
    spec.name: spec for spec in (
        IconTaskSpec(name="icons-aquarium", description="marine life in water-coloured scenes (cf. ODinW Aquarium)",
                     categories=_plain("icons-aquarium"),
                     style=SceneStyle(palette="water", backgrounds=("gradient", "noise", "clutter"))),
        IconTaskSpec(name="icons-vehicles", description="vehicles on road-grey scenes (cf. ODinW VehiclesOpenImages)",
                     categories=_plain("icons-vehicles"),
                     style=SceneStyle(palette="road", max_rotation=8.0)),
        IconTaskSpec(name="icons-thermal", description="animals seen by a thermal camera: grayscale, inverted "
                     "(cf. ODinW thermalDogsAndPeople)", categories=_plain("icons-thermal"),
                     style=SceneStyle(thermal=True), objects=(1, 4)),
        IconTaskSpec(name="icons-aerial", description="many tiny boats and tents seen from above "
                     "(cf. ODinW AerialMaritimeDrone)", categories=_plain("icons-aerial"),
                     style=SceneStyle(palette="ground", min_scale=0.035, max_scale=0.09, rotation_prob=1.0,
                                      max_rotation=180.0, max_occlusion=0.15, backgrounds=("noise", "clutter")),
                     objects=(8, 24), distractors=(2, 6)),
        IconTaskSpec(name="icons-described", description="unfamiliar animals and foods best found with a "
                     "description naming familiar ones (cf. GLIP's CAPTION_PROMPT)",
                     categories=tuple(Category(n, suffix=DESCRIBED[n][0]) for n in HELDOUT["icons-described"]),
                     exclude_distractors=tuple(c for _, cs in DESCRIBED.values() for c in cs)),
    )
}


def task_dir(data_root: str | Path, name: str) -> Path:
    return Path(data_root) / ICONS_DIR / name


def generate_icon_task(name: str, root: str | Path, *, sizes: Mapping[str, int] | None = None, seed: int = 0,
                       world: IconWorld | None = None, progress: bool = False) -> Path:
    """Write task `name` into folder `root` (atomically: a half-written task is never visible).

    Does nothing if `root` already holds the task.
    """
    root = Path(root)
    if (root / "dataset_info.json").is_file():
        _check_existing(root, name, sizes, seed)
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but holds no generated {name} (no dataset_info.json); "
                              "remove it or choose another data root")
    world = world if world is not None else IconWorld()
    if name == HELDIN:
        return _generate_heldin(root, sizes=sizes, seed=seed, world=world, progress=progress)
    if name not in ICON_TASKS:
        raise KeyError(f"unknown icon task {name!r}; icon tasks are {sorted(ICON_TASKS) + [HELDIN]}")
    spec = ICON_TASKS[name]
    heldout = {icon.name: icon for icon in load_category_split().heldout[name]}
    icons = [heldout[c.name] for c in spec.categories]
    excluded = set(spec.exclude_distractors)
    pool = [i for i in world.pretrain_icons if i.name not in excluded]
    sizes = dict(sizes) if sizes is not None else dict(spec.sizes)
    with _atomic_dir(root) as tmp:
        for split, n in sizes.items():
            _write_split(tmp / split, name, split, n, seed, world, spec, icons, pool, progress)
        _write_info(tmp, name, spec.description, seed, sizes, spec.categories)
    return root


def _check_existing(root: Path, name: str, sizes: Mapping[str, int] | None, seed: int) -> None:
    info = json.loads((root / "dataset_info.json").read_text(encoding="utf-8"))
    wanted = {"seed": seed, "generator_version": GENERATOR_VERSION}
    if sizes is not None:
        wanted["sizes"] = dict(sizes)
    found = {k: info.get(k) for k in wanted}
    if found != wanted:
        raise ValueError(f"{root} holds {name} generated with {found}, not {wanted}; "
                         "remove the folder (or use another data root) to generate it again")


def _write_split(folder: Path, task: str, split: str, n: int, seed: int, world: IconWorld, spec: IconTaskSpec,
                 icons: list[Icon], pool: list[Icon], progress: bool) -> None:
    folder.mkdir(parents=True)
    index = {icon.codepoint: k for k, icon in enumerate(icons)}
    images, annotations = [], []
    for i in _progress(range(n), progress, f"{task}/{split}"):
        rng = Rng(task, split, seed, i)
        if rng.chance(spec.empty_fraction):
            objects = []
        else:
            objects = [rng.choice(icons) for _ in range(rng.integer(*spec.objects))]
        distractors = rng.sample(pool, rng.integer(*spec.distractors) + (0 if objects else 1))
        scene = world.compose(rng, objects, distractors, spec.style)
        _append_record(folder, i, scene, [index[ic.codepoint] + 1 for ic in scene.icons], images, annotations)
    _write_coco(folder, task, [c.name for c in spec.categories], images, annotations, split, seed)


def _append_record(folder: Path, i: int, scene, category_ids: list[int], images: list, annotations: list):
    file_name = f"{i:05d}.png"
    scene.image.save(folder / file_name, compress_level=1)
    images.append({"id": i, "file_name": file_name, "width": scene.image.width, "height": scene.image.height})
    for box, cat_id in zip(scene.boxes, category_ids):
        w, h = box[2] - box[0], box[3] - box[1]
        annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat_id,
                            "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})


def _write_coco(folder: Path, task: str, names: list[str], images, annotations, split: str, seed: int) -> None:
    # Roboflow exports add the dataset itself as category 0, the supercategory of the real ones.
    categories = [{"id": 0, "name": task, "supercategory": "none"}]
    categories += [{"id": k + 1, "name": n, "supercategory": task} for k, n in enumerate(names)]
    data = {"info": dataset_info(f"{task} {split} (icon world)", split=split, seed=seed,
                                 generator_version=GENERATOR_VERSION),
            "licenses": [{"id": 1, "name": "CC BY-SA 4.0", "url": "https://creativecommons.org/licenses/by-sa/4.0/"}],
            "categories": categories, "images": images, "annotations": annotations}
    (folder / "_annotations.coco.json").write_text(json.dumps(data), encoding="utf-8")


def _write_info(folder: Path, name: str, description: str, seed: int, sizes: Mapping[str, int], categories) -> None:
    info = dataset_info(description, task=name, seed=seed, sizes=dict(sizes), generator_version=GENERATOR_VERSION,
                        categories=[{"name": c.name, "prefix": c.prefix, "suffix": c.suffix} for c in categories])
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
    write_readme(folder, f"{name}: {description}.")


# -- held-in validation: pretraining categories, scenes never used by the pretraining stream -------------

HELDIN = "icons-heldin"


def _generate_heldin(root: Path, *, sizes, seed: int, world: IconWorld, progress: bool) -> Path:
    icons = list(world.pretrain_icons)
    index = {icon.codepoint: k for k, icon in enumerate(icons)}
    sizes = dict(sizes) if sizes is not None else dict(HELDIN_SIZES)
    style = SceneStyle()
    with _atomic_dir(root) as tmp:
        for split, n in sizes.items():
            folder = tmp / split
            folder.mkdir(parents=True)
            images, annotations = [], []
            for i in _progress(range(n), progress, f"{HELDIN}/{split}"):
                rng = Rng(HELDIN, split, seed, i)  # a stream of its own: unseen by IconPretrainDataset
                cats = rng.sample(icons, rng.integer(1, 5))
                objects = [rng.choice(cats) for _ in range(rng.integer(len(cats), 8))]
                scene = world.compose(rng, objects, (), style)
                _append_record(folder, i, scene, [index[ic.codepoint] + 1 for ic in scene.icons], images, annotations)
            _write_coco(folder, HELDIN, [i.name for i in icons], images, annotations, split, seed)
        _write_info(tmp, HELDIN, "pretraining categories in unseen scenes (held-in validation)", seed, sizes,
                    [Category(i.name) for i in icons])
    return root


def icon_tasks() -> dict[str, Task]:
    """Registry entries of the icon suite (data generated on first use)."""
    tasks = {}
    for name, spec in ICON_TASKS.items():
        tasks[name] = Task(name=name, categories=spec.categories, splits=roboflow_splits(),
                           subdir=f"{ICONS_DIR}/{name}", eval_split="test", suite="icons",
                           description=spec.description, source="generated: icon world (OpenMoji, CC BY-SA 4.0)",
                           generate=_generator(name))
    tasks[HELDIN] = Task(name=HELDIN, categories=tuple(Category(i.name) for i in load_category_split().pretrain),
                         splits=roboflow_splits(names=("valid", "test")), subdir=f"{ICONS_DIR}/{HELDIN}",
                         eval_split="valid", suite="icons",
                         description="held-in validation: the pretraining categories in unseen scenes",
                         source="generated: icon world (OpenMoji, CC BY-SA 4.0)", generate=_generator(HELDIN))
    return tasks


def _generator(name: str):
    def generate(root: Path) -> Path:
        return generate_icon_task(name, root, progress=True)

    generate.__name__ = f"generate_{name.replace('-', '_')}"
    return generate


def generate_icon_suite(data_root: str | Path, *, sizes: Mapping[str, int] | None = None, seed: int = 0,
                        world: IconWorld | None = None, progress: bool = False,
                        names: tuple[str, ...] | None = None) -> list[Path]:
    """Generate every icon task (or `names`) under `<data_root>/icons/`, sharing one sprite cache."""
    world = world if world is not None else IconWorld()
    names = names if names is not None else tuple(ICON_TASKS) + (HELDIN,)
    return [generate_icon_task(n, task_dir(data_root, n), sizes=sizes if n != HELDIN or sizes is None else
                               {k: v for k, v in sizes.items() if k in HELDIN_SIZES}, seed=seed, world=world,
                               progress=progress) for n in names]
