"""Export one task to ONNX: the base with its adapter folded in, images in, scored boxes out.

The graph is the adapted GLIP on a fixed prompt: P0 (the adapter's, prompt tuning included) is a constant,
so the language backbone is not in the graph; linear-probe and LoRA weights are folded into the base
(`adapt.adapter.apply_adapter`), a fine-tune's full weight set replaces it. GLIP-T's modulated deformable
conv exports through its im2col path (`grid_sample` + matmul; ONNX GridSample, opset >= 16).

Graph (B images, N anchors over all levels, C categories):
    pixel_values (B, 3, H, W) float32, normalised and zero-padded (GLIPProcessor.preprocess), H, W % 32 == 0
    -> boxes (B, N, 4) decoded xyxy in input pixels (not yet clipped: clipping needs each image's size)
       scores (B, N, C) phrase probabilities (mean sigmoid over each category's tokens)
       centerness (B, N) sigmoid of the centerness logits
       levels (N,) int64 pyramid level of each anchor
Thresholding, the per-level top-n, clipping, class-aware NMS ("+1" IoU), the max-detections cut and the
rescale to original pixels run after the graph, in numpy (`adapt.onnx_runtime`). The task (categories,
pre/post-processing settings, base fingerprint) travels in the model's metadata under "glip_adapt".
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from glip_io import atomic_write, check_writable
from adapt import STRATEGIES, __version__
from adapt.onnx_runtime import METADATA_KEY, OUTPUT_NAMES
from adapt.adapter import Adapter, apply_adapter, base_fingerprint, load_adapter, read_adapter_header, read_merged
from backbone.anchors import BoxCoder, grid_anchors
from backbone.device import DTYPES
from backbone.dyhead import use_deform_impl
from backbone.model import GLIP
from backbone.outputs import PromptFeatures, VisualFeatures
from backbone.postprocess import phrase_probabilities

EXPORT_DTYPES = ("float32", "float16")  # the names of backbone.device.DTYPES that export offers
MIN_OPSET = 16  # GridSample (the deformable conv's sampling) entered the standard opset in 16
MAX_OPSET = 20  # the highest opset torch.onnx's TorchScript exporter writes
DEFAULT_OPSET = 17


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to change."""


