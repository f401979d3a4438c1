"""Run a task exported by `adapt export` with onnxruntime; the post-processing is numpy, torch is not needed.

`OnnxTask` (numpy in, numpy out; imports neither torch nor the GLIP core) runs the graph and applies
backbone/postprocess.py's rules exactly: per level, phrase probability > threshold, at most `pre_nms_top_n`
candidates by probability x centerness, boxes clipped to the unpadded image (x <= W-1), score
sqrt(p * c); over all levels class-aware NMS with the legacy "+1" IoU (suppress IoU > threshold, the
class offsets of torchvision's `batched_nms`), the `max_detections` cut, then the rescale to original
pixels (`BoxList.resize`). `OnnxDetector` adds image loading and preprocessing (GLIPProcessor) and returns
the same `Detections` as GLIPDetector / AdapterDetector.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METADATA_KEY = "glip_adapt"
OUTPUT_NAMES = ("boxes", "scores", "centerness", "levels")
_CPU, _CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class OnnxTaskError(ValueError):
    """An ONNX file or input this runtime cannot use; the message says what to do."""


@dataclass
class Result:
    """Detections of one image as numpy arrays: boxes (K, 4) xyxy in original pixels, scores (K,), labels (K,)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def default_providers() -> list[str]:
    """onnxruntime's CUDA provider when this install has it, else (and as fallback) the CPU provider."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [_CUDA, _CPU] if _CUDA in available else [_CPU]


class OnnxTask:
    """One exported task: `run(pixel_values, image_sizes, original_sizes)` -> one `Result` per image."""

    def __init__(self, path: str | Path, *, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise OnnxTaskError(f"ONNX file {path} does not exist; write one with `adapt export --adapter FILE --out {path}`")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: float16 graphs log a warning per node folded on the CPU
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers())
        except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
            reason = " ".join(str(error).split())  # one line: onnxruntime's messages span several
            raise OnnxTaskError(f"onnxruntime cannot load {path} ({reason}); re-export it with `adapt export`") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise OnnxTaskError(f"{path} is an ONNX model but not a task exported by `adapt export` (no "
                                f"{METADATA_KEY!r} metadata); export the task with `adapt export`")
        self.info = json.loads(raw)
        self.path = path

    @property
    def categories(self) -> list[str]:
        return list(self.info["categories"])

    @property
    def category_ids(self) -> list[int]:
        """The categories' ids in the task's annotation files (position + 1 for graphs exported without them)."""
        return list(self.info.get("category_ids") or range(1, len(self.categories) + 1))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, pixel_values: np.ndarray, image_sizes: list[tuple[int, int]],
            original_sizes: list[tuple[int, int]] | None = None, threshold: float = 0.0) -> list[Result]:
        """Detect in a (B, 3, H, W) float32 batch of normalised, zero-padded images (GLIPProcessor's layout).

        `image_sizes` are the unpadded (h, w) network-input sizes, `original_sizes` the sizes to rescale to
        (default: no rescale). Scores > threshold are kept.
        """
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        original_sizes = original_sizes or image_sizes
        step = len(pixel_values) if self.info["input"]["dynamic"] else 1  # a static graph takes one image
        results = []
        for start in range(0, len(pixel_values), step):
            chunk = self._fit(pixel_values[start: start + step])
            boxes, scores, centerness, levels = self.session.run(list(OUTPUT_NAMES), {"pixel_values": chunk})
            for i in range(len(chunk)):
                index = start + i
                final = postprocess(boxes[i], scores[i], centerness[i], levels, image_sizes[index],
                                    self.info["postprocess"])
                keep = final.scores > threshold
                results.append(Result(rescale_boxes(final.boxes[keep], image_sizes[index], original_sizes[index]),
                                      final.scores[keep], final.labels[keep]))
        return results

    def _fit(self, batch: np.ndarray) -> np.ndarray:
        """A static graph takes one fixed size: pad the batch up to it, or say how to export for this size."""
        spec = self.info["input"]
        if spec["dynamic"]:
            return batch
        height, width = spec["height"], spec["width"]
        if batch.shape[-2] > height or batch.shape[-1] > width:
            raise OnnxTaskError(f"an image of {batch.shape[-2]}x{batch.shape[-1]} (padded) does not fit {self.path}'s "
                                f"fixed {height}x{width} input; re-export without --size (any image size) or "
                                "with a larger --size")
        if batch.shape[-2:] == (height, width):
            return batch
        padded = np.zeros((len(batch), 3, height, width), dtype=np.float32)
        padded[..., : batch.shape[-2], : batch.shape[-1]] = batch
        return padded


# ------------------------------------------------------------------------------------ post-processing (numpy)


def level_candidates(boxes: np.ndarray, probs: np.ndarray, centerness: np.ndarray, image_size: tuple[int, int],
                     score_threshold: float, pre_nms_top_n: int) -> Result:
    """One level's candidates (Postprocessor.level_candidates): probs (n, C), boxes (n, 4), centerness (n,)."""
    height, width = image_size
    candidate = probs > score_threshold
    locations, labels = np.nonzero(candidate)  # row-major (location, label), as torch.nonzero
    combined = probs[locations, labels] * centerness[locations]
    if len(combined) > pre_nms_top_n:
        top = np.argpartition(-combined, pre_nms_top_n - 1)[:pre_nms_top_n]
        top.sort()
        locations, labels, combined = locations[top], labels[top], combined[top]
    chosen = boxes[locations]
    limits = np.array([width - 1, height - 1, width - 1, height - 1], dtype=chosen.dtype)
    chosen = np.clip(chosen, np.zeros(4, dtype=chosen.dtype), limits)
    return Result(chosen, np.sqrt(combined), labels.astype(np.int64))


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS (torchvision.ops.nms on CPU): indices kept, by score descending; suppress IoU > threshold."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[position + 1:]
        width = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        height = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = width * height
        suppressed[rest[inter / (areas[i] + areas[rest] - inter) > threshold]] = True
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Class-aware NMS as torchvision.ops.batched_nms computes it on CPU (coordinate offsets up to 1000 boxes)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if boxes.size > 4000:
        keep = np.concatenate([np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], threshold)]
                               for c in np.unique(labels)])
        return keep[np.argsort(-scores[keep], kind="stable")]
    offsets = labels.astype(boxes.dtype) * (boxes.max() + boxes.dtype.type(1))
    return nms(boxes + offsets[:, None], scores, threshold)


