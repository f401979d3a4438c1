"""The multi-tenant engine: one frozen GLIP, an adapter pool, and a cross-tenant micro-batcher (no HTTP).

Data flow per batch: requests that arrive within `batch_window_ms` (at most `max_batch`)
are grouped by padded image size; each group's images go through Swin + FPN ONCE (O0 does not depend
on the task). Prompt-tuning adapters carry their final P0, so their requests, whatever their tasks,
share one fusion + head pass with per-sample prompts padded to the longest and masked; the language
backbone never runs (the engine drops it). Linear probes, which replace head tensors, and LoRA adapters,
whose rank-r factors are folded into their targets' weights for the pass (adapt.serve.lora), run per
adapter through `torch.func.functional_call` with those override tensors, so the shared base is never
modified and LoRA applies on every path of the core exactly as in training. Full fine-tunes are refused. The lorax
idea of "segments per adapter", on GLIP's seams.

Fault isolation: a group that fails is retried per adapter, so only the adapter that fails on its own
fails (AdapterFailed, naming it); a version that fails twice is quarantined by the pool until replaced.
Device and precision come from the config: inputs move to the model's device, every new tensor is
made on the device of the data it meets, and bfloat16/float16 run as autocast around the forward.

Batched results equal single-request results because a request's pixels, padding and prompt tensors
are the same in both paths: images are padded to a multiple of 32 (or to one fixed canvas) per request
and only batched with images of the same padded size; prompt padding is masked out of every attention.

Usage from Python (benchmarks do this):
    engine = MultiTenantEngine.from_pretrained("glip-nano", "adapters/")
    with engine:
        result = engine.detect("icons-aquarium", open("x.png", "rb").read(), threshold=0.4)
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
import warnings
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from adapt.serve.admission import FairQueue, QueueFull, TenantOverShare
from adapt.serve.metrics import Metrics, server_metrics
from adapt.serve.lora import folded_weights
from adapt.serve.pool import AdapterPool, LoadedAdapter
from backbone.device import autocast, resolve_device, resolve_dtype
from backbone.model import GLIP
from backbone.outputs import HeadOutputs, PromptFeatures, VisualFeatures
from backbone.postprocess import Candidates, Postprocessor
from backbone.processor import GLIPProcessor, load_image, rescale_boxes
from glip_io.coco import detections_to_results

log = logging.getLogger("adapt.serve")

# Adapters whose overrides touch these change O0, so their images cannot share the batch's visual features.
_VISUAL_PREFIXES = ("swin.", "fpn.")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_batch: int = field(default=8, metadata={"help": "most requests in one model batch (1 = batching off)"})
    batch_window_ms: float = field(default=5.0, metadata={"help": "how long the first request waits for company"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting in all tenants' queues together; when "
                                                          "full, the tenant holding the most is refused first"})
    tenant_queue: int = field(default=16, metadata={"help": "requests one tenant may have waiting; beyond it that "
                                                             "tenant gets HTTP 429 + Retry-After"})
    deadline_s: float = field(default=30.0, metadata={"help": "a request not answered by then is dropped (504)"})
    cache_bytes: int = field(default=256 * 2**20, metadata={"help": "byte bound of the loaded-adapter LRU"})
    max_upload_bytes: int = field(default=64 * 2**20, metadata={
        "help": "largest adapter file in bytes, uploaded or in the adapters folder (a larger file is never read)"})
    max_lora_rank: int = field(default=64, metadata={"help": "largest LoRA rank an adapter may have to be served "
                                                              "(bounds one tenant's compute and memory per request)"})
    max_prompt_tokens: int = field(default=256, metadata={
        "help": "longest adapter prompt served, in tokens (bounds one tenant's fusion cost; GLIP's own limit is 256)"})
    max_pixels: int = field(default=25_000_000, metadata={"help": "decompression-bomb guard, width x height"})
    fixed_canvas: bool = field(
        default=False, metadata={"help": "pad every image to one square canvas (max_size) so all can batch; "
                                         "default groups images by their padded size instead"})
    keep_text: bool = field(default=False, metadata={"help": "keep the language backbone in memory (unused)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (None: CUDA when available)"})
    dtype: str = field(default="float32", metadata={"help": "compute precision: float32, bfloat16 or float16 "
                                                            "(CUDA only); lower precisions run as autocast"})

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "tenant_queue", "cache_bytes", "max_upload_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)} must be at least 1")
        if self.max_lora_rank < 1 or self.max_prompt_tokens < 1:
            raise ValueError(f"EngineConfig: max_lora_rank={self.max_lora_rank} and max_prompt_tokens="
                             f"{self.max_prompt_tokens} must be at least 1")
        if self.batch_window_ms < 0 or self.deadline_s <= 0:
            raise ValueError(f"EngineConfig: batch_window_ms={self.batch_window_ms} must be >= 0 and "
                             f"deadline_s={self.deadline_s} > 0")


@dataclass(frozen=True)
class DetectParams:
    threshold: float = 0.5
    top_k: int = 100


@dataclass
class PreparedImage:
    """One decoded image as the network sees it: (3, H, W) normalised pixels padded to a multiple of 32."""

    pixel_values: Tensor
    image_size: tuple[int, int]  # (h, w) resized, before padding
    original_size: tuple[int, int]  # (h, w) as uploaded

    @property
    def padded_shape(self) -> tuple[int, int]:
        return tuple(self.pixel_values.shape[-2:])


@dataclass
class DetectResult:
    """What one request gets back; `detections` are COCO-style records in original pixels."""

    task: str
    adapter_version: str
    strategy: str
    width: int
    height: int
    detections: list[dict]

    def to_dict(self) -> dict:
        return {"task": self.task, "adapter_version": self.adapter_version, "strategy": self.strategy,
                "image": {"width": self.width, "height": self.height}, "detections": self.detections}


class InvalidImage(ValueError):
    """Bytes that are not a decodable image (unknown format, truncated, corrupt)."""


class ImageTooLarge(ValueError):
    """An image whose pixel count exceeds the limit (a decompression bomb, or just too big)."""


class DeadlineExceeded(TimeoutError):
    pass


class EngineStopped(RuntimeError):
    pass


class AdapterFailed(RuntimeError):
    """A batch failed for one adapter's requests alone (retried apart from the others); names the adapter."""


