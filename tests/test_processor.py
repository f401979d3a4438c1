"""backbone.processor: prompt layout, tokens and positive maps, chunking, image loading and preprocessing."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.config import ImageConfig, tiny_for_tests
from backbone.images import ImageProcessor
from backbone.prompts import PromptTokenizer
from backbone.processor import (CategoryPrompt, GLIPProcessor, ImageBatch, TokenizedPrompt, build_caption, get_size,
                                load_image, load_tokenizer, rescale_boxes)


AQUARIUM = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
# odinw_35 Aquarium CAPTION_PROMPT (FINDINGS.md §10).
AQUARIUM_35 = [
    CategoryPrompt("fish", prefix=" "),
    CategoryPrompt("jellyfish"),
    CategoryPrompt("penguin", suffix=" , which is black and white"),
    CategoryPrompt("puffin", suffix=" with orange beaks "),
    CategoryPrompt("shark"),
    CategoryPrompt("starfish"),
    CategoryPrompt("stingray", suffix=" which is flat and round"),
]
AQUARIUM_35_CAPTION = (" fish. jellyfish. penguin , which is black and white. puffin with orange beaks . shark. "
                       "starfish. stingray which is flat and round")
MEAN = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
STD = torch.tensor([57.375, 57.12, 58.395]).view(3, 1, 1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return GLIPProcessor(prompts=PromptTokenizer(tokenizer, 256), images=ImageProcessor(ImageConfig()))


def label_to_tokens(prompt: TokenizedPrompt) -> dict[int, list[int]]:
    """The official `positive_map_label_to_token` (labels 1-based)."""
    return {j + 1: tokens for j, tokens in enumerate(prompt.category_tokens())}


# ---------------------------------------------------------------------------------------------- caption


def test_build_caption_plain_names_official_layout():
    caption, spans = build_caption(AQUARIUM)
    assert caption == "fish. jellyfish. penguin. puffin. shark. starfish. stingray"  # no trailing separator
    assert [caption[b:e] for b, e in spans] == AQUARIUM


def test_build_caption_prefix_suffix_only_name_spans():
    caption, spans = build_caption(AQUARIUM_35)
    assert caption == AQUARIUM_35_CAPTION
    assert [caption[b:e] for b, e in spans] == AQUARIUM
    assert spans[0] == (1, 5)


def test_build_caption_separator_and_mixed_items():
    caption, spans = build_caption(["cat", CategoryPrompt("dog", prefix="a ")], separator=" and ")
    assert caption == "cat and a dog"
    assert spans == [(0, 3), (10, 13)]


@pytest.mark.parametrize("bad, error, words", [
    ([], ValueError, "empty"),
    (["cat", "  "], ValueError, "category 1 is blank"),
    ("cat", TypeError, "wrap it in a list"),
    (["cat", 3], TypeError, "category 1 is a int"),
])
def test_build_caption_errors(bad, error, words):
    with pytest.raises(error, match=words):
        build_caption(bad)


def test_category_prompt_validates():
    with pytest.raises(ValueError, match="blank"):
        CategoryPrompt(" ", prefix="a ")
    with pytest.raises(TypeError, match="suffix must be a str"):
        CategoryPrompt("cat", suffix=None)
    with pytest.raises(TypeError):
        CategoryPrompt("cat", "a ")  # prefix/suffix are keyword-only: no silent swap


# ----------------------------------------------------------------------------------------------- tokens


def test_tokenizer_is_bert_base_uncased(tokenizer):
    ids = tokenizer("PERSON toothbrush", add_special_tokens=True)["input_ids"]
    assert ids == [101, 2711, 11868, 18623, 102]  # lower-cased; tooth ##brush
    assert tokenizer.convert_tokens_to_ids(".") == 1012
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id) == (101, 102)


def test_glip_t_reference_caption(processor):
    caption = "person. bicycle. car. toothbrush."
    (prompt,) = processor.tokenize((caption, [(0, 6), (8, 15), (17, 20), (22, 32)]))
    assert prompt.input_ids.tolist() == [[101, 2711, 1012, 10165, 1012, 2482, 1012, 11868, 18623, 1012, 102]]
    assert prompt.input_ids.dtype == torch.int64 and prompt.attention_mask.dtype == torch.int64
    assert prompt.attention_mask.tolist() == [[1] * 11]  # real tokens only, no padding to 256
    assert prompt.positive_map.shape == (4, 11) and prompt.positive_map.dtype == torch.bool
    assert label_to_tokens(prompt) == {1: [1], 2: [3], 3: [5], 4: [7, 8]}
    assert prompt.categories == ("person", "bicycle", "car", "toothbrush")
    assert prompt.category_offset == 0


def test_odinw13_aquarium(processor):
    (prompt,) = processor.tokenize(AQUARIUM)
    assert prompt.caption == "fish. jellyfish. penguin. puffin. shark. starfish. stingray"
    assert label_to_tokens(prompt) == {1: [1], 2: [3, 4], 3: [6], 4: [8, 9], 5: [11], 6: [13, 14], 7: [16, 17]}
    assert prompt.input_ids[0, 0] == processor.tokenizer.cls_token_id
    assert prompt.input_ids[0, -1] == processor.tokenizer.sep_token_id


def test_odinw35_aquarium_only_names_positive(processor):
    (prompt,) = processor.tokenize(AQUARIUM_35)
    assert prompt.caption == AQUARIUM_35_CAPTION
    assert label_to_tokens(prompt) == {1: [1], 2: [3, 4], 3: [6], 4: [14, 15], 5: [21], 6: [23, 24], 7: [26, 27]}
    assert prompt.categories == tuple(AQUARIUM)


@pytest.mark.reference
@pytest.mark.parametrize("case", ["glip_t", "glip_a"])
def test_reference_prompts(processor, case, reference_dir):
    from safetensors.torch import load_file

    info = json.loads((reference_dir / case / "prompt.json").read_text())
    ref = load_file(str(reference_dir / case / "outputs.safetensors"))
    (prompt,) = processor.tokenize((info["caption"], info["phrase_char_spans"]))
    n = int(ref["lang.attention_mask"].sum())
    assert torch.equal(prompt.input_ids, ref["lang.input_ids"][:, :n])
    assert torch.equal(prompt.attention_mask, ref["lang.attention_mask"][:, :n])
    assert torch.equal(prompt.positive_map, ref["lang.positive_map"][:, :n] > 0)
    assert {str(k): v for k, v in label_to_tokens(prompt).items()} == info["positive_map_label_to_token"]


def test_span_errors(processor):
    with pytest.raises(ValueError, match=r"span \(3, 4\) = ' ' of caption 'cat dog' covers no token"):
        processor.tokenize(("cat dog", [(0, 3), (3, 4)]))
    with pytest.raises(ValueError, match="does not lie inside caption 'cat'"):
        processor.tokenize(("cat", [(0, 9)]))
    with pytest.raises(ValueError, match="no phrase spans"):
        processor.tokenize(("cat", []))
    with pytest.raises(TypeError, match=r"\(begin, end\) pair"):
        processor.tokenize(("cat", [(0.0, 2.5)]))
    # A zero-width space survives str.strip() but the tokenizer drops it: the name maps to no token.
    with pytest.raises(ValueError, match="covers no token"):
        processor.tokenize(["cat", "\u200b"])


def test_category_list_errors(processor):
    with pytest.raises(ValueError, match="empty"):
        processor.tokenize([])
    with pytest.raises(ValueError, match="blank"):
        processor.tokenize(["cat", ""])
    with pytest.raises(TypeError, match="wrap it in a list"):
        processor.tokenize("cat")


def test_two_names_are_categories_not_a_grounding_pair(processor):
    (prompt,) = processor.tokenize(("cat", "dog"))
    assert prompt.caption == "cat. dog" and prompt.categories == ("cat", "dog")


def test_many_categories_are_chunked(processor, tokenizer):
    names = [f"object number {i}" for i in range(400)]
    prompts = processor.tokenize(names)
    assert len(prompts) > 4
    assert [c for p in prompts for c in p.categories] == names  # every category once, order kept
    offset = 0
    for i, p in enumerate(prompts):
        assert p.category_offset == offset
        offset += p.num_categories
        assert p.num_tokens <= 256
        assert p.positive_map.shape == (p.num_categories, p.num_tokens)
        assert p.caption == build_caption(p.categories)[0]
        ids = p.input_ids[0]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        for name, row in zip(p.categories, p.positive_map):
            assert tokenizer.decode(ids[row]) == name
        assert p.positive_map.sum(0).max() <= 1  # no token in two categories
        if i + 1 < len(prompts):  # greedy: the next category would not have fitted
            grown = build_caption(list(p.categories) + [prompts[i + 1].categories[0]])[0]
            assert len(tokenizer(grown)["input_ids"]) > 256


def test_chunks_of_at_most_n_categories(processor):
    """GLIP's LVIS evaluation runs 40 categories per prompt; the chunk size is an option, the token limit still holds."""
    names = [f"thing {i}" for i in range(100)]
    filled = processor.tokenize(names)
    by_40 = processor.tokenize(names, max_categories=40)
    assert [p.num_categories for p in by_40] == [40, 40, 20]
    assert [c for p in by_40 for c in p.categories] == names and [p.category_offset for p in by_40] == [0, 40, 80]
    assert len(filled) < len(by_40) and max(p.num_categories for p in filled) > 40
    long_names = [f"a rather long description of object number {i}" for i in range(60)]
    assert all(p.num_tokens <= 256 for p in processor.tokenize(long_names, max_categories=40))
    with pytest.raises(ValueError, match="at least one category"):
        processor.tokenize(names, max_categories=0)