def select(candidates: Result, nms_threshold: float, max_detections: int) -> Result:
    """Postprocessor.select: legacy "+1" class-aware NMS, the max_detections cut, scores descending."""
    legacy = candidates.boxes + np.array([0, 0, 1, 1], dtype=candidates.boxes.dtype)
    keep = np.sort(batched_nms(legacy, candidates.scores, candidates.labels, nms_threshold))
    scores = candidates.scores[keep]
    if 0 < max_detections < len(keep):
        cut = np.partition(scores, len(keep) - max_detections)[len(keep) - max_detections]
        keep = keep[scores >= cut]
    keep = keep[np.argsort(-candidates.scores[keep], kind="stable")]
    return Result(candidates.boxes[keep], candidates.scores[keep], candidates.labels[keep])


def postprocess(boxes: np.ndarray, scores: np.ndarray, centerness: np.ndarray, levels: np.ndarray,
                image_size: tuple[int, int], config: dict) -> Result:
    """One image's graph outputs -> final detections in network-input pixels (before any score threshold)."""
    bounds = np.searchsorted(levels, np.arange(levels.max() + 2)) if len(levels) else [0]
    parts = [level_candidates(boxes[a:b], scores[a:b], centerness[a:b], image_size, config["score_threshold"],
                              config["pre_nms_top_n"]) for a, b in zip(bounds[:-1], bounds[1:])]
    merged = Result(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("boxes", "scores", "labels")))
    return select(merged, config["nms_threshold"], config["max_detections"])


def rescale_boxes(boxes: np.ndarray, image_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """backbone.processor.rescale_boxes in numpy: ratios in double, applied in the boxes' float32."""
    (in_h, in_w), (orig_h, orig_w) = image_size, original_size
    rx, ry = float(orig_w) / float(in_w), float(orig_h) / float(in_h)
    return boxes * np.array([rx, ry, rx, ry], dtype=boxes.dtype)


# ------------------------------------------------------------------------------------------- the detector


class OnnxDetector:
    """`detect(images, threshold)` on an exported task, with the same images in and Detections out as
    AdapterDetector (GLIPProcessor for loading, resizing and padding; onnxruntime and numpy after that)."""

    def __init__(self, path: str | Path, *, providers: list[str] | None = None, threads: int | None = None):
        from backbone.config import ImageConfig
        from backbone.images import ImageProcessor

        self.task = OnnxTask(path, providers=providers, threads=threads)
        image = dict(self.task.info["image"])
        image = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in image.items()})
        self.processor = ImageProcessor(image)  # images only: the prompt is inside the graph

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "OnnxDetector":
        return cls(path, **kwargs)

    @property
    def categories(self) -> list[str]:
        return self.task.categories

    @property
    def category_ids(self) -> list[int]:
        return self.task.category_ids

    def detect(self, images, threshold: float = 0.0) -> list:
        import torch

        from backbone.outputs import Detections

        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = self.processor.preprocess(list(images))
        results = self.task.run(batch.pixel_values.numpy(), batch.image_sizes, batch.original_sizes, threshold)
        return [Detections(torch.from_numpy(r.boxes), torch.from_numpy(r.scores), torch.from_numpy(r.labels),
                           self.categories) for r in results]

    def detect_fn(self):
        """For adapt.evaluation.evaluate(detect_fn=...), like AdapterDetector.detect_fn."""
        return lambda images, label_lists: self.detect(images, threshold=0.0)