class NonFiniteOutput(RuntimeError):
    """An adapter's samples came out with NaN or Inf scores, boxes or centerness: a fault of that adapter."""


@dataclass
class _Request:
    task: str
    image: PreparedImage
    params: DetectParams
    deadline: float  # time.monotonic()
    future: Future
    adapter: LoadedAdapter | None = None
    tenant: str = ""  # whose share of the queue and of compute it counts against


class MultiTenantEngine:
    """Serve many adapters on one frozen GLIP with cross-tenant micro-batching.

    Args:
        base: the frozen GLIP (put in eval mode; its language backbone is dropped unless `keep_text`).
        adapters_dir: the adapter directory (see `AdapterPool`).
        config: batching, queue and limit settings.
        processor: image preprocessing; defaults to the base config's.
        postprocessor: decoding and NMS; defaults to the base config's.
    """

    def __init__(self, base: GLIP, adapters_dir: str | Path, config: EngineConfig = EngineConfig(), *,
                 processor: GLIPProcessor | None = None, postprocessor: Postprocessor | None = None,
                 metrics: Metrics | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.base = base.eval().requires_grad_(False)
        self.pool = AdapterPool(base, adapters_dir, max_bytes=config.cache_bytes, device=self.device,
                                max_upload_bytes=config.max_upload_bytes, max_lora_rank=config.max_lora_rank,
                                max_prompt_tokens=config.max_prompt_tokens)  # fingerprints the full base first
        if not config.keep_text:
            self.base.text = None  # prompt features come from adapters: BERT never runs here
        self.base.to(self.device)
        self._base_weights = dict(self.base.named_parameters())  # what LoRA updates are folded into
        self.processor = processor or GLIPProcessor.from_config(base.config, max_pixels=config.max_pixels)
        self.postprocessor = postprocessor or Postprocessor.from_config(base.config)
        divisor = max(self.processor.image.size_divisibility, 1)
        side = math.ceil(self.processor.image.max_size / divisor) * divisor
        self.canvas = (side, side) if config.fixed_canvas else None
        self.metrics = metrics or server_metrics()
        self._register_gauges()
        self._queue: FairQueue[_Request] = FairQueue(config.max_queue, config.tenant_queue)
        self._inflight = 0
        self._batch_seconds = 0.0  # moving average
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One forward at a time: functional_call swaps parameters on the shared module while it runs.
        self._model_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, name_or_path: str, adapters_dir: str | Path, config: EngineConfig = EngineConfig(),
                        **kwargs) -> "MultiTenantEngine":
        return cls(GLIP.from_pretrained(name_or_path), adapters_dir, config, **kwargs)

    def _register_gauges(self) -> None:
        m, pool = self.metrics, self.pool
        m.gauge("adapt_queue_depth", "requests waiting or running in the batcher", self.queue_depth)
        m.gauge("adapt_adapter_cache_bytes", "tensor bytes of the loaded adapters", lambda: pool.cached_bytes)
        m.gauge("adapt_adapter_cache_entries", "loaded adapters", lambda: pool.stats()["entries"])
        m.gauge("adapt_adapters_registered", "adapter files in the adapter directory", lambda: len(pool.names()))
        for key in ("hits", "misses", "evictions"):
            m.gauge(f"adapt_adapter_cache_{key}_total", f"adapter cache {key}",
                    lambda key=key: getattr(pool, key), kind="counter")

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> "MultiTenantEngine":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="adapt-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in self._queue.drain():
            _resolve(request, EngineStopped("the server is shutting down"))

    def __enter__(self) -> "MultiTenantEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        return len(self._queue) + self._inflight

    # ---------------------------------------------------------------------------------------------- input

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode, resize, normalise and pad one uploaded image.

        Raises:
            ImageTooLarge: more than `max_pixels` pixels (checked from the header, before decoding).
            InvalidImage: not an image, truncated or corrupt.
        """
        limit = self.config.max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's message quotes its own global limit; the client needs the one that refused it.
            decoder = Image.MAX_IMAGE_PIXELS or limit
            raise ImageTooLarge(
                f"image declares more pixels than the server's limit of {limit:,} (--max-pixels); downscale it"
                if limit <= decoder else f"image declares more than {decoder:,} pixels, the most the image decoder "
                f"accepts (below --max-pixels {limit:,}); downscale it") from None
        except Exception as error:
            raise InvalidImage("the upload is not an image the server can read (PNG, JPEG, WebP, ...): "
                               f"{type(error).__name__}") from None
        width, height = opened.size
        if width * height > limit:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height:,} pixels, more than the server's "
                                f"limit of {limit:,} (--max-pixels); downscale it")
        try:
            pil = load_image(opened, max_pixels=limit)
            batch = self.processor.preprocess([pil])
        except ValueError as error:
            raise InvalidImage(str(error).replace(repr(opened), "the image")) from None
        pixels = batch.pixel_values[0]  # (3, H, W)
        if self.canvas is not None:
            canvas = pixels.new_zeros(3, *self.canvas)
            canvas[:, : pixels.shape[1], : pixels.shape[2]] = pixels
            pixels = canvas
        return PreparedImage(pixels, batch.image_sizes[0], batch.original_sizes[0])

    # --------------------------------------------------------------------------------------------- submit

    def check_capacity(self, tenant: str | None = None, task: str = "") -> None:
        """Raise now what `submit` would raise for this tenant's next request (lets the HTTP layer refuse it
        before decoding the image); `tenant` None means the task is the tenant."""
        try:
            self._queue.check(tenant or task)
        except QueueFull as error:
            self._count_refusal(error)
            raise

    def submit(self, task: str, image: PreparedImage, params: DetectParams = DetectParams(),
               deadline_s: float | None = None, tenant: str | None = None) -> Future:
        """Queue one request for the batcher; the future resolves to a DetectResult or an exception.

        Each tenant has its own bounded queue and a fair share of the batches (adapt.serve.admission);
        `tenant` None makes the task its own tenant (an open server, where callers have no identity).

        Raises:
            TenantOverShare: this tenant already has its share of the queue waiting (HTTP 429).
            QueueFull: the queue is full and no tenant holds more than this one (HTTP 503).
        """
        if not self.running:
            raise EngineStopped("the engine is not running; call start() (or use it as a context manager)")
        timeout = self.config.deadline_s if deadline_s is None else min(deadline_s, self.config.deadline_s)
        request = _Request(task, image, params, time.monotonic() + timeout, Future(), tenant=tenant or task)
        try:
            pushed = self._queue.put(request.tenant, request)
        except QueueFull as error:
            self._count_refusal(error)
            raise
        if pushed is not None:
            refusal = TenantOverShare(len(self._queue), self._queue.retry_after(pushed.tenant),
                                      "the queue is full and this tenant holds the most of it, so its newest request "
                                      "made room for another tenant's; retry in "
                                      f"{self._queue.retry_after(pushed.tenant)} s")
            self._count_refusal(refusal)
            _resolve(pushed, refusal)
        return request.future

    def _count_refusal(self, error: QueueFull) -> None:
        reason = "tenant_over_share" if isinstance(error, TenantOverShare) else "queue_full"
        self.metrics.inc("adapt_rejected_total", reason=reason)

    def detect(self, task: str, image: bytes | PreparedImage, threshold: float = 0.5, top_k: int = 100,
               ) -> DetectResult:
        """One request, from Python: through the batcher if it runs, else right here."""
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)
        params = DetectParams(threshold, top_k)
        if self.running:
            return self.submit(task, prepared, params).result()
        [result] = self.run([(task, prepared, params)])
        if isinstance(result, Exception):
            raise result
        return result

    def run(self, items: list[tuple[str, PreparedImage, DetectParams]]) -> list[DetectResult | Exception]:
        """Run `items` as ONE batch in the calling thread (tests and benchmarks compare this with singles)."""
        deadline = time.monotonic() + self.config.deadline_s
        requests = [_Request(task, image, params, deadline, Future()) for task, image, params in items]
        self._process(requests)
        return [r.future.exception() or r.future.result() for r in requests]

    # ---------------------------------------------------------------------------------------------- batch

    def _loop(self) -> None:
        window = self.config.batch_window_ms / 1000.0
        while not self._stop.is_set():
            picked = self._queue.take(self.config.max_batch, window)
            self._inflight = len(picked)
            for run in self._queue.runs(picked):  # cost classes, cheapest first
                batch = [request for _, request in run]
                started = time.perf_counter()
                try:
                    self._process(batch)
                except BaseException as error:  # the batcher must survive anything a batch does
                    log.exception("batch failed")
                    for request in batch:
                        _resolve(request, error if isinstance(error, Exception) else RuntimeError(repr(error)))
                finally:
                    self._inflight -= len(batch)
                    self._charge(batch, time.perf_counter() - started)

    def _charge(self, batch: list[_Request], seconds: float) -> None:
        """Account a batch's measured compute time to its tenants (the fair-queuing clock and /metrics)."""
        counts: dict[str, int] = defaultdict(int)
        for request in batch:
            counts[request.tenant] += 1
        for tenant, share in self._queue.charge(counts, seconds).items():
            self.metrics.inc("adapt_tenant_compute_seconds_total", share, tenant=tenant)
            self.metrics.inc("adapt_tenant_requests_total", counts[tenant], tenant=tenant)
            self.metrics.inc("adapt_tenant_batches_total", tenant=tenant)

    def _process(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        now = time.monotonic()
        live = []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                continue  # the client gave up
            if request.deadline < now:
                self.metrics.inc("adapt_rejected_total", reason="deadline")
                _resolve(request, DeadlineExceeded(f"request for task {request.task!r} waited past its deadline"))
                continue
            try:
                request.adapter = self.pool.get(request.task)
            except Exception as error:
                _resolve(request, error)
                continue
            live.append(request)
        if not live:
            return
        self.metrics.observe("adapt_batch_size", len(live))
        groups: dict[tuple, list[_Request]] = defaultdict(list)
        for request in live:
            groups[request.image.padded_shape].append(request)
        with self._model_lock, torch.inference_mode(), autocast(self.device, self.dtype):
            for requests in groups.values():
                self._run_isolated(requests)
        elapsed = time.perf_counter() - start
        self.metrics.observe("adapt_batch_seconds", elapsed)
        self._batch_seconds = elapsed if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * elapsed

    def _run_isolated(self, requests: list[_Request]) -> None:
        """Run one group; if it fails, retry each adapter's requests on their own, so that only the adapter that
        fails alone fails, with an error naming it; a version failing `pool.max_failures` times is quarantined."""
        try:
            self._run_group(requests)
            return
        except Exception as error:
            log.warning("batch of %d requests failed (%s: %s); retrying per adapter", len(requests),
                        type(error).__name__, error)
        by_adapter: dict[tuple[str, str], list[_Request]] = defaultdict(list)
        for request in requests:
            if not request.future.done():
                by_adapter[request.adapter.key].append(request)
        failed = []
        for group in by_adapter.values():
            try:
                self._run_group(group)
            except Exception as error:
                failed.append((group, error))
        # When several adapters all fail alone, the base (or the machine) is at fault, not one of them.
        blame = len(failed) < len(by_adapter) or len(by_adapter) == 1
        for group, error in failed:
            name, version = group[0].adapter.key
            log.error("adapter %r (version %s) failed on its own", name, version, exc_info=error)
            if not blame:
                for request in group:
                    _resolve(request, error)
                continue
            quarantined = self.pool.record_failure(group[0].adapter)
            self.metrics.inc("adapt_adapter_failures_total", task=name)
            reason = "its outputs were NaN or Inf" if isinstance(error, NonFiniteOutput) else type(error).__name__
            failure = AdapterFailed(
                f"adapter {name!r} (version {version}) failed at run time ({reason})"
                + ("; it is now quarantined until an admin uploads a new version" if quarantined else
                   "; the admin should replace it"))
            for request in group:
                _resolve(request, failure)

    def _run_group(self, requests: list[_Request]) -> None:
        """Images of one padded size: O0 once, then one fusion+head pass per segment; results are set only
        once every segment has run (so a retry never answers a request twice)."""
        pixels = torch.stack([r.image.pixel_values for r in requests]).to(self.device)  # (B, 3, H, W)
        sizes = [r.image.image_size for r in requests]
        visual = self.base.encode_images(pixels, sizes)
        shared = [i for i, r in enumerate(requests) if r.adapter.shares_base]
        segments: list[tuple[list[int], dict]] = [(shared, {})] if shared else []
        per_adapter: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if not r.adapter.shares_base:
                per_adapter[(r.adapter.name, r.adapter.version)].append(i)
        segments += [(idx, self._overrides(requests[idx[0]].adapter)) for idx in per_adapter.values()]
        results = {}
        for indices, overrides in segments:
            prompt = PromptFeatures.stack([requests[i].adapter.prompt for i in indices])  # (b, T, D)
            if not overrides:  # prompt tuning: one pass, whatever the tasks
                outputs = self.base.fuse_and_predict(_select(visual, indices), prompt)
            elif any(k.startswith(_VISUAL_PREFIXES) for k in overrides):
                outputs = torch.func.functional_call(
                    self.base, overrides, (prompt,),
                    {"pixel_values": pixels[indices], "image_sizes": [sizes[i] for i in indices]})
            else:
                outputs = torch.func.functional_call(self.base, overrides, (prompt,),
                                                     {"visual": _select(visual, indices)})
            _check_finite(outputs, [requests[i].adapter for i in indices])
            maps = [_pad_map(requests[i].adapter.adapter.positive_map, prompt.length) for i in indices]
            for i, final in zip(indices, self.postprocessor(outputs, maps)):
                results[i] = _result(requests[i], final)
        for i, result in results.items():
            _resolve(requests[i], result)

    def _overrides(self, adapter: LoadedAdapter) -> dict[str, Tensor]:
        """The tensors one adapter's group runs with: a linear probe's head tensors, a LoRA's W + scale·B·A."""
        if adapter.lora is None:
            return adapter.overrides
        return {**adapter.overrides, **folded_weights(self._base_weights, adapter.lora)}


def _check_finite(outputs: HeadOutputs, adapters: list[LoadedAdapter]) -> None:
    """Raise NonFiniteOutput naming an adapter whose samples hold NaN or Inf: otherwise the postprocessor would drop
    them silently and answer with no detections."""
    finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in
                          (outputs.alignment_logits, outputs.box_deltas, outputs.centerness)]).all(0)  # (b,)
    if not bool(finite.all()):
        bad = adapters[int((~finite).nonzero()[0])]
        raise NonFiniteOutput(f"adapter {bad.name!r} (version {bad.version}) produced NaN or Inf outputs")


