"""COCO loading: Roboflow and plain layouts, image modes/EXIF, and every bad-data case."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import Category, CocoDetection, DataError, find_coco_splits, load_rgb
from tasks.coco import to_rgb
from tests._coco_helpers import write_coco


def test_roboflow_split_loads_targets_and_drops_dataset_category(tmp_path):
    ann = write_coco(tmp_path / "train")
    ds = CocoDetection(ann, tmp_path / "train")
    assert ds.category_names == ["fish", "shark"]  # Roboflow's id 0 "creatures" dropped
    assert ds.report.dropped_categories == ["id 0 'creatures'"]
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    image, target = ds[0]
    assert image.mode == "RGB" and image.size == (64, 48)
    assert target["image_id"] == 1
    assert target["boxes"].tolist() == [[4.0, 4.0, 14.0, 12.0], [20.0, 10.0, 50.0, 30.0]]  # xyxy
    assert target["labels"].tolist() == [0, 1]
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert ds.report.images_without_annotations == 1
    assert set(ds.coco.cats) == {1, 2}


def test_task_categories_override_names_and_check_ids(tmp_path):
    ann = write_coco(tmp_path / "train")
    ds = CocoDetection(ann, tmp_path / "train", categories=[Category("Fish"), Category("great shark", id=2)])
    assert ds.category_names == ["Fish", "great shark"]
    assert ds.report.renamed_categories == ["'shark'->'great shark'"]
    with pytest.raises(DataError, match=r"task categories not in the file: 'whale' \(id 3\)"):
        CocoDetection(ann, tmp_path / "train", categories=[Category("fish"), Category("shark"), Category("whale")])
    with pytest.raises(DataError, match=r"file categories not in the task: 'shark' \(id 2\)"):
        CocoDetection(ann, tmp_path / "train", categories=[Category("fish")])


def test_plain_coco_layout_is_detected(tmp_path):
    (tmp_path / "annotations").mkdir()
    write_coco(tmp_path / "images", roboflow=False)
    (tmp_path / "images" / "_annotations.coco.json").rename(tmp_path / "annotations" / "instances_val2017.json")
    splits = find_coco_splits(tmp_path)
    assert list(splits) == ["val"]
    ann, img_dir = splits["val"]
    ds = CocoDetection(ann, img_dir)
    assert len(ds) == 3 and ds.category_names == ["fish", "shark"] and not ds.report.dropped_categories


def test_roboflow_layout_is_detected(tmp_path):
    for split in ("train", "valid", "test"):
        write_coco(tmp_path / split)
    assert sorted(find_coco_splits(tmp_path)) == ["test", "train", "valid"]
    with pytest.raises(DataError, match="no COCO data found"):
        find_coco_splits(tmp_path / "train")


def _bad(tmp_path, **changes) -> Path:
    return write_coco(tmp_path / "bad", **changes)


def test_missing_image_id_is_rejected(tmp_path):
    ann = _bad(tmp_path, images=[{"file_name": "img1.png", "width": 8, "height": 8}], annotations=[])
    with pytest.raises(DataError, match=r"(?s)_annotations.coco.json.*images\[0\]: missing or non-integer id"):
        CocoDetection(ann, ann.parent)


def test_duplicate_image_ids_are_rejected(tmp_path):
    images = [{"id": 7, "file_name": "a.png", "width": 8, "height": 8},
              {"id": 7, "file_name": "b.png", "width": 8, "height": 8}]
    ann = _bad(tmp_path, images=images, annotations=[])
    with pytest.raises(DataError, match=r"images\[1\]: duplicate image id 7 \('a.png' and 'b.png'\)"):
        CocoDetection(ann, ann.parent)


def test_duplicate_annotation_ids_are_rejected(tmp_path):
    anns = [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]}]
    ann = _bad(tmp_path, annotations=anns)
    with pytest.raises(DataError, match=r"annotations\[1\] \(id 5\): duplicate annotation id 5"):
        CocoDetection(ann, ann.parent)


def test_unknown_image_and_category_references_are_rejected_together(tmp_path):
    anns = [{"id": 1, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]},
            {"id": 2, "image_id": 1, "category_id": 42, "bbox": [1, 1, 2, 2]}]
    ann = _bad(tmp_path, annotations=anns)
    with pytest.raises(DataError) as err:
        CocoDetection(ann, ann.parent)
    msg = str(err.value)
    assert str(ann) in msg and "2 problem(s)" in msg
    assert "annotations[0] (id 1): unknown image id 99" in msg
    assert "annotations[1] (id 2): unknown category id 42 (image 'img1.png')" in msg


@pytest.mark.parametrize("bbox", [[5, 5, 0, 4], [5, 5, 4, -1]])
def test_non_positive_boxes_are_rejected(tmp_path, bbox):
    ann = _bad(tmp_path, annotations=[{"id": 3, "image_id": 1, "category_id": 1, "bbox": bbox}])
    with pytest.raises(DataError, match=r"annotations\[0\] \(id 3\): box .* non-positive size"):
        CocoDetection(ann, ann.parent)


def test_malformed_boxes_are_rejected(tmp_path):
    ann = _bad(tmp_path, annotations=[{"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},
                                      {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, float("nan"), 3, 3]}])
    with pytest.raises(DataError, match=r"(?s)id 3\): bbox must be 4 finite numbers.*id 4\): bbox must be"):
        CocoDetection(ann, ann.parent)


def test_boxes_outside_the_image_are_clipped_and_counted(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [-4, 40, 20, 20]},  # 64x48 image
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 0, 10, 10]},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5]}]
    ann = _bad(tmp_path, annotations=anns)
    with pytest.warns(UserWarning, match=r"clipped 2 boxes.*annotations\[0\] \(id 1\)"):
        ds = CocoDetection(ann, ann.parent)
    assert ds.report.clipped_boxes == 2
    assert ds.target(1)["boxes"].tolist() == [[0.0, 40.0, 16.0, 48.0], [60.0, 0.0, 64.0, 10.0], [1, 1, 6, 6]]
    assert ds.coco.anns[1]["bbox"] == [0.0, 40.0, 16.0, 8.0]  # evaluation sees the same clipped box
    with pytest.raises(DataError, match=r"id 1\): box \[-4, 40, 20, 20\] extends outside its 64x48 image"):
        CocoDetection(ann, ann.parent, box_policy="error")


def test_boxes_entirely_outside_the_image_are_rejected(tmp_path):
    ann = _bad(tmp_path, annotations=[{"id": 9, "image_id": 1, "category_id": 1, "bbox": [70, 5, 5, 5]}])
    with pytest.raises(DataError, match=r"id 9\): box \[70, 5, 5, 5\] lies outside its 64x48 image 'img1.png'"):
        CocoDetection(ann, ann.parent)


def test_annotations_on_roboflow_dataset_category_are_an_error(tmp_path):
    ann = _bad(tmp_path, annotations=[{"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(DataError, match="1 annotations use category id 0 \\('creatures'\\)"):
        CocoDetection(ann, ann.parent)


def test_invalid_json_and_missing_files(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        CocoDetection(bad, tmp_path)
    with pytest.raises(DataError, match="nothere.json: annotation file not found"):
        CocoDetection(tmp_path / "nothere.json", tmp_path)
    ann = write_coco(tmp_path / "split")
    (tmp_path / "split" / "img2.png").unlink()
    with pytest.raises(DataError, match=r"image file not found: 'img2.png' \(image id 2\)"):
        CocoDetection(ann, ann.parent)
    ds = CocoDetection(ann, ann.parent, check_files=False)
    with pytest.raises(DataError, match=r"img2.png \(image id 2\): image file not found"):
        ds[1]


def test_unreadable_image_names_file_and_record(tmp_path):
    ann = write_coco(tmp_path / "split")
    (tmp_path / "split" / "img1.png").write_bytes(b"definitely not a png")
    ds = CocoDetection(ann, ann.parent)
    with pytest.raises(DataError, match=r"img1.png \(image id 1\): unreadable image"):
        ds[0]


def test_image_size_disagreeing_with_annotations_is_an_error(tmp_path):
    ann = write_coco(tmp_path / "split")
    Image.new("RGB", (10, 10)).save(tmp_path / "split" / "img1.png")
    ds = CocoDetection(ann, ann.parent)
    with pytest.raises(DataError, match="image is 10x10 but the annotation file says 64x48"):
        ds[0]


def test_exif_orientation_is_applied(tmp_path):
    raw = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; left half red
    raw[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(raw).save(path, exif=exif, quality=95)
    img = load_rgb(path, 1, (20, 40))
    assert img.size == (20, 40)
    top = np.asarray(img)[2, 10]
    assert top[0] > 200 and top[1] < 60  # the red left half is now on top
    from tasks.coco import LoadReport

    report = LoadReport("x")
    raw_img = load_rgb(path, 1, (40, 20), report)  # annotations made on the raw pixels: orientation ignored
    assert raw_img.size == (40, 20) and report.exif_ignored == 1


def test_any_mode_becomes_rgb(tmp_path):
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    sixteen.save(tmp_path / "16.png")
    rgb = load_rgb(tmp_path / "16.png")
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_rgb(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [255, 0, 0]]]

    rgba = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[127, 127, 127]]]
    assert to_rgb(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).getpixel((1, 1)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_crowd_boxes_are_kept_for_evaluation_only(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 10, 5, 5]}]
    ann = write_coco(tmp_path / "s", annotations=anns)
    ds = CocoDetection(ann, ann.parent)
    assert ds.report.crowd_annotations == 1
    assert ds.target(1)["labels"].tolist() == [1]
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2


def test_subset_view(tmp_path):
    ds = CocoDetection(write_coco(tmp_path / "s"), tmp_path / "s")
    sub = ds.subset([2])
    assert len(sub) == 1 and sub[0][1]["image_id"] == 2 and len(ds) == 3
    with pytest.raises(KeyError, match=r"\[77\]"):
        ds.subset([77])


def test_valid_data_gives_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(write_coco(tmp_path / "s"), tmp_path / "s")
    assert ds.report.clipped_boxes == 0 and "3 images, 3 boxes" in ds.report.summary()
