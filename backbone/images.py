"""GLIP's image side: decoding any image input, resizing, normalising and padding a batch, and mapping boxes back.

Follows the official microsoft/GLIP code (commit 9dda955): `data/transforms` (`Resize.get_size`, `ToTensor`,
`to_bgr255`, `Normalize`), `structures/image_list.to_image_list` (zero padding after normalisation) and
`structures/bounding_box.BoxList.resize` (boxes back to original pixels).
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from backbone.config import ImageConfig

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray]


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


class ImageProcessor:
    """Images -> one normalised, zero-padded batch (the official test-time path).

    Args:
        image: resize and normalisation settings.
        max_pixels: default decompression-bomb guard for `load_image` / `preprocess`; None = PIL's own limit.
    """

    def __init__(self, image: ImageConfig, max_pixels: int | None = None):
        self.image = image
        self.max_pixels = max_pixels
        self._mean = torch.tensor(image.pixel_mean_bgr, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(image.pixel_std_bgr, dtype=torch.float32).view(3, 1, 1)

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
