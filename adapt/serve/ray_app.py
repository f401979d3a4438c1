"""Scale-out on Ray Serve: the same engine and the same HTTP contract, adapters routed by model multiplexing.

Two deployments (https://docs.ray.io/en/latest/serve/model-multiplexing.html):
- `AdapterModel`: replicas each hold the frozen base and a `MultiTenantEngine` (its pool and batcher).
  `get_adapter` is a `serve.multiplexed` loader, so Ray's router sends a task's requests to replicas that
  already hold its adapter and spreads new tasks over the others; inside a replica the engine still
  batches requests of all the tasks it holds.
- `Ingress`: the FastAPI app of `adapt.serve.app` (auth, limits, parsing, status codes) over a
  `RayBackend`, which calls `AdapterModel` with `multiplexed_model_id=<task>`.
Replicas share the adapter directory (one machine, or a shared filesystem); an upload is verified by
one replica and moved into place atomically, and the others notice the changed file on their next
request. Ray is imported lazily: nothing here is needed for the single-process server.
"""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from ray import serve

from adapt.adapter import AdapterError
from adapt.serve.allocator import steady_malloc
from adapt.serve.app import HTTPLimits, adapter_list, adapter_upload, create_app, task_infos
from adapt.serve.admission import QueueFull, TenantOverShare
from adapt.serve.engine import (AdapterFailed, DeadlineExceeded, DetectParams, DetectResult, EngineConfig,
                                EngineStopped, ImageTooLarge, InvalidImage, MultiTenantEngine)
from adapt.serve.metrics import Metrics
from adapt.serve.pool import AdapterQuarantined, InvalidAdapterName, UnknownAdapter, adapter_exists, list_adapters
from adapt.serve.tenancy import Tenancy

APP_NAME = "glip-adapt"
# Ray's routing bookkeeping only; the pool's byte-bounded LRU is what bounds a replica's memory.
MAX_ADAPTERS_PER_REPLICA = 256

_ERRORS = {cls.__name__: cls for cls in (InvalidImage, ImageTooLarge, QueueFull, TenantOverShare, DeadlineExceeded,
                                         UnknownAdapter,
                                         InvalidAdapterName, AdapterError, EngineStopped, AdapterFailed,
                                         AdapterQuarantined)}


def _encode_error(error: Exception) -> dict:
    name = type(error).__name__ if type(error).__name__ in _ERRORS else "RuntimeError"
    message = error.args[0] if isinstance(error, UnknownAdapter) and error.args else str(error)
    return {"error": {"type": name, "message": message, "retry_after_s": getattr(error, "retry_after_s", None)}}


def _decode_error(payload: dict) -> Exception:
    cls = _ERRORS.get(payload["type"], RuntimeError)
    error = cls.__new__(cls)
    Exception.__init__(error, payload["message"])
    if issubclass(cls, QueueFull):
        error.retry_after_s = payload["retry_after_s"] or 1
    return error


