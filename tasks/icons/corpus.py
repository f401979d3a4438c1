"""The pretraining corpus of the icon world: detection-style and grounding-style samples.

- Detection-style: every icon in the scene is labelled with its category name; the caption is left to the
  trainer, which builds it from the present names plus sampled absent names with
  `build_detection_prompt` (names joined by ". ", GLIP's separator).
- Grounding-style: a short caption ("two taxis and a small sunflower") whose phrases map to boxes through
  character spans `[beg, end)`, as `tokens_positive` in GLIP/MDETR grounding json. Icons that the caption
  does not mention are unlabelled distractors of other categories.

Only pretraining categories ever appear (as pixels or words); captions use a fixed small vocabulary of
counts and sizes that holds no held-out word (checked by the tests).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.icons.glyphs import OPENMOJI_ATTRIBUTION, renderer_fingerprint
from tasks.icons.rng import Rng
from tasks.icons.scene import IconWorld, Scene, SceneStyle
from tasks.icons.split import Icon

PRETRAIN_STYLE = SceneStyle()
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SMALL_WORDS = ("small", "tiny")
LARGE_WORDS = ("large", "big")
TEMPLATES = ("{}", "a picture of {}", "an image with {}", "{} in the scene", "{} on a background")
_IRREGULAR = {"mouse": "mice", "tooth": "teeth", "foot": "feet", "knife": "knives", "leaf": "leaves",
              "sheep": "sheep", "deer": "deer", "ox": "oxen", "goose": "geese", "potato": "potatoes",
              "tomato": "tomatoes", "volcano": "volcanoes", "cactus": "cacti", "dice": "dice"}
_UNCOUNTABLE = {"spaghetti", "popcorn", "sushi", "bacon", "butter", "cooked rice", "fire", "oden", "dango",
                "falafel", "fondue", "green salad", "custard", "candy", "chocolate bar", "wood", "jeans",
                "shorts", "briefs", "bubbles", "fireworks", "rainbow", "water wave", "money bag"}


def pluralize(name: str) -> str | None:
    """English plural of a simple category name, or None when the name should not be counted."""
    words = name.split()
    if (name in _UNCOUNTABLE or len(words) > 2 or any(w in ("and", "with", "of", "on", "in") for w in words)
            or not name.replace(" ", "").replace("-", "").isalpha()):
        return None
    head = words[-1]
    if head in _IRREGULAR:
        plural = _IRREGULAR[head]
    elif head.endswith("s") and not head.endswith(("ss", "us", "is")):
        return None  # already plural ("cherries", "chopsticks")
    elif head.endswith(("s", "x", "z", "ch", "sh")):
        plural = head + "es"
    elif head.endswith("y") and head[-2:-1] not in "aeiou":
        plural = head[:-1] + "ies"
    else:
        plural = head + "s"
    return " ".join(words[:-1] + [plural])


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" and not word.startswith(("uni", "eu", "one")) else "a"


def build_detection_prompt(present: Sequence[str], vocabulary: Sequence[str], num_absent: int,
                           rng: Rng | None = None, *, seed: object = 0,
                           separator: str = ". ") -> tuple[str, dict[str, tuple[int, int]]]:
    """A detection prompt of the present names plus `num_absent` other names of `vocabulary`, shuffled.

    Returns the caption ("rat. kite. banjo") and the span `[beg, end)` of every name in it. Pass the trainer's
    own `Rng` (or a `seed`) so prompts are reproducible.
    """
    rng = rng if rng is not None else Rng("detection-prompt", seed)
    present = list(dict.fromkeys(present))
    present_set = set(present)
    pool = [n for n in vocabulary if n not in present_set]
    names = rng.shuffle(present + rng.sample(pool, num_absent))
    caption, spans = "", {}
    for i, name in enumerate(names):
        spans[name] = (len(caption), len(caption) + len(name))
        caption += name + (separator if i < len(names) - 1 else "")
    return caption, spans


def detection_prompt_for_target(target: dict, vocabulary: Sequence[str], num_absent: int,
                                rng: Rng | None = None, *, seed: object = 0):
    """Caption and per-box spans (`[[(beg, end)], ...]`) for a detection-style target of `IconPretrainDataset`."""
    caption, spans = build_detection_prompt(target["phrases"], vocabulary, num_absent, rng, seed=seed)
    return caption, [[spans[p]] for p in target["phrases"]]


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """How pretraining samples are drawn."""

    grounding_fraction: float = 0.5
    max_objects: int = 8  # detection-style: icons per scene (1..max_objects)
    max_categories: int = 5  # detection-style: distinct categories per scene
    max_phrases: int = 3  # grounding-style: phrases per caption (1..max_phrases)
    max_instances: int = 3  # grounding-style: instances per phrase
    max_distractors: int = 3  # grounding-style: unmentioned icons per scene
    style: SceneStyle = PRETRAIN_STYLE


class IconPretrainDataset:
    """Indexable pretraining samples: `dataset[i] -> (PIL RGB image, target)`, a pure function of (seed, i).

    target = {"kind": "detection" | "grounding", "boxes": float32 tensor (K, 4) xyxy pixels,
    "phrases": [str] per box, "names": [category name] per box, "labels": int64 tensor (K,) indices into
    `world.pretrain_icons`, "caption": str (grounding) or None (detection: build it with
    `detection_prompt_for_target`), "spans": [[(beg, end), ...]] per box (grounding) or None}.

    Cheap enough for DataLoader workers (~200 scenes/s/core at 256x256); call `world.warm()` before forking.
    """

    def __init__(self, world: IconWorld | None = None, *, length: int = 1_000_000, seed: int = 0,
                 config: CorpusConfig = CorpusConfig(), stream: str = "pretrain"):
        self.world = world if world is not None else IconWorld()
        self.length = length
        self.seed = seed
        self.config = config
        self.stream = stream
        self.icons = self.world.pretrain_icons
        self.names = [icon.name for icon in self.icons]
        self._label = {icon.codepoint: i for i, icon in enumerate(self.icons)}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        image, target = self.sample(index)
        import torch

        target["boxes"] = torch.tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        target["labels"] = torch.tensor(target["labels"], dtype=torch.int64)
        return image, target

    def sample(self, index: int):
        """Like `__getitem__` but with plain lists (no torch)."""
        rng = Rng(self.stream, self.seed, index)
        if rng.chance(self.config.grounding_fraction):
            return self._grounding(rng, index)
        return self._detection(rng, index)

    def _detection(self, rng: Rng, index: int):
        cfg = self.config
        cats = rng.sample(self.icons, rng.integer(1, cfg.max_categories))
        objects = [rng.choice(cats) for _ in range(max(len(cats), rng.integer(1, cfg.max_objects)))]
        scene = self.world.compose(rng, objects, (), cfg.style)
        return scene.image, {
            "kind": "detection", "index": index, "boxes": [list(b) for b in scene.boxes],
            "phrases": [i.name for i in scene.icons], "names": [i.name for i in scene.icons],
            "labels": [self._label[i.codepoint] for i in scene.icons], "caption": None, "spans": None,
        }

    def _grounding(self, rng: Rng, index: int):
        cfg = self.config
        cats = rng.sample(self.icons, rng.integer(1, cfg.max_phrases))
        objects: list[Icon] = []
        for icon in cats:
            n = rng.integer(2, cfg.max_instances) if pluralize(icon.name) and rng.chance(0.3) else 1
            objects += [icon] * n
        chosen = {icon.codepoint for icon in cats}
        pool = [icon for icon in self.icons if icon.codepoint not in chosen]
        distractors = rng.sample(pool, rng.integer(0, cfg.max_distractors))
        scene = self.world.compose(rng, objects, distractors, cfg.style)
        caption, phrase_of, span_of = self._caption(rng, scene, cfg.style)
        return scene.image, {
            "kind": "grounding", "index": index, "boxes": [list(b) for b in scene.boxes],
            "phrases": [phrase_of[i.codepoint] for i in scene.icons], "names": [i.name for i in scene.icons],
            "labels": [self._label[i.codepoint] for i in scene.icons], "caption": caption,
            "spans": [[span_of[i.codepoint]] for i in scene.icons],
        }

    @staticmethod
    def _caption(rng: Rng, scene: Scene, style: SceneStyle):
        """Caption over the icons that made it into the scene, in order of first appearance."""
        side = min(style.width, style.height)
        groups: dict[int, list] = {}
        for icon, box in zip(scene.icons, scene.boxes):
            groups.setdefault(icon.codepoint, [icon, []])[1].append(max(box[2] - box[0], box[3] - box[1]) / side)
        phrases: dict[int, str] = {}
        for cp, (icon, sizes) in groups.items():
            size_word = ""
            if rng.chance(0.5):
                if max(sizes) < 0.13:
                    size_word = rng.choice(SMALL_WORDS) + " "
                elif min(sizes) > 0.3:
                    size_word = rng.choice(LARGE_WORDS) + " "
            if len(sizes) == 1:
                phrases[cp] = f"{article(size_word or icon.name)} {size_word}{icon.name}"
            else:
                plural = pluralize(icon.name) or icon.name
                count = COUNT_WORDS.get(len(sizes), "many")
                phrases[cp] = f"{count} {size_word}{plural}"
        before, after = rng.choice(TEMPLATES).split("{}")
        caption, spans = before, {}
        order = list(phrases)
        for k, cp in enumerate(order):
            if k:
                caption += " and " if k == len(order) - 1 else ", "
            spans[cp] = (len(caption), len(caption) + len(phrases[cp]))
            caption += phrases[cp]
        caption += after
        return caption, phrases, spans


def write_pretrain_corpus(out_dir: str | Path, num_samples: int, *, seed: int = 0,
                          config: CorpusConfig = CorpusConfig(), world: IconWorld | None = None,
                          progress: bool = False) -> Path:
    """Write `num_samples` pretraining samples to `out_dir` (atomically): PNG images + `annotations.json`.

    The json is GLIP/MDETR grounding style: images carry `caption` (null for detection-style) and `kind`;
    annotations carry `bbox` (xywh), `category_id` (1-based into `categories`), `phrase` and, for grounding
    samples, `tokens_positive` ([[beg, end], ...] character spans into the caption).
    """
    out_dir = Path(out_dir)
    dataset = IconPretrainDataset(world, length=num_samples, seed=seed, config=config)
    images, annotations = [], []
    with _atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for i in _progress(range(num_samples), progress, "pretraining corpus"):
            image, t = dataset.sample(i)
            file_name = f"images/{i:07d}.png"
            image.save(tmp / file_name, compress_level=1)
            images.append({"id": i + 1, "file_name": file_name, "width": image.width, "height": image.height,
                           "kind": t["kind"], "caption": t["caption"]})
            for k, box in enumerate(t["boxes"]):
                ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": t["labels"][k] + 1,
                       "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                       "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0, "phrase": t["phrases"][k]}
                if t["spans"] is not None:
                    ann["tokens_positive"] = [list(s) for s in t["spans"][k]]
                annotations.append(ann)
        data = {
            "info": dataset_info("icon-world pretraining corpus", seed=seed, num_samples=num_samples),
            "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n, "supercategory": "icon"} for k, n in enumerate(dataset.names)],
        }
        (tmp / "annotations.json").write_text(json.dumps(data), encoding="utf-8")
        write_readme(tmp, "Icon-world pretraining corpus (detection- and grounding-style samples).")
    return out_dir


def dataset_info(description: str, **extra) -> dict:
    from tasks.icons.glyphs import openmoji_version

    return {"description": description, "contributor": "glip-adapt icon world",
            "attribution": OPENMOJI_ATTRIBUTION, "license": "CC BY-SA 4.0 (OpenMoji icons)",
            "url": "https://openmoji.org", "openmoji_version": openmoji_version(),
            "renderer": renderer_fingerprint(), **extra}


def write_readme(folder: Path, what: str) -> None:
    (folder / "README.txt").write_text(
        f"{what}\nGenerated by glip-adapt (tasks.icons).\n\n{OPENMOJI_ATTRIBUTION}\n"
        "This dataset is a derivative of OpenMoji and is shared under CC BY-SA 4.0.\n", encoding="utf-8")


class _atomic_dir:
    """Write into a temporary sibling folder, then rename it into place (a concurrent writer loses cleanly)."""

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        self.tmp.chmod(0o755)  # mkdtemp makes it private; the finished dataset is an ordinary folder
        try:
            self.tmp.rename(self.target)
        except OSError:
            if not self.target.exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # someone else finished first: keep theirs
        return False


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="img")