def test_chunk_boundary_is_exact(tokenizer):
    small = GLIPProcessor(prompts=PromptTokenizer(tokenizer, 11), images=ImageProcessor(ImageConfig()))
    # n single-token names: [CLS] + n names + (n-1) "." + [SEP] = 2n + 1 tokens.
    (one,) = small.tokenize(["cat"] * 5)
    assert one.num_tokens == 11
    first, second = small.tokenize(["cat"] * 5 + ["dog"])
    assert (first.num_categories, second.num_categories, second.category_offset) == (5, 1, 5)
    assert second.input_ids.tolist() == [[101, 3899, 102]]
    assert second.positive_map.tolist() == [[False, True, False]]


def test_lvis_sized_prompt(processor):
    names = [f"category {i}" for i in range(1203)]
    prompts = processor.tokenize(names)
    assert sum(p.num_categories for p in prompts) == 1203
    assert all(p.num_tokens <= 256 for p in prompts)


def test_single_overlong_category(processor):
    long = CategoryPrompt("cat", suffix=" very" * 300)
    with pytest.raises(ValueError, match=r"category 'cat' takes 301 tokens.*max_query_len=256.*shorter description"):
        processor.tokenize(["dog", long, "bird"])
    with pytest.raises(ValueError, match="grounding caption is not split"):
        processor.tokenize(("cat" + " very" * 300, [(0, 3)]))