@serve.deployment(max_ongoing_requests=128)
class AdapterModel:
    """One replica: the base model, its adapter pool and its cross-tenant batcher."""

    def __init__(self, base: str, adapters_dir: str, engine_config: dict, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        steady_malloc()
        self.engine = MultiTenantEngine.from_pretrained(base, adapters_dir, EngineConfig(**engine_config)).start()

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def get_adapter(self, task: str):
        return await asyncio.to_thread(self.engine.pool.get, task)

    async def detect(self, data: bytes, threshold: float, top_k: int, timeout_s: float, tenant: str | None) -> dict:
        task = serve.get_multiplexed_model_id()
        future = None
        try:
            await self.get_adapter(task)  # load + verify here; tells the router this replica holds the task
            image = await asyncio.to_thread(self.engine.prepare, data)
            future = self.engine.submit(task, image, DetectParams(threshold, top_k), deadline_s=timeout_s,
                                        tenant=tenant)
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
            return {"ok": dataclasses.asdict(result)}
        except asyncio.TimeoutError:
            if future is not None:
                future.cancel()
            return _encode_error(DeadlineExceeded(f"no answer for task {task!r} within {timeout_s:g} s"))
        except Exception as error:
            return _encode_error(error)

    async def put_adapter(self, name: str, data: bytes) -> dict:
        try:
            return {"ok": await asyncio.to_thread(adapter_upload, self.engine.pool, name, data)}
        except Exception as error:
            return _encode_error(error)

    async def delete_adapter(self, name: str) -> dict:
        try:
            return {"ok": await asyncio.to_thread(self.engine.pool.delete, name)}
        except Exception as error:
            return _encode_error(error)

    def task_infos(self, names: list[str]) -> list[dict]:
        return task_infos(self.engine.pool, names)

    def adapter_list(self) -> list[dict]:
        return adapter_list(self.engine.pool)

    def metrics_text(self) -> str:
        return self.engine.metrics.render()

    def ready(self) -> bool:
        return self.engine.running


class RayBackend:
    """The HTTP app's backend inside the ingress replica: every model call goes to `AdapterModel`."""

    def __init__(self, handle, adapters_dir: str, deadline_s: float, max_image_bytes: int, max_upload_bytes: int):
        self.handle = handle
        self.directory = Path(adapters_dir)
        self.deadline_s = deadline_s
        self.max_upload_bytes = max_upload_bytes
        self.max_image_bytes = max_image_bytes
        self.metrics = Metrics()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def ready(self) -> bool:
        return True  # Serve routes to this ingress only once its replicas are healthy

    def prepare(self, data: bytes) -> bytes:
        return data  # decoded in the model replica, next to the model (bytes travel lighter than pixels)

    def check_capacity(self, tenant: str | None, task: str) -> None:
        pass  # the replica's per-tenant queues refuse (and Ray Serve's max_ongoing_requests bounds the rest)

    async def detect(self, task: str, image: bytes, params: DetectParams, timeout_s: float,
                     tenant: str | None) -> DetectResult:
        handle = self.handle.options(multiplexed_model_id=task)
        reply = await handle.detect.remote(image, params.threshold, params.top_k, timeout_s, tenant)
        if "error" in reply:
            raise _decode_error(reply["error"])
        return DetectResult(**reply["ok"])

    def task_names(self) -> list[str]:
        return list_adapters(self.directory)

    def has_task(self, name: str) -> bool:
        return adapter_exists(self.directory, name)

    async def task_infos(self, names: list[str]) -> list[dict]:
        return await self.handle.task_infos.remote(names)

    async def put_adapter(self, name: str, data: bytes) -> dict:
        reply = await self.handle.put_adapter.remote(name, data)
        if "error" in reply:
            raise _decode_error(reply["error"])
        return reply["ok"]

    async def delete_adapter(self, name: str) -> bool:
        reply = await self.handle.delete_adapter.remote(name)
        if "error" in reply:
            raise _decode_error(reply["error"])
        return reply["ok"]

    async def adapter_list(self) -> list[dict]:
        return await self.handle.adapter_list.remote()

    async def metrics_text(self) -> str:
        return self.metrics.render() + await self.handle.metrics_text.remote()


@serve.deployment(max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """The public HTTP contract (adapt.serve.app), built in the replica around the model's handle."""

    def __init__(self, model, adapters_dir: str, tenancy: dict | None, limits: dict, deadline_s: float,
                 max_upload_bytes: int, docs: bool = False):
        self.model, self.adapters_dir, self.tenancy, self.deadline_s = model, adapters_dir, tenancy, deadline_s
        self.max_upload_bytes = max_upload_bytes
        self.limits, self.docs = HTTPLimits(**limits), docs

    def __serve_build_asgi_app__(self):
        backend = RayBackend(self.model, self.adapters_dir, self.deadline_s, self.limits.max_body_bytes,
                             self.max_upload_bytes)
        tenancy = Tenancy.from_dict(self.tenancy) if self.tenancy else Tenancy()
        return create_app(backend, tenancy, self.limits, manage_backend=False, docs=self.docs)


def build_app(*, base: str, adapters_dir: str | Path, engine_config: EngineConfig = EngineConfig(),
              tenancy: dict | None = None, limits: HTTPLimits = HTTPLimits(), num_replicas: int = 1,
              model_cpus: float = 1.0, threads: int | None = None, docs: bool = False):
    """The Serve application: `serve.run(build_app(...), route_prefix="/")`.

    Args:
        base: checkpoint name or path every replica loads.
        adapters_dir: the adapter directory, visible to every replica.
        engine_config: per-replica batching and limits.
        tenancy: the key file's content (digests only), None for an open server.
        limits: HTTP body limits.
        num_replicas: model replicas.
        model_cpus: CPUs Ray reserves per model replica.
        threads: torch threads per model replica.
        docs: serve Swagger UI at /docs.

    On CUDA (engine_config.device cuda/cuda:N, or None on a machine with CUDA) each replica reserves one GPU,
    so Ray places one replica per GPU; the replica then runs on the GPU Ray gave it.
    """
    from backbone.device import resolve_device

    actor_options = {"num_cpus": model_cpus}
    if resolve_device(engine_config.device).type == "cuda":
        actor_options["num_gpus"] = 1
        engine_config = dataclasses.replace(engine_config, device="cuda")  # Ray's CUDA_VISIBLE_DEVICES picks it
    model = AdapterModel.options(
        num_replicas=num_replicas, ray_actor_options=actor_options,
        max_ongoing_requests=engine_config.max_queue + engine_config.max_batch,
    ).bind(base, str(adapters_dir), dataclasses.asdict(engine_config), threads)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(
        model, str(adapters_dir), tenancy, dataclasses.asdict(limits), engine_config.deadline_s,
        engine_config.max_upload_bytes, docs)


def run(app, *, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None, blocking: bool = True):
    """Start a local Ray instance and Serve on host:port, and deploy `app` at "/"."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
