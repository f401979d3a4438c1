"""The registry, the ODinW table, prompts with descriptions, and user task files."""
from __future__ import annotations

import json

import pytest

import tasks
from tasks import Category, DataNotFoundError, Task, UnknownTaskError, build_prompt, get_task, list_tasks
from tasks.odinw import ODINW13, ODINW35
from tests._coco_helpers import write_coco

ODINW13_PAPER = {"pascal-voc", "aerial-maritime-drone", "aquarium", "cottontail-rabbits", "egohands",
                 "north-america-mushrooms", "packages", "raccoon", "shellfish-open-images", "vehicles-open-images",
                 "pistols", "pothole", "thermal-dogs-and-people"}


def test_odinw_suites():
    assert set(ODINW13) == ODINW13_PAPER
    assert len(ODINW35) == 35 and set(ODINW13) < set(ODINW35)
    assert set(list_tasks("odinw13")) == ODINW13_PAPER
    assert len(list_tasks("odinw35")) == 35
    icons = list_tasks("icons")
    assert {"icons-aquarium", "icons-vehicles", "icons-thermal", "icons-aerial", "icons-described"} <= set(icons)


def test_aquarium_official_categories_and_prompts(tmp_path):
    task = get_task("aquarium", data_root=tmp_path)
    assert task.category_names == ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
    assert [c.id for c in task.categories] == [1, 2, 3, 4, 5, 6, 7]
    # the official create_queries_and_maps output (odinw_13 config, and odinw_35 with CAPTION_PROMPT)
    assert task.prompt(use_descriptions=False)[0] == "fish. jellyfish. penguin. puffin. shark. starfish. stingray"
    caption, spans = task.prompt()
    assert caption == (" fish. jellyfish. penguin , which is black and white. puffin with orange beaks . shark."
                       " starfish. stingray which is flat and round")
    assert [caption[b:e] for b, e in spans] == task.category_names  # only the names are positive
    assert task.fetch_file == "odinw_35/Aquarium.zip"
    assert task.root == tmp_path / "odinw" / "Aquarium" / "Aquarium Combined.v2-raw-1024.coco"


def test_prompt_phrase_overrides_and_layouts(tmp_path):
    pothole = get_task("pothole", data_root=tmp_path)
    caption, spans = pothole.prompt()
    assert caption == "there are some holes on the road" and caption[slice(*spans[0])] == "holes"
    assert pothole.category_names == ["pothole"]
    pistols = get_task("pistols", data_root=tmp_path)
    ann, img_dir = pistols.splits["valid"].ann_files[0], pistols.splits["valid"].img_dir
    assert ann == "val_annotations_without_background.json" and img_dir == "."
    assert pistols.root == tmp_path / "odinw" / "pistols" / "export"
    assert get_task("egohands", data_root=tmp_path).eval_split == "minival"
    voc = get_task("pascal-voc", data_root=tmp_path)
    assert len(voc.categories) == 20 and voc.splits["test"] == voc.splits["valid"]
    with pytest.raises(ValueError, match="empty prompt phrase"):
        build_prompt([Category("  ")])


def test_names_are_matched_loosely_and_unknown_names_suggest(tmp_path):
    assert get_task("thermalDogsAndPeople", data_root=tmp_path).name == "thermal-dogs-and-people"
    assert get_task("Aquarium", data_root=tmp_path).name == "aquarium"
    with pytest.raises(KeyError) as err:
        get_task("aquarim")
    assert isinstance(err.value, UnknownTaskError)
    msg = str(err.value)
    assert "unknown task 'aquarim'" in msg and "Did you mean: aquarium" in msg and "adapt tasks list" in msg
    with pytest.raises(UnknownTaskError, match="unknown task 'zzzz'\\. \\(see"):
        get_task("zzzz")


def test_missing_data_says_how_to_get_it(tmp_path):
    task = get_task("aquarium", data_root=tmp_path)
    assert not task.is_available()
    with pytest.raises(DataNotFoundError, match="adapt tasks fetch aquarium"):
        task.split("train")
    with pytest.raises(KeyError, match="has no split 'minival'"):
        task.split_paths("minival")


def test_odinw_task_loads_the_official_layout(tmp_path):
    folder = tmp_path / "odinw" / "Aquarium" / "Aquarium Combined.v2-raw-1024.coco" / "valid"
    cats = [{"id": 0, "name": "creatures", "supercategory": "none"}] + [
        {"id": i + 1, "name": n, "supercategory": "creatures"}
        for i, n in enumerate(["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"])]
    write_coco(folder, categories=cats, ann_name="annotations_without_background.json")
    task = get_task("aquarium", data_root=tmp_path)
    ds = task.split("val")  # alias of "valid"
    assert ds.ann_file.name == "annotations_without_background.json"
    assert ds.category_names[:2] == ["fish", "jellyfish"] and len(ds) == 3


def test_user_task_file_yaml_reads_categories_from_the_data(tmp_path):
    for split in ("train", "valid"):
        write_coco(tmp_path / "export" / split)
    (tmp_path / "parts.yaml").write_text("data: export\ndescription: my parts\n")
    task = get_task(str(tmp_path / "parts.yaml"))
    assert task.name == "parts" and task.suite == "user" and task.root == (tmp_path / "export").resolve()
    assert task.category_names == ["fish", "shark"] and sorted(task.splits) == ["train", "valid"]
    assert task.eval_split == "valid"
    ds = task.split("train")
    assert len(ds) == 3 and ds[0][1]["labels"].tolist() == [0, 1]


def test_user_task_file_json_with_categories_and_splits(tmp_path):
    write_coco(tmp_path / "data" / "a")
    spec = {"name": "fishy", "data": "data",
            "categories": ["fish", {"name": "shark", "suffix": " with many teeth"}],
            "splits": {"train": {"ann_file": "a/_annotations.coco.json", "img_dir": "a"}},
            "eval_split": "train"}
    (tmp_path / "fishy.json").write_text(json.dumps(spec))
    task = tasks.load_task_file(tmp_path / "fishy.json")
    assert task.prompt()[0] == "fish. shark with many teeth"
    assert len(task.split("train")) == 3


def test_user_task_file_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("data: nowhere\n")
    with pytest.raises(FileNotFoundError, match="data folder .*nowhere does not exist"):
        get_task(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("dta: x\n")
    with pytest.raises(ValueError, match="unknown key 'dta' \\(did you mean 'data'\\?\\)"):
        get_task(str(tmp_path / "b.yaml"))
    (tmp_path / "c.yaml").write_text("name: c\n")
    with pytest.raises(ValueError, match="missing `data:`"):
        get_task(str(tmp_path / "c.yaml"))
    with pytest.raises(FileNotFoundError, match="task file .*missing.yaml not found"):
        get_task(str(tmp_path / "missing.yaml"))


def test_register_task(tmp_path):
    task = Task(name="my-registered-task", categories=(Category("x"),), splits={}, root=tmp_path)
    tasks.register_task(task, overwrite=True)
    try:
        assert get_task("my-registered-task") is task
        with pytest.raises(ValueError, match="already registered"):
            tasks.register_task(task)
    finally:
        tasks.registry.__globals__["_USER"].pop("my-registered-task", None)