def test_from_config(tokenizer):
    cfg = tiny_for_tests()
    processor = GLIPProcessor.from_config(cfg)
    assert processor.max_query_len == cfg.text.max_query_len and processor.image == cfg.image
    assert processor.tokenize(["person"])[0].input_ids.tolist() == [[101, 2711, 102]]
    bad = cfg.replace(text=type(cfg.text)(vocab_size=100))
    with pytest.raises(ValueError, match="vocab_size=100"):
        GLIPProcessor.from_config(bad)


# ------------------------------------------------------------------------------------------------ images


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise_rgb(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_load_image_sources(tmp_path):
    array = noise_rgb()
    data = encode(Image.fromarray(array), "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (path, str(path), data, io.BytesIO(data), Image.open(io.BytesIO(data)), array):
        image = load_image(source)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), array)


def test_load_image_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="is not an image PIL can read"):
        load_image(b"this is not an image at all")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="cannot load an image from a int"):
        load_image(3)
    with pytest.raises(ValueError, match="float64"):
        load_image(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="max_pixels=1000"):
        load_image(np.zeros((40, 40, 3), np.uint8), max_pixels=1000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(tmp_path, fmt):
    data = encode(Image.fromarray(noise_rgb()), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(path)


def test_load_image_grayscale_and_alpha():
    gray = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    out = np.asarray(load_image(encode(Image.fromarray(gray), "PNG")))
    assert out.shape == (48, 64, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))

    rgba = np.dstack([noise_rgb(), np.full((48, 64), 7, np.uint8)])
    out = np.asarray(load_image(encode(Image.fromarray(rgba), "PNG")))
    assert np.array_equal(out, rgba[..., :3])  # alpha dropped, colours kept as stored

    la = Image.merge("LA", [Image.fromarray(gray), Image.new("L", (64, 48), 0)])
    assert np.array_equal(np.asarray(load_image(encode(la, "PNG")))[..., 0], gray)


def test_load_image_palette_with_transparency():
    palette = Image.new("P", (8, 8))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))  # left half blue, right half red
    data = encode(palette, "PNG", transparency=0)  # red is the transparent index
    out = np.asarray(load_image(data))
    assert out.shape == (8, 8, 3)
    assert (out[:, :4] == [0, 0, 255]).all() and (out[:, 4:] == [255, 0, 0]).all()