def _select(visual: VisualFeatures, indices: list[int]) -> VisualFeatures:
    if indices == list(range(visual.batch_size)):
        return visual
    return VisualFeatures([level[indices] for level in visual.levels], [visual.image_sizes[i] for i in indices])


def _pad_map(positive_map: Tensor, length: int) -> Tensor:
    """(C, T) -> (C, length): prompt padding positions belong to no category."""
    extra = length - positive_map.shape[1]
    if extra <= 0:
        return positive_map
    return torch.cat([positive_map, positive_map.new_zeros(positive_map.shape[0], extra)], dim=1)


def _result(request: _Request, final: Candidates) -> DetectResult:
    params, adapter = request.params, request.adapter
    keep = (final.scores > params.threshold).nonzero().flatten()[: params.top_k]  # scores are sorted
    boxes = rescale_boxes(final.boxes[keep], request.image.image_size, request.image.original_size)
    detections = detections_to_results(None, boxes, final.scores[keep], final.labels[keep],
                                       adapter.adapter.category_ids, category_names=adapter.adapter.category_names)
    height, width = request.image.original_size
    return DetectResult(task=request.task, adapter_version=adapter.version, strategy=adapter.strategy,
                        width=width, height=height, detections=detections)


def _resolve(request: _Request, outcome: DetectResult | Exception) -> None:
    """Answer a request once (a result or an exception); later answers are ignored."""
    if not request.future.done():
        try:
            if isinstance(outcome, Exception):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)
        except Exception:  # InvalidStateError: resolved concurrently
            pass
