"""Draw boxes, category names and scores on images; contact sheets of samples (PNG)."""
from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def label_colour(index: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per label (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes_xyxy, labels: Sequence[int], names: Sequence[str],
               scores: Sequence[float] | None = None, *, width: int | None = None, dashed: bool = False
               ) -> Image.Image:
    """A copy of `image` with each box outlined in its label's colour and tagged "name" or "name 0.87".

    Args:
        boxes_xyxy: (K, 4) pixels (list, numpy array or tensor).
        labels: 0-based indices into `names`.
        scores: optional per-box scores (predictions); None for ground truth.
        dashed: dashed outlines (used for ground truth when overlaid with predictions).
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    width = width or max(1, round(side / 200))
    font = _font(max(9, round(side / 28)))
    boxes = boxes_xyxy.tolist() if hasattr(boxes_xyxy, "tolist") else list(boxes_xyxy)
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    if scores is not None:
        scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
    for k, (box, label) in enumerate(zip(boxes, labels)):
        colour = label_colour(int(label))
        x0, y0, x1, y1 = (float(v) for v in box)
        if dashed:
            _dashed_rectangle(draw, (x0, y0, x1, y1), colour, width)
        else:
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = names[int(label)] if 0 <= int(label) < len(names) else f"#{label}"
        if scores is not None:
            text += f" {scores[k]:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        ty = y0 - (b - t) - 2 if y0 - (b - t) - 2 >= 0 else y0
        draw.rectangle((x0, ty, x0 + (r - l) + 4, ty + (b - t) + 2), fill=colour)
        draw.text((x0 + 2 - l, ty + 1 - t), text, fill=(0, 0, 0) if sum(colour) > 380 else (255, 255, 255), font=font)
    return out


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box, colour, width: int, dash: int = 6) -> None:
    x0, y0, x1, y1 = box
    for (ax, ay, bx, by) in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
        length = math.hypot(bx - ax, by - ay)
        steps = max(1, int(length // dash))
        for s in range(0, steps, 2):
            t0, t1 = s / steps, min(1.0, (s + 1) / steps)
            draw.line((ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                      fill=colour, width=width)


def draw_ground_truth(image: Image.Image, target: dict, names: Sequence[str], *, dashed: bool = False) -> Image.Image:
    """Ground truth of a `CocoDetection` target (boxes xyxy + 0-based labels)."""
    return draw_boxes(image, target["boxes"], target["labels"], names, dashed=dashed)


def draw_predictions(image: Image.Image, boxes_xyxy, scores, labels, names: Sequence[str], *,
                     score_threshold: float = 0.3, target: dict | None = None) -> Image.Image:
    """Predictions above `score_threshold` with their scores; with `target`, ground truth dashed underneath."""
    keep = [k for k, s in enumerate(scores.tolist() if hasattr(scores, "tolist") else scores) if s >= score_threshold]
    boxes = boxes_xyxy.tolist() if hasattr(boxes_xyxy, "tolist") else list(boxes_xyxy)
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
    base = draw_ground_truth(image, target, names, dashed=True) if target is not None else image
    return draw_boxes(base, [boxes[k] for k in keep], [labels[k] for k in keep], names, [scores[k] for k in keep])


def contact_sheet(images: Sequence[Image.Image], *, columns: int | None = None, cell: int = 256,
                  titles: Sequence[str] | None = None, background=(255, 255, 255)) -> Image.Image:
    """Images fitted into `cell`x`cell` tiles on a grid (optionally titled)."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    title_h = 16 if titles else 0
    gap = 4
    sheet = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell + title_h + gap) + gap), background)
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        thumb = img.convert("RGB")
        thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        x = gap + c * (cell + gap) + (cell - thumb.width) // 2
        y = gap + r * (cell + title_h + gap) + title_h + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
        if titles:
            draw.text((gap + c * (cell + gap), gap + r * (cell + title_h + gap)), str(titles[k])[:40],
                      fill=(0, 0, 0), font=font)
    return sheet


def render_samples(dataset, n: int, out_path: str | Path, *, columns: int | None = None, cell: int = 256,
                   predictions: dict | None = None, score_threshold: float = 0.3, colors: int | None = None) -> Path:
    """Contact sheet of the first `n` samples of a `CocoDetection` with ground truth (and predictions) drawn.

    Args:
        predictions: optional image_id -> (boxes_xyxy, scores, labels) drawn over dashed ground truth.
        colors: quantize the sheet to this many colours (smaller PNGs, e.g. for docs).
    """
    names = dataset.category_names
    tiles, titles = [], []
    for i in range(min(n, len(dataset))):
        image, target = dataset[i]
        if predictions is not None and target["image_id"] in predictions:
            boxes, scores, labels = predictions[target["image_id"]]
            tiles.append(draw_predictions(image, boxes, scores, labels, names, score_threshold=score_threshold,
                                          target=target))
        else:
            tiles.append(draw_ground_truth(image, target, names))
        titles.append(dataset.image_info(target["image_id"])["file_name"])
    if not tiles:
        raise ValueError("the dataset is empty: nothing to render")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet = contact_sheet(tiles, columns=columns, cell=cell, titles=titles)
    if colors is not None:
        sheet = sheet.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    sheet.save(out_path, optimize=True)
    return out_path