def test_load_image_cmyk():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    out = np.asarray(load_image(encode(cmyk, "JPEG", quality=100)))
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_load_image_16bit_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    expected = [0, 1, 128, 255]  # PIL's convert("L") would clip 257 and 32768 to 255
    little = load_image(encode(Image.fromarray(values), "PNG"))  # decodes as I;16
    assert np.asarray(little)[0, :, 0].tolist() == expected
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert np.asarray(load_image(big))[0, :, 1].tolist() == expected
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I" and np.asarray(load_image(as_int32))[0, :, 2].tolist() == expected
    with pytest.raises(ValueError, match=r"values in \[0, 70000\]"):
        load_image(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    with pytest.raises(ValueError, match="mode 'F'"):
        load_image(Image.fromarray(np.zeros((2, 2), np.float32)))


def test_load_image_exif_rotation():
    # 32 high x 64 wide, four colour quadrants; EXIF orientation 6 = "rotate 90° clockwise to display".
    array = np.zeros((32, 64, 3), np.uint8)
    array[:16, :32] = (255, 0, 0)
    array[:16, 32:] = (0, 255, 0)
    array[16:, :32] = (0, 0, 255)
    array[16:, 32:] = (255, 255, 0)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    out = np.asarray(load_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()))).astype(int)
    clockwise = np.rot90(array, k=-1).astype(int)
    assert out.shape == (64, 32, 3)
    assert np.abs(out - clockwise).mean() < 5  # JPEG noise only
    assert np.abs(out - np.rot90(array, k=1).astype(int)).mean() > 50  # not the opposite rotation
    # Top-left of the upright image is the original's bottom-left quadrant (blue).
    assert np.abs(out[4, 4] - [0, 0, 255]).max() < 20


# -------------------------------------------------------------------------------------------- preprocess


def test_get_size_official_samples():
    # From shared/reference/preprocess_check.json "get_size_800_1333" (keys there are WxH).
    samples = {(320, 480): (800, 1200), (400, 420): (800, 840), (480, 640): (800, 1066), (400, 1000): (533, 1332),
               (1000, 333): (1333, 444), (800, 1333): (800, 1333), (800, 800): (800, 800), (375, 500): (800, 1066)}
    for size, expected in samples.items():
        assert get_size(size, 800, 1333) == expected, size
    assert get_size((400, 1000), 800, None) == (800, 2000)  # no cap: the GLIPDemo Resize(800) path


@pytest.mark.reference
def test_get_size_matches_reference_json(reference_dir):
    info = json.loads((reference_dir / "preprocess_check.json").read_text())
    for key, expected in info["get_size_800_1333"]["samples"].items():
        w, h = map(int, key.split("x"))
        assert list(get_size((h, w), 800, 1333)) == expected, key


