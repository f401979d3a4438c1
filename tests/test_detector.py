"""The detect() API on a tiny random GLIP: output contract, chunked prompts, per-image prompts, bad input."""
import io

import pytest
import torch
from PIL import Image

from backbone.config import PostprocessConfig, tiny_for_tests
from backbone.detector import GLIPDetector, split_prompt
from backbone.model import GLIP
from backbone.postprocess import Postprocessor
from backbone.processor import GLIPProcessor


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = GLIP.from_config(tiny_for_tests())
    with torch.no_grad():
        model.head.bias0.fill_(0.0)  # random tiny weights: make scores pass the threshold
    processor = GLIPProcessor.from_config(model.config)
    return GLIPDetector(model, processor, Postprocessor(PostprocessConfig(score_threshold=0.0, max_detections=20)))


def image(width=120, height=80, color=(200, 30, 30)):
    return Image.new("RGB", (width, height), color)


def test_detections_are_in_original_pixels_with_names(detector):
    [dets] = detector.detect(image(120, 80), ["person", "toothbrush"], threshold=0.0)
    assert 0 < len(dets) <= 20
    assert dets.boxes.shape == (len(dets), 4)
    assert float(dets.boxes[:, 2].max()) <= 120 and float(dets.boxes[:, 3].max()) <= 80
    assert set(dets.names) <= {"person", "toothbrush"}
    assert dets.scores.tolist() == sorted(dets.scores.tolist(), reverse=True)
    records = dets.to_coco(image_id=7, category_ids=[11, 12], file_name="a.png")
    x1, y1, x2, y2 = dets.boxes[0].tolist()
    assert records[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert [r["category_id"] for r in records] == [[11, 12][i] for i in dets.labels.tolist()]
    assert [r["category"] for r in records] == dets.names
    assert {r["image_id"] for r in records} == {7} and {r["file_name"] for r in records} == {"a.png"}


def test_threshold_filters(detector):
    [all_dets] = detector.detect(image(), "person. car", threshold=0.0)
    cut = float(all_dets.scores.median())
    [high] = detector.detect(image(), "person. car", threshold=cut)
    assert len(high) < len(all_dets) and bool((high.scores > cut).all())


def test_long_category_lists_are_chunked_and_merged(detector):
    detector.processor.prompts.max_query_len = 24  # force several chunks on a short list
    try:
        names = [f"thing{i}" for i in range(30)]
        chunks = detector.tokenize(names)
        assert len(chunks) > 1
        [dets] = detector.detect(image(), names, threshold=0.0)
        assert len(dets.categories) == 30
        assert int(dets.labels.max()) < 30
    finally:
        detector.processor.prompts.max_query_len = 256


def test_more_than_80_categories_work(detector):
    names = [f"c{i}" for i in range(120)]
    [dets] = detector.detect(image(), names, threshold=0.0)
    assert len(dets.categories) == 120


def test_a_different_prompt_per_image(detector):
    # Same size: padding (which the official model also lets fusion see) is then identical.
    second = image(color=(20, 200, 90))
    a, b = detector.detect([image(), second], [["person"], ["car", "bicycle"]], threshold=0.0)
    assert a.categories == ["person"] and b.categories == ["car", "bicycle"]
    [alone] = detector.detect(second, ["car", "bicycle"], threshold=0.0)
    torch.testing.assert_close(alone.scores, b.scores, rtol=1e-4, atol=1e-5)


def test_bad_inputs_give_clear_errors(detector):
    with pytest.raises(ValueError, match="no categories"):
        detector.detect(image(), [], threshold=0.0)
    with pytest.raises(ValueError, match="not an image"):
        detector.detect(io.BytesIO(b"this is text, not a picture"), ["person"])
    with pytest.raises(ValueError, match="one list for all images or one per image"):
        detector.detect([image(), image()], [["a"], ["b"], ["c"]])
    with pytest.raises(ValueError, match="over|exceeds|limit"):
        detector.detect(image(), ["word " * 300])


def test_grayscale_rgba_and_palette_images_are_accepted(detector):
    for mode in ("L", "RGBA", "P"):
        [dets] = detector.detect(image().convert(mode), ["person"], threshold=0.0)
        assert dets.boxes.shape[1] == 4


def test_split_prompt():
    assert split_prompt("fish. jellyfish.  penguin.") == ["fish", "jellyfish", "penguin"]
