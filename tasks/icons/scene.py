"""Scene composition: icons pasted on a background with scale, rotation, colour jitter and occlusion.

Every scene is a pure function of its `Rng` (itself derived from (stream, seed, index)) and the sprites,
so the same seed gives the same pixels wherever Pillow/FreeType are the same versions
(`glyphs.renderer_fingerprint()`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from tasks.icons.glyphs import SpriteBank
from tasks.icons.rng import Rng
from tasks.icons.split import CategorySplit, Icon, load_category_split

BACKGROUNDS = ("flat", "gradient", "noise", "clutter")

# Background colour families (RGB ranges); "any" draws freely.
PALETTES: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "any": ((0, 255), (0, 255), (0, 255)),
    "water": ((0, 70), (60, 170), (110, 230)),
    "ground": ((50, 150), (70, 160), (40, 110)),
    "road": ((70, 170), (70, 170), (70, 170)),
}
_ALPHA_THRESHOLD = 64  # alpha above which a pixel counts for the tight box
_ALPHA_LUT = [0] * (_ALPHA_THRESHOLD + 1) + [255] * (255 - _ALPHA_THRESHOLD)


@dataclass(frozen=True, kw_only=True)
class SceneStyle:
    """How a family of scenes looks. Sizes are fractions of the shorter image side."""

    width: int = 256
    height: int = 256
    min_scale: float = 0.07  # smallest icon: longer side in px = min_scale * min(width, height)
    max_scale: float = 0.45
    rotation_prob: float = 0.5
    max_rotation: float = 30.0  # degrees
    jitter: float = 0.25  # colour jitter strength (brightness, contrast, saturation)
    max_occlusion: float = 0.35  # an icon may cover at most this fraction of an earlier labelled box
    backgrounds: tuple[str, ...] = BACKGROUNDS
    palette: str = "any"
    thermal: bool = False  # grayscale + inverted, like a thermal camera
    placement_tries: int = 12

    def __post_init__(self):
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if unknown:
            raise ValueError(f"unknown background kinds {sorted(unknown)}; choose from {BACKGROUNDS}")
        if self.palette not in PALETTES:
            raise ValueError(f"unknown palette {self.palette!r}; choose from {sorted(PALETTES)}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")


@dataclass
class Scene:
    """A composed image. `boxes[i]` (xyxy, pixels) is where `icons[i]` landed; distractors are unlabelled."""

    image: Image.Image
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    icons: list[Icon] = field(default_factory=list)
    distractor_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


class IconWorld:
    """The OpenMoji icon world: the category split plus a renderer of scenes.

    Args:
        sprites: where sprites come from (default: a fresh in-memory `SpriteBank`).
        split: the category split (default: the stored `tasks/data/icon_split.json`).
    """

    def __init__(self, sprites: SpriteBank | None = None, split: CategorySplit | None = None):
        self.sprites = sprites if sprites is not None else SpriteBank()
        self.split = split if split is not None else load_category_split()

    @property
    def pretrain_icons(self) -> tuple[Icon, ...]:
        return self.split.pretrain

    def warm(self) -> None:
        """Render every sprite of the world now (call before forking DataLoader workers)."""
        self.sprites.warm([i.codepoint for i in self.split.pretrain] + [i.codepoint for i in self.split.all_heldout()])

    def compose(self, rng: Rng, objects: Sequence[Icon], distractors: Sequence[Icon] = (),
                style: SceneStyle = SceneStyle()) -> Scene:
        """Draw `objects` (labelled) and `distractors` (unlabelled) in random order on a background.

        An object that finds no place within `style.placement_tries` (too much occlusion) is left out of
        the scene and of its annotations, so annotations always describe the pixels.
        """
        canvas = make_background(rng, style)
        order = [(icon, True) for icon in objects] + [(icon, False) for icon in distractors]
        order = rng.shuffle(order)
        scene = Scene(image=canvas)
        side = min(style.width, style.height)
        for icon, labelled in order:
            sprite = self._transformed_sprite(rng, icon, side, style)
            box = self._place(rng, sprite, scene.boxes, style)
            if box is None:
                continue
            canvas.paste(sprite, (int(box[0]), int(box[1])), sprite)
            (scene.boxes if labelled else scene.distractor_boxes).append(box)
            if labelled:
                scene.icons.append(icon)
        if style.thermal:
            scene.image = ImageOps.invert(canvas.convert("L")).convert("RGB")
        return scene

    def _transformed_sprite(self, rng: Rng, icon: Icon, side: int, style: SceneStyle) -> Image.Image:
        sprite = self.sprites.get(icon.codepoint)
        target = rng.log_uniform(style.min_scale * side, style.max_scale * side)
        factor = target / max(sprite.size)
        size = (max(2, round(sprite.width * factor)), max(2, round(sprite.height * factor)))
        sprite = sprite.resize(size, Image.Resampling.BILINEAR)
        if style.jitter > 0:
            sprite = _jitter(sprite, rng, style.jitter)
        if style.rotation_prob > 0 and rng.chance(style.rotation_prob):
            angle = rng.uniform(-style.max_rotation, style.max_rotation)
            sprite = sprite.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        tight = sprite.getchannel("A").point(_ALPHA_LUT).getbbox()
        return sprite.crop(tight) if tight else sprite

    @staticmethod
    def _place(rng: Rng, sprite: Image.Image, labelled_boxes: list, style: SceneStyle):
        w, h = sprite.size
        if w > style.width or h > style.height:
            return None
        for _ in range(style.placement_tries):
            x = rng.integer(0, style.width - w)
            y = rng.integer(0, style.height - h)
            box = (float(x), float(y), float(x + w), float(y + h))
            if all(_covered_fraction(old, box) <= style.max_occlusion for old in labelled_boxes):
                return box
        return None


def _covered_fraction(old, new) -> float:
    """Fraction of box `old` covered by box `new` (both xyxy)."""
    iw = min(old[2], new[2]) - max(old[0], new[0])
    ih = min(old[3], new[3]) - max(old[1], new[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((old[2] - old[0]) * (old[3] - old[1]))


def _jitter(sprite: Image.Image, rng: Rng, strength: float) -> Image.Image:
    arr = np.asarray(sprite)
    rgb = arr[..., :3].astype(np.float32)
    brightness = rng.uniform(1 - strength, 1 + strength)
    contrast = rng.uniform(1 - strength, 1 + strength)
    saturation = rng.uniform(1 - strength, 1 + strength)
    gray = rgb.mean(axis=2, keepdims=True)
    rgb = gray + (rgb - gray) * saturation  # saturation about each pixel's gray
    rgb = (rgb - 128.0) * contrast + 128.0 * brightness
    out = np.empty_like(arr)
    out[..., :3] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    out[..., 3] = arr[..., 3]
    return Image.fromarray(out)


def _colour(rng: Rng, palette: str) -> tuple[int, int, int]:
    ranges = PALETTES[palette]
    return tuple(rng.integer(lo, hi) for lo, hi in ranges)  # type: ignore[return-value]


def make_background(rng: Rng, style: SceneStyle) -> Image.Image:
    """An RGB background of one of `style.backgrounds`. Cheap: drawn small, then upsampled."""
    kind = rng.choice(style.backgrounds)
    size = (style.width, style.height)
    base = _colour(rng, style.palette)
    if kind == "flat":
        return Image.new("RGB", size, base)
    if kind == "gradient":
        other = _colour(rng, style.palette)
        small = Image.linear_gradient("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
        small = small.crop((64, 64, 192, 192)).resize((32, 32), Image.Resampling.BILINEAR)
        return Image.composite(Image.new("RGB", (32, 32), other), Image.new("RGB", (32, 32), base),
                               small).resize(size, Image.Resampling.BILINEAR)
    if kind == "noise":
        cells = rng.choice((8, 16, 32, 64))
        amp = rng.uniform(10, 60)
        values = np.array([rng.random() for _ in range(cells * cells * 3)], dtype=np.float32).reshape(cells, cells, 3)
        arr = np.clip(np.array(base, dtype=np.float32) + (values - 0.5) * 2 * amp, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR)
    # clutter: random shapes drawn at 1/4 resolution; the upsampling blurs them
    small = Image.new("RGB", (max(8, style.width // 4), max(8, style.height // 4)), base)
    draw = ImageDraw.Draw(small)
    sw, sh = small.size
    for _ in range(rng.integer(4, 14)):
        x0, y0 = rng.integer(-8, sw), rng.integer(-8, sh)
        x1, y1 = x0 + rng.integer(3, sw // 2), y0 + rng.integer(3, sh // 2)
        colour = _colour(rng, style.palette)
        shape = rng.integer(0, 2)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.integer(1, 3))
    return small.resize(size, Image.Resampling.BILINEAR)