@pytest.mark.reference
def test_preprocess_matches_official_resize(processor, reference_dir):
    from safetensors.torch import load_file

    ref = load_file(str(reference_dir / "preprocess_check.safetensors"))
    batch = processor.preprocess(reference_dir / "reference_input.png")
    assert batch.image_sizes == [(800, 1200)] and batch.original_sizes == [(320, 480)]
    assert batch.pixel_values.shape == (1, 3, 800, 1216)  # 1200 padded to a multiple of 32
    sample = batch.pixel_values[0, :, :800:8, :1200:8]
    assert torch.equal(sample, ref["dataset800x1333.sample"])
    assert torch.equal(sample, ref["demo800.sample"])
    assert (batch.pixel_values[0, :, :, 1200:] == 0).all()


@pytest.mark.reference
def test_preprocess_no_resize_is_bit_exact(processor, reference_dir):
    from safetensors.torch import load_file

    ref = load_file(str(reference_dir / "glip_t" / "outputs.safetensors"))["input.image"]
    batch = processor.preprocess(reference_dir / "glip_t" / "input.png", resize=False)
    assert batch.pixel_values.dtype == torch.float32
    assert torch.equal(batch.pixel_values, ref)


def test_preprocess_batch_pads_after_normalisation(tokenizer):
    processor = GLIPProcessor(prompts=PromptTokenizer(tokenizer), images=ImageProcessor(ImageConfig(min_size=64, max_size=96)))
    a, b = noise_rgb(30, 60, seed=1), noise_rgb(50, 40, seed=2)
    batch = processor.preprocess([a, b], resize=False)
    assert isinstance(batch, ImageBatch) and len(batch) == 2
    assert batch.pixel_values.shape == (2, 3, 64, 64)
    assert batch.image_sizes == batch.original_sizes == [(30, 60), (50, 40)]
    bgr = torch.from_numpy(a).permute(2, 0, 1).flip(0).float()
    assert torch.equal(batch.pixel_values[0, :, :30, :60], (bgr - MEAN) / STD)
    assert (batch.pixel_values[0, :, 30:] == 0).all() and (batch.pixel_values[1, :, :, 40:] == 0).all()
    mask = batch.pixel_mask()
    assert mask[0].sum() == 30 * 60 and mask[1].sum() == 50 * 40

    resized = processor.preprocess([a, b])  # 30x60 -> short side 64 would make 128 > 96 -> 48x96
    assert resized.image_sizes == [(48, 96), (80, 64)] and resized.original_sizes == [(30, 60), (50, 40)]
    assert resized.pixel_values.shape == (2, 3, 96, 96)


def test_preprocess_channel_order(tokenizer):
    processor = GLIPProcessor(prompts=PromptTokenizer(tokenizer), images=ImageProcessor(ImageConfig(size_divisibility=0)))
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 0] = 255
    pixels = processor.preprocess(red, resize=False).pixel_values[0]
    assert pixels.shape == (3, 2, 3)
    assert torch.allclose(pixels[:, 0, 0], (torch.tensor([0.0, 0.0, 255.0]) - MEAN[:, 0, 0]) / STD[:, 0, 0])


def test_preprocess_errors(processor):
    with pytest.raises(ValueError, match="no images"):
        processor.preprocess([])
    with pytest.raises(ValueError, match="not an image"):
        processor.preprocess([noise_rgb(), b"garbage"])


def test_rescale_boxes():
    boxes = torch.tensor([[10.0, 20.0, 96.0, 48.0], [0.0, 0.0, 1.0, 1.0]])
    out = rescale_boxes(boxes, image_size=(48, 96), original_size=(30, 60))
    assert torch.allclose(out, torch.tensor([[6.25, 12.5, 60.0, 30.0], [0.0, 0.0, 0.625, 0.625]]))
    assert torch.equal(GLIPProcessor.rescale_boxes(boxes, (48, 96), (30, 60)), out)
    # Official BoxList.resize arithmetic: float32 box times the double ratio.
    assert torch.equal(rescale_boxes(boxes, (800, 1200), (320, 480)), boxes * (480 / 1200))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        rescale_boxes(torch.zeros(3, 5), (1, 1), (1, 1))
