"""Dataset folders as tasks: one icon task written as Roboflow COCO, standard COCO, YOLO and Pascal VOC gives
the same task (categories, boxes, image ids, few-shot subset, zero-shot AP, tuned adapter); bad input is
skipped and reported with its file and line, never dropped silently.

The YOLO/VOC/COCO files are written here from the icon task's COCO json by this file's own small writers,
not by the loaders' code, so that a loader bug cannot cancel out.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tasks import DataError, get_task, sample_few_shot
from tasks.formats import detect_format
from tasks.icons.suite import generate_icon_task, task_dir

TASK = "icons-aquarium"
SPLITS = {"train": "train", "valid": "val", "test": "test"}  # our split -> the name other formats use
FORMATS = {"roboflow": "COCO (Roboflow export)", "coco": "COCO", "yolo": "YOLO", "voc": "Pascal VOC"}


# -- independent writers: COCO json (Roboflow export) -> the other layouts -----------------------------------

def read_export(folder: Path, split: str) -> tuple[list[str], dict]:
    """Category names (Roboflow's dataset category id 0 left out) and the COCO dict of one split."""
    data = json.loads((folder / split / "_annotations.coco.json").read_text())
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"]) if c["id"] != 0]
    return names, data


def boxes_by_image(data: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


def write_standard_coco(export: Path, out: Path) -> None:
    """annotations/instances_<split>2017.json beside <split>2017/; image ids scrambled (ids come from file names)."""
    for split, other in SPLITS.items():
        _, data = read_export(export, split)
        scramble = {img["id"]: 5000 - 7 * img["id"] for img in data["images"]}
        data["images"] = [{**img, "id": scramble[img["id"]]} for img in reversed(data["images"])]
        data["annotations"] = [{**a, "image_id": scramble[a["image_id"]]} for a in data["annotations"]]
        data["categories"] = [c for c in data["categories"] if c["id"] != 0]
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{other}2017.json").write_text(json.dumps(data))
        shutil.copytree(export / split, out / f"{other}2017", ignore=shutil.ignore_patterns("*.json"))


def write_yolo(export: Path, out: Path) -> None:
    """Roboflow's YOLO export: <split>/images, <split>/labels (class cx cy w h, normalised), data.yaml."""
    names = []
    for split in SPLITS:
        names, data = read_export(export, split)
        (out / split / "labels").mkdir(parents=True)
        shutil.copytree(export / split, out / split / "images", ignore=shutil.ignore_patterns("*.json"))
        label_of = {c_id: k for k, c_id in enumerate(sorted(c["id"] for c in data["categories"] if c["id"] != 0))}
        for img in data["images"]:
            W, H = img["width"], img["height"]
            lines = []
            for a in boxes_by_image(data)[img["id"]]:
                x, y, w, h = a["bbox"]
                cx, cy = (x + w / 2) / W, (y + h / 2) / H
                lines.append(f"{label_of[a['category_id']]} {cx!r} {cy!r} {w / W!r} {h / H!r}")
            (out / split / "labels" / f"{Path(img['file_name']).stem}.txt").write_text("".join(l + "\n" for l in lines))
    yaml_names = "[" + ", ".join(json.dumps(n) for n in names) + "]"
    (out / "data.yaml").write_text(f"train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                   f"nc: {len(names)}\nnames: {yaml_names}\n")


def voc_xml(file_name: str, width: int, height: int, objects: list[tuple[str, list[float]]]) -> str:
    body = "".join(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0!r}</xmin>"
                   f"<ymin>{y0!r}</ymin><xmax>{x1!r}</xmax><ymax>{y1!r}</ymax></bndbox></object>"
                   for name, (x0, y0, x1, y1) in objects)
    return (f"<annotation><folder>JPEGImages</folder><filename>{file_name}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{body}</annotation>")


def write_voc(export: Path, out: Path) -> None:
    """Annotations/*.xml with 1-based inclusive corners, JPEGImages/, ImageSets/Main/*.txt, labels.txt."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for split, other in SPLITS.items():
        names, data = read_export(export, split)
        name_of = {c["id"]: c["name"] for c in data["categories"]}
        stems = []
        for img in data["images"]:
            stem = Path(img["file_name"]).stem
            stems.append(stem)
            shutil.copy(export / split / img["file_name"], out / "JPEGImages" / img["file_name"])
            objects = []
            for a in boxes_by_image(data)[img["id"]]:
                x, y, w, h = a["bbox"]
                objects.append((name_of[a["category_id"]], [x + 1, y + 1, x + w, y + h]))  # 1-based, inclusive
            xml = voc_xml(img["file_name"], img["width"], img["height"], objects)
            (out / "Annotations" / f"{stem}.xml").write_text(xml)
        (out / "ImageSets" / "Main" / f"{other}.txt").write_text("\n".join(stems) + "\n")
    (out / "labels.txt").write_text("\n".join(names) + "\n")


def unique_names_copy(generated: Path, out: Path) -> None:
    """The generated task with file names unique across splits (as Roboflow names them: VOC keeps every
    split's images in one folder); the COCO json otherwise unchanged."""
    for split in SPLITS:
        data = json.loads((generated / split / "_annotations.coco.json").read_text())
        (out / split).mkdir(parents=True)
        for img in data["images"]:
            name = f"{split}-{img['file_name']}"
            shutil.copy(generated / split / img["file_name"], out / split / name)
            img["file_name"] = name
        (out / split / "_annotations.coco.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The icon task as generated (Roboflow COCO; file names 00000.png... restart in every split)."""
    folder = task_dir(tmp_path_factory.mktemp("generated") / "data", TASK)
    generate_icon_task(TASK, folder, sizes={"train": 10, "valid": 4, "test": 6})
    return folder


@pytest.fixture(scope="module")
def folders(generated, tmp_path_factory) -> dict[str, Path]:
    """The icon task as a Roboflow COCO export and its copies in the three other layouts."""
    root = tmp_path_factory.mktemp("formats")
    out = {"roboflow": root / "roboflow"}
    unique_names_copy(generated, out["roboflow"])
    for name, writer in (("coco", write_standard_coco), ("yolo", write_yolo), ("voc", write_voc)):
        out[name] = root / name
        writer(out["roboflow"], out[name])
    return out


def by_file_name(dataset) -> dict[str, dict]:
    """file name -> training target, for comparing splits whose image ids may differ."""
    return {Path(dataset.image_info(i)["file_name"]).name: dataset.target(i) for i in dataset.image_ids}


# -- the same task in every format ---------------------------------------------------------------------------

def test_each_layout_is_detected(folders):
    for name, folder in folders.items():
        assert detect_format(folder).name == FORMATS[name]
        assert get_task(str(folder)).source.startswith(FORMATS[name])


def test_every_format_gives_the_same_categories_boxes_and_image_ids(folders):
    from tasks import CocoDetection

    export = folders["roboflow"]
    ids = {}
    for name, folder in folders.items():
        task = get_task(folder)
        assert task.category_names == ["tropical fish", "shark", "octopus", "crab", "dolphin", "whale", "squid"]
        assert sorted(task.splits) == ["test", "train", "valid"] and task.eval_split == "test"
        for split in SPLITS:
            # the reference: the export's COCO file read directly, without tasks.formats
            want = by_file_name(CocoDetection(export / split / "_annotations.coco.json", export / split))
            dataset = task.split(split)
            got = by_file_name(dataset)
            assert sorted(got) == sorted(want) and not dataset.report.skipped, (name, split)
            for file_name, target in want.items():
                assert got[file_name]["labels"].tolist() == target["labels"].tolist(), (name, split, file_name)
                torch.testing.assert_close(got[file_name]["boxes"], target["boxes"], atol=1e-3, rtol=0)
                assert got[file_name]["orig_size"] == target["orig_size"]
            ids.setdefault(split, {})[name] = {Path(dataset.image_info(i)["file_name"]).name: i
                                               for i in dataset.image_ids}
    for split, by_format in ids.items():
        assert all(mapping == by_format["roboflow"] for mapping in by_format.values()), split


def test_every_format_draws_the_same_few_shot_subset(folders):
    for seed in (0, 1, 2):
        picked = {}
        for name, folder in folders.items():
            train = get_task(folder).split("train")
            subset = sample_few_shot(train, 1, seed)
            picked[name] = [Path(train.image_info(i)["file_name"]).name for i in subset.image_ids]
        assert all(names == picked["roboflow"] for names in picked.values()), (seed, picked)
        assert len(picked["roboflow"]) >= 3


def test_a_folder_numbered_like_the_registered_task_keeps_its_ids_and_subsets(generated):
    """Numeric file names (00000.png...) are the ids, so the generated folder read as a folder equals the
    registered task read through its own COCO files."""
    registered = get_task(TASK, data_root=generated.parents[1])
    folder = get_task(generated)
    for split in SPLITS:
        assert folder.split(split).image_ids == registered.split(split).image_ids
    for seed in (0, 1, 2):
        assert (sample_few_shot(folder.split("train"), 1, seed).image_ids
                == sample_few_shot(registered.split("train"), 1, seed).image_ids)


def test_ids_come_from_file_names_not_from_the_annotation_file(folders, tmp_path):
    """Non-numeric names: ids are positions in name order, in COCO (whatever its ids) as in YOLO."""
    yolo, coco = tmp_path / "yolo", tmp_path / "coco"
    names = ["b_cat", "a_dog", "c_eel"]
    for stem in names:
        write_image(yolo / "train" / "images" / f"{stem}.png")
        write_text(yolo / "train" / "labels" / f"{stem}.txt", "0 0.5 0.5 0.2 0.2\n")
    write_text(yolo / "data.yaml", "train: train/images\nnames: [thing]\n")
    images = [{"id": 70 + k, "file_name": f"{stem}.png", "width": 32, "height": 32} for k, stem in enumerate(names)]
    anns = [{"id": k + 1, "image_id": 70 + k, "category_id": 1, "bbox": [12.8, 12.8, 6.4, 6.4]} for k in range(3)]
    write_text(coco / "train" / "_annotations.coco.json",
               json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    for stem in names:
        write_image(coco / "train" / f"{stem}.png")
    for folder in (yolo, coco):
        ds = get_task(folder).split("train")
        ids = {Path(ds.image_info(i)["file_name"]).stem: i for i in ds.image_ids}
        assert ids == {"a_dog": 1, "b_cat": 2, "c_eel": 3}


@pytest.mark.slow
def test_every_format_gives_equal_zero_shot_ap_and_equal_tuned_adapters(folders, tmp_path, request):
    from adapt.adapter import load_adapter
    from adapt.cli import app
    from adapt.tune import TuneConfig, tune

    results, prompts = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # glip-nano is small: a second thread mostly waits (and spins) on a shared machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for name, folder in folders.items():
        out = tmp_path / f"{name}.safetensors"
        results[name] = tune(TuneConfig(strategy="prompt-tune", task=str(folder), base="glip-nano", shots=1, seed=0,
                                        steps=3, eval_every=3, progress=False, out=out))
        prompts[name] = load_adapter(out).prompt.hidden
    first = results["roboflow"]
    assert first.zero_shot.AP > 5 and first.train_images >= 3  # a real measurement, not 0 == 0
    for name, result in results.items():
        assert result.train_images == first.train_images
        assert result.zero_shot.AP == pytest.approx(first.zero_shot.AP, abs=1e-6), name
        assert result.zero_shot.per_category == pytest.approx(first.zero_shot.per_category, abs=1e-6), name
        assert result.tuned.AP == pytest.approx(first.tuned.AP, abs=1e-3), name
        torch.testing.assert_close(prompts[name], prompts["roboflow"], rtol=1e-4, atol=1e-5)
    evaluated = CliRunner().invoke(app, ["eval", "--task", str(folders["voc"]), "--base", "glip-nano"])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"AP {first.zero_shot.AP:.1f}" in evaluated.output


# -- format details ------------------------------------------------------------------------------------------

def write_image(path: Path, size=(32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 60, 30)).save(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def voc_folder(root: Path, objects_by_id: dict, *, size=(40, 20), sets=None, labels: str | None = None) -> Path:
    for image_id, objects in objects_by_id.items():
        write_image(root / "JPEGImages" / f"{image_id}.jpg", size)
        write_text(root / "Annotations" / f"{image_id}.xml", voc_xml(f"{image_id}.jpg", *size, objects))
    for split, ids in (sets or {"train": list(objects_by_id)}).items():
        write_text(root / "ImageSets" / "Main" / f"{split}.txt", "\n".join(ids) + "\n")
    if labels is not None:
        write_text(root / "labels.txt", labels)
    return root


def test_voc_one_based_corners_and_category_order(tmp_path):
    folder = voc_folder(tmp_path / "voc", {"a": [("zebra", [1, 1, 40, 20]), ("ant", [11, 6, 20, 10])]})
    task = get_task(folder)
    assert task.category_names == ["ant", "zebra"]  # sorted names without a labels.txt
    target = task.split("train").target(1)
    assert target["boxes"].tolist() == [[0, 0, 40, 20], [10, 5, 20, 10]]  # 1..W inclusive covers [0, W]
    assert target["labels"].tolist() == [1, 0]
    write_text(folder / "labelmap.txt",
               "# label:color_rgb:parts:actions\nbackground:0,0,0::\nzebra:1,2,3::\nant:4,5,6::\n")
    with pytest.warns(UserWarning, match="background"):
        assert get_task(folder).category_names == ["zebra", "ant"]
    write_text(folder / "labels.txt", "ant\nzebra\n")  # labels.txt is read before labelmap.txt
    assert get_task(folder).category_names == ["ant", "zebra"]


def test_voc_difficult_objects_are_kept_for_evaluation_only(tmp_path):
    folder = voc_folder(tmp_path / "voc", {"a": [("cat", [2, 2, 10, 10])]})
    xml = folder / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>"))
    ds = get_task(folder).split("train")
    assert ds.report.crowd_annotations == 1 and ds.target(1)["boxes"].shape == (0, 4) and len(ds.coco.anns) == 1


def test_yolo_ultralytics_layout_names_as_a_dict_polygons_and_empty_images(tmp_path):
    root = tmp_path / "y"
    write_image(root / "images" / "train" / "0001.png", (100, 50))
    write_image(root / "images" / "train" / "0002.png", (100, 50))
    write_text(root / "labels" / "train" / "0001.txt", "1 0.5 0.5 0.2 0.4\n\n0 0.1 0.2 0.3 0.2 0.3 0.6\n")
    write_text(root / "labels" / "train" / "0002.txt", "")  # an image without objects
    write_text(root / "data.yaml", "path: .\ntrain: images/train\nnames: {0: dog, 1: cat}\n")
    task = get_task(root)
    assert task.category_names == ["dog", "cat"] and list(task.splits) == ["train"] and task.eval_split == "train"
    ds = task.split("train")
    assert ds.image_ids == [1, 2] and not ds.report.skipped
    target = ds.target(1)
    torch.testing.assert_close(target["boxes"], torch.tensor([[40.0, 15, 60, 35], [10, 10, 30, 30]]))
    assert target["labels"].tolist() == [1, 0] and ds.target(2)["boxes"].shape == (0, 4)


def test_standard_coco_reads_the_instances_files_and_keeps_numeric_names_as_ids(tmp_path):
    root = tmp_path / "coco"
    images = [{"id": 9, "file_name": "000000000009.jpg", "width": 32, "height": 32}]
    data = {"images": images, "annotations": [{"id": 1, "image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 4]}],
            "categories": [{"id": 3, "name": "cat"}]}
    write_text(root / "annotations" / "instances_val2017.json", json.dumps(data))
    write_text(root / "annotations" / "captions_val2017.json", json.dumps({"images": images, "annotations": []}))
    write_image(root / "images" / "val2017" / "000000000009.jpg")
    task = get_task(root)
    assert list(task.splits) == ["valid"] and task.category_names == ["cat"] and task.categories[0].id == 3
    ds = task.split("val")
    assert ds.image_ids == [9] and ds.target(9)["boxes"].tolist() == [[1, 2, 4, 6]]


def test_a_task_file_adds_descriptions_to_a_folder(tmp_path):
    folder = voc_folder(tmp_path / "voc", {"a": [("cat", [2, 2, 10, 10]), ("dog", [3, 3, 9, 9])]})
    write_text(tmp_path / "pets.yaml", "data: voc\ncategories:\n  - {name: dog, suffix: ' which barks'}\n")
    task = get_task(tmp_path / "pets.yaml")
    assert task.name == "pets" and task.category_names == ["cat", "dog"]
    assert task.prompt()[0] == "cat. dog which barks"
    assert task.source.startswith("Pascal VOC folder") and "pets.yaml" in task.source
    assert task.split("train").target(1)["labels"].tolist() == [0, 1]
    write_text(tmp_path / "bad.yaml", "data: voc\ncategories: [{name: cow, suffix: ' which moos'}]\n")
    with pytest.raises(ValueError, match=r"\['cow'\] are not in the data; its categories are \['cat', 'dog'\]"):
        get_task(tmp_path / "bad.yaml")


def test_a_registered_name_wins_over_a_folder_of_that_name_unless_written_as_a_path(tmp_path, monkeypatch):
    voc_folder(tmp_path / "aquarium", {"a": [("cat", [2, 2, 10, 10])]})
    monkeypatch.chdir(tmp_path)
    assert get_task("aquarium").suite != "user"
    assert get_task("./aquarium").category_names == ["cat"]
    with pytest.raises(FileNotFoundError, match="nowhere: no such dataset folder or task file"):
        get_task("./nowhere")


# -- bad input: one line naming the file and line or record, every skip counted -----------------------------

def load_with_skips(folder: Path, split: str = "train"):
    """The split and the warnings its loading gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = get_task(folder).split(split)
    messages = [str(w.message) for w in caught]
    assert sum("records skipped" in m for m in messages) == (1 if ds.report.skipped else 0)  # one per split
    return ds, messages


def yolo_folder(root: Path, labels: dict[str, str], images=None, names="[cat, dog]") -> Path:
    for stem in (images if images is not None else labels):
        write_image(root / "train" / "images" / f"{stem}.png", (100, 50))
    for stem, text in labels.items():
        write_text(root / "train" / "labels" / f"{stem}.txt", text)
    write_text(root / "data.yaml", f"train: train/images\nnames: {names}\n")
    return root


def test_yolo_bad_lines_are_skipped_with_file_and_line(tmp_path):
    folder = yolo_folder(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n"
                                               "2 0.5 0.5 0.2 0.2\n"        # label index out of range
                                               "1 1.5 1.5 0.2 0.2\n"        # outside the image
                                               "1 0.5 0.5 0 0.2\n"          # no width
                                               "1 0.5 0.5 0.2\n"            # too few fields
                                               "x 0.5 0.5 0.2 0.2\n"        # not a number
                                               "1 0.95 0.5 0.2 0.2\n"})     # sticks out: clipped, counted
    ds, messages = load_with_skips(folder)
    assert ds.report.skipped == [
        "train/labels/a.txt:2: class 2 out of range (data.yaml names 2 categories: 0..1); line skipped",
        "train/labels/a.txt:3: box [140, 70, 160, 80] (xyxy pixels) lies outside its 100x50 image; skipped",
        "train/labels/a.txt:4: box [50, 20, 50, 30] (xyxy pixels) has no area; skipped",
        "train/labels/a.txt:5: expected `class cx cy w h` (or a polygon `class x1 y1 x2 y2 ...`), got 4 fields; "
        "line skipped",
        "train/labels/a.txt:6: not numbers: 'x 0.5 0.5 0.2 0.2'; line skipped"]
    assert ds.report.clipped_boxes == 1 and ds.target(1)["labels"].tolist() == [0, 1]
    assert any("clipped 1 boxes" in m and "first: train/labels/a.txt:7 " in m for m in messages)
    assert "5 records skipped (first: train/labels/a.txt:2: class 2 out of range" in ds.report.summary()


def test_yolo_label_files_and_images_must_pair(tmp_path):
    folder = yolo_folder(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n", "orphan": "1 0.5 0.5 0.2 0.2\n",
                                          "empty": ""}, images=["a", "nolabel", "empty"])
    ds, messages = load_with_skips(folder)
    assert ds.report.skipped == [
        "train/images/nolabel.png: no label file train/labels/nolabel.txt; image skipped (an empty label file "
        "marks an image without objects)",
        "train/labels/orphan.txt: label file without an image; skipped"]
    assert len(ds) == 2 and ds.report.images_without_annotations == 1  # the empty label file is an empty image


def test_yolo_names_missing_or_wrong(tmp_path):
    folder = yolo_folder(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n"})
    write_text(folder / "data.yaml", "train: train/images\nnc: 2\n")
    with pytest.raises(DataError, match=r"data.yaml: no `names`; list the class names"):
        get_task(folder)
    write_text(folder / "data.yaml", "train: train/images\nnc: 3\nnames: [cat, dog]\n")
    with pytest.raises(DataError, match="nc is 3 but `names` has 2 entries"):
        get_task(folder)
    write_text(folder / "data.yaml", "train: train/images\nnames: {0: cat, 2: dog}\n")
    with pytest.raises(DataError, match=r"`names` keys must be the class indices 0..1"):
        get_task(folder)


def test_voc_bad_records_are_skipped_with_file_and_record(tmp_path):
    folder = voc_folder(tmp_path / "voc", {"a": [("cat", [2, 2, 10, 10]), ("cow", [2, 2, 10, 10]),
                                                 ("dog", [30, 5, 20, 10]), ("dog", [50, 30, 60, 40])],
                                           "nosize": [("cat", [2, 2, 10, 10])], "noimage": []},
                        sets={"train": ["a", "nosize", "noimage", "noxml"]}, labels="cat\ndog\n")
    xml = folder / "Annotations" / "nosize.xml"
    xml.write_text(xml.read_text().replace("<size><width>40</width><height>20</height><depth>3</depth></size>", ""))
    (folder / "JPEGImages" / "noimage.jpg").unlink()
    ds, messages = load_with_skips(folder)
    assert ds.report.skipped == [
        "Annotations/a.xml object 2 ('cow'): class 'cow' is not one of the categories (from labels.txt); "
        "object skipped",
        "Annotations/a.xml object 3 ('dog'): box [29, 4, 20, 10] (xyxy pixels) has no area; skipped",
        "Annotations/a.xml object 4 ('dog'): box [49, 29, 60, 40] (xyxy pixels) lies outside its 40x20 image; "
        "skipped",
        "Annotations/nosize.xml: no <size> with positive integer <width> and <height>; image skipped",
        "Annotations/noimage.xml: no image JPEGImages/noimage.<bmp|jpeg|jpg|png|tif|tiff|webp>; skipped",
        "ImageSets/Main/train.txt:4: 'noxml' has no Annotations/noxml.xml; image skipped"]
    assert len(ds) == 1 and ds.target(ds.image_ids[0])["labels"].tolist() == [0]


def test_an_empty_split_is_an_error_naming_its_file(tmp_path):
    folder = voc_folder(tmp_path / "voc", {"a": [("cat", [2, 2, 10, 10])]}, sets={"train": ["a"], "val": []})
    task = get_task(folder)
    with pytest.raises(DataError, match=r"ImageSets/Main/val.txt: the split has no images"):
        task.split("valid")
    coco = tmp_path / "coco"
    write_text(coco / "train" / "_annotations.coco.json",
               json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(DataError, match=r"train/_annotations.coco.json: the split has no images"):
        get_task(coco).split("train")
    yolo = yolo_folder(tmp_path / "y", {}, images=["a"])
    with pytest.raises(DataError, match=r"train/images\): the split has no images; 1 records were skipped, first: "
                                        r"train/images/a.png: no label file"):
        get_task(yolo).split("train")


def test_coco_images_its_file_does_not_list_are_reported(tmp_path):
    folder = tmp_path / "coco"
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}]
    write_text(folder / "train" / "_annotations.coco.json", json.dumps(
        {"images": images, "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    write_image(folder / "train" / "a.png")
    write_image(folder / "train" / "stray.png")
    ds, messages = load_with_skips(folder)
    assert ds.report.skipped == ["train/stray.png: image not listed in _annotations.coco.json; ignored"]


def test_a_folder_of_no_format_says_what_each_format_needs(tmp_path):
    write_image(tmp_path / "photos" / "a.jpg")
    with pytest.raises(DataError) as error:
        get_task(tmp_path / "photos")
    message = str(error.value)
    assert "\n" not in message and "is no dataset folder of a known format" in message
    for needs in ("COCO (Roboflow export) needs train/, valid/, test/ folders, each with _annotations.coco.json",
                  "COCO needs annotations/instances_<split>.json", "YOLO needs data.yaml with `names`",
                  "Pascal VOC needs Annotations/*.xml, JPEGImages/ and ImageSets/Main/{train,val,test}.txt"):
        assert needs in message


# -- the command line ----------------------------------------------------------------------------------------

def test_cli_inspect_prints_format_splits_counts_and_problems(folders, tmp_path):
    from adapt.cli import app

    result = CliRunner().invoke(app, ["tasks", "inspect", str(folders["yolo"])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"yolo: YOLO folder {folders['yolo'].resolve()}"
    assert lines[1] == "categories (7): tropical fish, shark, octopus, crab, dolphin, whale, squid"
    export = folders["roboflow"]
    for split in SPLITS:
        coco = json.loads((export / split / "_annotations.coco.json").read_text())
        want = [split, str(len(coco["images"])), str(len(coco["annotations"]))]
        assert any(line.split()[:3] == want for line in lines), (want, result.output)
    assert "problems: none" in result.output

    bad = yolo_folder(tmp_path / "bad", {"a": "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n"})
    write_text(bad / "data.yaml", "train: train/images\nval: valid/images\nnames: [cat, dog]\n")
    (bad / "valid" / "images").mkdir(parents=True)
    result = CliRunner().invoke(app, ["tasks", "inspect", str(bad)])
    assert result.exit_code == 0, result.output
    assert "problems (2):" in result.output
    assert "  train: train/labels/a.txt:2: class 7 out of range" in result.output
    assert "  valid: " in result.output and "the split has no images" in result.output
    result = CliRunner().invoke(app, ["tasks", "show", str(folders["voc"])])
    assert result.exit_code == 0 and "source: Pascal VOC folder" in result.output
    result = CliRunner().invoke(app, ["tasks", "inspect", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1 and "no such dataset folder or task file" in result.output