class TaskGraph(nn.Module):
    """The exported function: a GLIP with one task folded in, from padded pixels to pre-NMS scored boxes."""

    def __init__(self, model: GLIP, adapter: Adapter, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model.eval().to(dtype)
        prompt = adapter.prompt
        self.register_buffer("hidden", prompt.hidden.to(dtype), persistent=False)
        self.register_buffer("embedded", prompt.embedded.to(dtype), persistent=False)
        self.register_buffer("mask", prompt.mask.long(), persistent=False)
        self.register_buffer("positive_map", adapter.positive_map.bool(), persistent=False)
        self.box_coder = BoxCoder(model.config.head.box_coder_weights)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        pixels = pixel_values.to(self.hidden.dtype)  # float32 in and out; the weights may be float16
        visual = VisualFeatures(levels=model.fpn(model.swin(pixels)),
                                image_sizes=[tuple(pixels.shape[-2:])] * pixels.shape[0])
        outputs = model.fuse_and_predict(visual, PromptFeatures(self.hidden, self.embedded, self.mask))
        # Anchors from the traced level shapes (not the model's per-shape cache), so graphs of free size stay free.
        shapes = [tuple(level.shape[-2:]) for level in outputs.fused_visual]
        anchors = grid_anchors(shapes, model.strides, model.anchor_base_size, pixel_values.device)
        # Decoding (exp) and the sigmoids run in float32 whatever the weights' width.
        boxes = self.box_coder.decode(outputs.box_deltas.float(), anchors[None])
        scores = phrase_probabilities(outputs.alignment_logits.float(), self.positive_map)
        levels = torch.cat([torch.zeros_like(level[0, 0].flatten(), dtype=torch.int64) + index
                            for index, level in enumerate(outputs.fused_visual)])
        return boxes, scores, outputs.centerness.float().sigmoid(), levels


@dataclass
class ExportResult:
    path: Path
    bytes: int
    strategy: str
    task: str
    input_shape: tuple  # (B, 3, H, W), with "batch"/"height"/"width" for free axes
    opset: int
    dtype: str
    seconds: float


def zero_shot_adapter(model: GLIP, prompt, base_model: str, task: str = "zero-shot") -> Adapter:
    """A prompt adapter holding the base's own P0 for `prompt` (category names, or a (caption, spans) pair as
    GLIPProcessor.tokenize takes them; nothing trained): exports the zero-shot task, and stands in for a tuned
    prompt adapter of the same shape in tests and benchmarks."""
    from backbone.processor import GLIPProcessor

    [prompt] = GLIPProcessor.from_config(model.config).tokenize(prompt)
    training = model.training
    with torch.no_grad():
        p0 = model.eval().encode_prompt(prompt.input_ids, prompt.attention_mask)  # no BERT dropout
    model.train(training)
    return Adapter(strategy="prompt-tune", task=task,
                   categories=[{"name": n, "prefix": "", "suffix": ""} for n in prompt.categories],
                   prompt=p0, positive_map=prompt.positive_map, input_ids=prompt.input_ids, caption=prompt.caption,
                   base_model=base_model, base_fingerprint=base_fingerprint(model))


def load_task(adapter_path: str | Path, base: str | None = None) -> tuple[GLIP, Adapter]:
    """The base model with the adapter folded in (or a merged single-task model), refusing what cannot export.
    `adapter_path` may be an `hf://` reference."""
    from adapt.hub import open_adapter

    label, adapter_path = str(adapter_path), open_adapter(adapter_path)
    merged = read_merged(adapter_path)
    if merged is not None:
        return GLIP.from_pretrained(str(adapter_path)), merged
    meta = read_adapter_header(adapter_path, label)
    strategy = meta.get("strategy", "")
    spec = STRATEGIES.get(strategy)
    if spec is None or spec.export is None:  # StrategySpec.export: how a strategy exports, None when it does not
        exportable = [name for name, s in STRATEGIES.items() if s.export is not None]
        raise ExportError(f"{label} is a {strategy!r} adapter; export supports {', '.join(exportable)} "
                          "adapters: re-train the task with one of those strategies")
    model = GLIP.from_pretrained(base or meta["base_model"])
    adapter = load_adapter(adapter_path, base=model, source=label)  # another base: names the one to use
    apply_adapter(model, adapter)
    return model.eval(), adapter


def check_options(out: str | Path, dtype: str, opset: int) -> Path:
    """Refuse a bad dtype, opset or output path before the (slow) load and trace."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported for export; use float32 or float16")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is not supported: the deformable conv needs GridSample (opset "
                          f">= {MIN_OPSET}) and the exporter writes up to {MAX_OPSET}; use --opset {DEFAULT_OPSET}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as {out / 'task.onnx'}")
    try:
        check_writable(out.parent)
    except OSError as error:
        raise ExportError(f"cannot write --out {out} ({error.strerror or error}); choose a writable path") from None
    return out


def trace_size(model: GLIP) -> tuple[int, int]:
    """The example input the graph is traced with: the largest landscape canvas of the model's resize rule, padded.
    (A graph of free size takes any other size as well.)"""
    image = model.config.image
    divisor = max(image.size_divisibility, 1)
    return tuple(-(-side // divisor) * divisor for side in (image.min_size, image.max_size))


def export_task(adapter_path: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "float32",
                opset: int = DEFAULT_OPSET, fixed_size: tuple[int, int] | None = None) -> ExportResult:
    """Write `out`: the task of `adapter_path` as one ONNX graph (see the module docstring), checked by onnx.checker.

    By default batch, height and width are free, so the graph gives the detections of `AdapterDetector` on any
    image. `fixed_size=(H, W)` (multiples of 32) fixes the input instead: the runtime zero-pads each smaller image
    onto that canvas, and since the padding takes part in the image-text attention the scores change.
    """
    import onnx

    started = time.perf_counter()
    out = check_options(out, dtype, opset)
    size = fixed_size
    if size is not None and (size[0] % 32 or size[1] % 32 or min(size) <= 0):
        raise ExportError(f"--size {size[0]}x{size[1]}: the graph input is padded to multiples of 32; use e.g. "
                          f"{max(-(-size[0] // 32), 1) * 32}x{max(-(-size[1] // 32), 1) * 32}")
    dynamic = size is None
    model, adapter = load_task(adapter_path, base)
    height, width = size or trace_size(model)
    use_deform_impl(model, "im2col")  # torchvision's deform_conv2d has no ONNX op; im2col exports as GridSample
    graph = TaskGraph(model, adapter, DTYPES[dtype]).eval()
    example = torch.zeros(1, 3, height, width)
    axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "boxes": {0: "batch", 1: "anchors"},
            "scores": {0: "batch", 1: "anchors"}, "centerness": {0: "batch", 1: "anchors"},
            "levels": {0: "anchors"}} if dynamic else None
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the fixed prompt's host syncs become constants
        torch.onnx.export(graph, (example,), buffer, input_names=["pixel_values"], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    del buffer
    info = task_metadata(model, adapter, dtype=dtype, opset=opset, fixed_size=size)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(info)})
    onnx.checker.check_model(proto)
    atomic_write(out, proto.SerializeToString())
    shape = (("batch", 3, "height", "width") if dynamic else (1, 3, height, width))
    return ExportResult(path=out, bytes=out.stat().st_size, strategy=adapter.strategy, task=adapter.task,
                        input_shape=shape, opset=opset, dtype=dtype, seconds=time.perf_counter() - started)


def task_metadata(model: GLIP, adapter: Adapter, *, dtype: str, opset: int,
                  fixed_size: tuple[int, int] | None) -> dict:
    """Everything the runtime needs beside the graph: categories, pre/post-processing, provenance."""
    config = model.config
    return {
        "format_version": 1, "task": adapter.task, "strategy": adapter.strategy, "categories": adapter.category_names,
        "category_ids": adapter.category_ids,
        "base_model": adapter.base_model, "base_fingerprint": adapter.base_fingerprint,
        "image": dataclasses.asdict(config.image), "postprocess": dataclasses.asdict(config.postprocess),
        "input": {"dynamic": fixed_size is None, "height": fixed_size[0] if fixed_size else None,
                  "width": fixed_size[1] if fixed_size else None}, "dtype": dtype, "opset": opset,
        "outputs": list(OUTPUT_NAMES), "toolkit_version": __version__,
    }


__all__ = ["ExportError", "ExportResult", "TaskGraph", "export_task", "load_task", "zero_shot_adapter"]
