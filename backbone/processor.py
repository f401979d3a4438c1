"""GLIP's pre-processing behind one object: prompts (`backbone.prompts`) and images (`backbone.images`).

No model code here: only tensors (token ids, masks, positive maps, pixels) reach the model.
"""
from __future__ import annotations

from collections.abc import Sequence

from backbone.config import GLIPConfig
from backbone.images import ImageBatch, ImageInput, ImageProcessor, get_size, load_image, rescale_boxes
from backbone.prompts import CategoryPrompt, PromptTokenizer, TokenizedPrompt, build_caption, load_tokenizer

__all__ = ["GLIPProcessor", "CategoryPrompt", "TokenizedPrompt", "ImageBatch", "ImageInput", "build_caption",
           "get_size", "load_image", "load_tokenizer", "rescale_boxes"]


class GLIPProcessor:
    """Turns categories into token ids + positive maps (`tokenize`) and images into normalised padded pixels
    (`preprocess`), like a transformers processor over its tokenizer and image processor."""

    def __init__(self, *, prompts: PromptTokenizer, images: ImageProcessor):
        self.prompts = prompts
        self.images = images

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
        return cls(prompts=PromptTokenizer(tokenizer, cfg.text.max_query_len),
                   images=ImageProcessor(cfg.image, max_pixels))

    @property
    def tokenizer(self):
        return self.prompts.tokenizer

    @property
    def max_query_len(self) -> int:
        return self.prompts.max_query_len

    @property
    def image(self):
        """The resize and normalisation settings."""
        return self.images.image

    def tokenize(self, prompt, *, separator: str = ". ", max_categories: int | None = None) -> list[TokenizedPrompt]:
        """See `PromptTokenizer.tokenize`."""
        return self.prompts.tokenize(prompt, separator=separator, max_categories=max_categories)

    def load_image(self, source: ImageInput):
        return self.images.load_image(source)

    def preprocess(self, images: ImageInput | Sequence[ImageInput], *, resize: bool = True,
                   min_sizes: Sequence[int | None] | None = None) -> ImageBatch:
        """See `ImageProcessor.preprocess`."""
        return self.images.preprocess(images, resize=resize, min_sizes=min_sizes)

    rescale_boxes = staticmethod(rescale_boxes)
