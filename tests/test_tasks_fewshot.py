"""K-shot sampling: the greedy pass, seeded determinism, official split files, errors."""
from __future__ import annotations

import json

import pytest

from tasks import CocoDetection, sample_few_shot
from tasks.fewshot import stable_shuffle
from tests._coco_helpers import write_coco

CATS = [{"id": 1, "name": "fish"}, {"id": 2, "name": "shark"}, {"id": 3, "name": "crab"}]


def make_split(tmp_path, n_images: int = 40):
    """Images cycle through category sets; some hold several categories, some none."""
    patterns = [[1], [2], [1, 2], [3], [1, 3], [], [2, 3], [1, 2, 3]]
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": 100 + i, "file_name": f"i{i}.png", "width": 8, "height": 8})
        for cid in patterns[i % len(patterns)]:
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cid, "bbox": [1, 1, 3, 3]})
    ann = write_coco(tmp_path / "train", images=images, annotations=anns, categories=CATS)
    return CocoDetection(ann, ann.parent)


def test_stable_shuffle_is_pinned():
    # The exact order is part of the protocol: same ids on every machine and Python version.
    assert stable_shuffle(list(range(10)), 3) == [1, 5, 7, 6, 0, 3, 8, 9, 4, 2]
    assert stable_shuffle(list(range(10)), 3) == stable_shuffle(list(range(10)), 3)
    assert sorted(stable_shuffle(list(range(50)), 30)) == list(range(50))


@pytest.mark.parametrize("shots", [1, 3, 5])
def test_every_category_gets_k_images_and_images_count_for_all_their_categories(tmp_path, shots):
    ds = make_split(tmp_path)
    subset = sample_few_shot(ds, shots, seed=3)
    assert subset.source == "seeded" and subset.shots == shots and subset.seed == 3
    assert all(count >= shots for count in subset.images_per_category.values())
    # greedy: every kept image was needed by at least one category when it was taken
    need = {label: shots for label in range(3)}
    for image_id in subset.image_ids:
        labels = ds.image_labels(image_id)
        assert any(need[label] > 0 for label in labels)
        for label in labels:
            need[label] -= 1
    assert len(set(subset.image_ids)) == len(subset.image_ids) <= 3 * shots
    assert "seed 3" in subset.describe()


def test_same_seed_same_ids_different_seeds_differ(tmp_path):
    ds = make_split(tmp_path)
    a = sample_few_shot(ds, 3, seed=30)
    assert sample_few_shot(ds, 3, seed=30).image_ids == a.image_ids
    others = {sample_few_shot(ds, 3, seed=s).image_ids for s in (3, 300, 7)}
    assert any(ids != a.image_ids for ids in others)
    assert sample_few_shot(ds.coco, 3, seed=30).image_ids == a.image_ids  # plain COCO works too


def test_sorted_pass_without_seed(tmp_path):
    ds = make_split(tmp_path)
    subset = sample_few_shot(ds, 1, seed=None)
    assert subset.source == "sorted" and subset.image_ids == (100, 101, 103)


def test_official_split_file_is_used_and_reported(tmp_path):
    ds = make_split(tmp_path)
    official = {"images": [{"id": 1, "file_name": "i2.png"}, {"id": 2, "file_name": "i3.png"}], "annotations": []}
    (ds.ann_file.parent / "fewshot_train_shot1_seed3.json").write_text(json.dumps(official))
    subset = sample_few_shot(ds, 1, seed=3)
    assert subset.source == "official-file" and subset.image_ids == (102, 103)  # matched by file name
    assert subset.file.name == "fewshot_train_shot1_seed3.json" and "official split file" in subset.describe()
    assert sample_few_shot(ds, 1, seed=3, use_official=False).source == "seeded"
    assert sample_few_shot(ds, 1, seed=30).source == "seeded"  # no file for seed 30
    (ds.ann_file.parent / "fewshot_train_shot3_seed3.json").write_text(json.dumps({"images": [{"file_name": "x.png"}]}))
    with pytest.raises(ValueError, match="1 image\\(s\\) are not in the training split"):
        sample_few_shot(ds, 3, seed=3)


def test_impossible_shot_counts_and_empty_splits_are_clear_errors(tmp_path):
    ds = make_split(tmp_path, n_images=8)  # each category appears in 4 images
    with pytest.raises(ValueError, match="cannot draw 5-shot: 'fish' has 4, 'shark' has 4, 'crab' has 4"):
        sample_few_shot(ds, 5, seed=3)
    with pytest.raises(ValueError, match="positive integer"):
        sample_few_shot(ds, 0, seed=3)
    empty = write_coco(tmp_path / "empty", images=[], annotations=[], categories=CATS)
    with pytest.raises(ValueError, match="no training images"):
        sample_few_shot(CocoDetection(empty, empty.parent), 1, seed=3)
