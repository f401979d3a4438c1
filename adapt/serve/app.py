"""The HTTP API: `create_app(backend, tenancy)` -> FastAPI, over a local engine or a Ray Serve deployment.

Routes (JSON everywhere, errors as {"error": {"code", "message"}}):
    POST   /v1/tasks/{task}/detect   image as multipart (`image` file) or JSON (`image` base64); threshold, top_k
    GET    /v1/tasks                 the tasks this key may call
    PUT    /v1/adapters/{name}       admin: upload a .safetensors adapter (raw body or multipart `adapter`)
    DELETE /v1/adapters/{name}       admin
    GET    /healthz, /readyz         liveness, readiness
    GET    /v1/adapters              admin: every adapter with its version, strategy and status (ok/refused/quarantined)
    GET    /metrics                  Prometheus text (admin key unless the server is open: it names tasks)
    GET    /                         the web page (adapt/serve/static: plain HTML/JS/CSS, no build step, no CDN)
    GET    /docs                     Swagger UI, only with `docs=True` (it loads its scripts from a CDN)

The app owns HTTP concerns only (auth, body limits, parsing, status codes, security headers); everything
else goes through a `Backend`, so the same app serves `EngineBackend` (one process) and the Ray Serve
ingress. Paths match exactly: no trailing-slash redirect (a redirect would be built from the client's
Host header). The read timeouts of `HTTPLimits` are enforced by the server's protocol (adapt.serve.server).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from adapt.adapter import AdapterError
from adapt.serve.admission import QueueFull, TenantOverShare
from adapt.serve.engine import (AdapterFailed, DeadlineExceeded, DetectParams, DetectResult, EngineStopped,
                                ImageTooLarge, InvalidImage, MultiTenantEngine, PreparedImage)
from adapt.serve.metrics import CONTENT_TYPE, Metrics, add_http_metrics
from adapt.serve.pool import AdapterQuarantined, InvalidAdapterName, UnknownAdapter, validate_name
from adapt.serve.schemas import (AdapterInfo, AdapterList, Deleted, DetectForm, DetectJSON, DetectResponse,
                                 ErrorResponse, Status, TaskInfo, TaskList)
from adapt.serve.tenancy import Tenancy, Tenant

log = logging.getLogger("adapt.serve")
STATIC = Path(__file__).parent / "static"
JSON_MAX_DEPTH = 32  # a detect body is one flat object; json.loads recurses per level (100,000 deep: RecursionError)
_DETECT_PATH = re.compile(r"/v1/tasks/[^/]+/detect")

# Sent with every response, page and API alike: nothing may frame it or load from elsewhere, no MIME sniffing,
# no Referer to other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Swagger UI (only with docs=True) is FastAPI's page: an inline script, and its bundle from the jsdelivr CDN.
_DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
             "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
             "frame-ancestors 'none'")


@dataclass(frozen=True, kw_only=True)
class HTTPLimits:
    max_body_bytes: int = field(default=16 * 2**20, metadata={"help": "largest detect request body, bytes"})
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "a client must send a request's headers within this many seconds of connecting (or of its previous "
                "response), else it gets 408 and the connection is closed"})
    body_timeout_s: float = field(default=10.0, metadata={
        "help": "a client must send a request's whole body within this many seconds of its headers, else 408 and "
                "the connection is closed"})

    def __post_init__(self):
        for name in ("max_body_bytes", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HTTPLimits.{name}={getattr(self, name)} must be positive")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class Backend(Protocol):
    """What the HTTP app needs from whatever runs the model (see EngineBackend, adapt.serve.ray_app)."""

    metrics: Metrics
    deadline_s: float  # default and largest per-request deadline
    max_upload_bytes: int  # largest adapter file: the engine's max_upload_bytes caps an upload's body too

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def ready(self) -> bool: ...
    def prepare(self, data: bytes) -> PreparedImage: ...  # sync, CPU-bound: run in a thread
    # `tenant`: whose share of the queue a request counts against (None: the task is the tenant)
    def check_capacity(self, tenant: str | None, task: str) -> None: ...
    async def detect(self, task: str, image: PreparedImage, params: DetectParams, timeout_s: float,
                     tenant: str | None) -> DetectResult: ...
    def task_names(self) -> list[str]: ...
    def has_task(self, name: str) -> bool: ...
    async def task_infos(self, names: list[str]) -> list[dict]: ...
    async def put_adapter(self, name: str, data: bytes) -> dict: ...
    async def delete_adapter(self, name: str) -> bool: ...
    async def adapter_list(self) -> list[dict]: ...
    async def metrics_text(self) -> str: ...


class EngineBackend:
    """A MultiTenantEngine in this process."""

    def __init__(self, engine: MultiTenantEngine):
        self.engine = engine
        self.metrics = engine.metrics
        self.deadline_s = engine.config.deadline_s
        self.max_upload_bytes = engine.config.max_upload_bytes

    async def start(self) -> None:
        self.engine.start()

    async def stop(self) -> None:
        await run_in_threadpool(self.engine.stop)

    def ready(self) -> bool:
        return self.engine.running

    def prepare(self, data: bytes) -> PreparedImage:
        return self.engine.prepare(data)

    def check_capacity(self, tenant, task) -> None:
        self.engine.check_capacity(tenant, task)

    async def detect(self, task, image, params, timeout_s, tenant) -> DetectResult:
        future = self.engine.submit(task, image, params, deadline_s=timeout_s, tenant=tenant)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            self.metrics.inc("adapt_rejected_total", reason="deadline")
            raise DeadlineExceeded(f"no answer for task {task!r} within {timeout_s:g} s") from None

    def task_names(self) -> list[str]:
        return self.engine.pool.names()

    def has_task(self, name: str) -> bool:
        return self.engine.pool.exists(name)

    async def task_infos(self, names: list[str]) -> list[dict]:
        return task_infos(self.engine.pool, names)

    async def put_adapter(self, name: str, data: bytes) -> dict:
        return await run_in_threadpool(adapter_upload, self.engine.pool, name, data)

    async def delete_adapter(self, name: str) -> bool:
        return await run_in_threadpool(self.engine.pool.delete, name)

    async def adapter_list(self) -> list[dict]:
        return await run_in_threadpool(adapter_list, self.engine.pool)

    async def metrics_text(self) -> str:
        return self.metrics.render()


def task_infos(pool, names: list[str]) -> list[dict]:
    infos = []
    for name in names:
        entry = pool.cached(name)
        infos.append({"name": name, "loaded": entry is not None, "adapter_version": entry and entry.version,
                      "strategy": entry and entry.strategy})
    return infos


def adapter_list(pool) -> list[dict]:
    """Every adapter of the folder as an admin sees it (each is loaded and verified to tell its status)."""
    return [pool.status(name) for name in pool.names()]


def adapter_upload(pool, name: str, data: bytes) -> dict:
    """Verify and atomically install an upload; the AdapterInfo fields."""
    replaced = pool.exists(name)
    entry = pool.put(name, data)
    return {"name": name, "adapter_version": entry.version, "strategy": entry.strategy,
            "categories": entry.adapter.category_names, "bytes": len(data), "replaced": replaced}


# ------------------------------------------------------------------------------------------------ errors


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def to_api_error(error: Exception) -> ApiError:
    """The HTTP status and code for an exception from the engine or the pool."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ImageTooLarge):
        return ApiError(413, "image_too_large", str(error))
    if isinstance(error, InvalidImage):
        return ApiError(422, "invalid_image", str(error))
    if isinstance(error, TenantOverShare):
        return ApiError(429, "over_share", str(error), {"Retry-After": str(error.retry_after_s)})
    if isinstance(error, QueueFull):
        return ApiError(503, "overloaded", str(error), {"Retry-After": str(error.retry_after_s)})
    if isinstance(error, ClientDisconnect):
        return ApiError(408, "request_timeout", "the client closed the connection, or did not send the request "
                        "within the server's read timeouts", {"Connection": "close"})
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(error))
    if isinstance(error, EngineStopped):
        return ApiError(503, "unavailable", str(error), {"Retry-After": "1"})
    if isinstance(error, UnknownAdapter):
        return ApiError(404, "unknown_task", f"unknown task {error.args[0]!r}")
    if isinstance(error, InvalidAdapterName):
        return ApiError(422, "invalid_name", str(error))
    if isinstance(error, AdapterQuarantined):
        return ApiError(503, "adapter_quarantined", str(error))
    if isinstance(error, AdapterFailed):
        return ApiError(500, "adapter_failed", str(error))
    if isinstance(error, AdapterError):
        return ApiError(422, "adapter_refused", str(error))
    log.error("internal error", exc_info=error)
    return ApiError(500, "internal", f"internal error ({type(error).__name__}); see the server log")


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed JSON", 401: "missing or unknown API key", 403: "not an admin key", 404: "unknown task",
    408: "request not received within the read timeouts", 413: "body or image too large",
    415: "unsupported content type", 422: "invalid image, parameters or adapter",
    429: "this key has its share of the queue waiting (see Retry-After)",
    503: "queue full (see Retry-After)", 504: "deadline exceeded"}.items()}

_DETECT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/DetectForm"}},
    "application/json": {"schema": {"$ref": "#/components/schemas/DetectJSON"}}}}}
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["adapter"], "properties": {
        "adapter": {"type": "string", "format": "binary"}}}}}}}


# ------------------------------------------------------------------------------------------------ bodies


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all; `setting` names the
    server option that sets the limit, for the message."""
    declared = request.headers.get("content-length")
    if declared is not None and not (declared.isascii() and declared.isdigit()):
        raise ApiError(400, "invalid_header", f"Content-Length must be a number of bytes, got {declared[:40]!r}")
    over = f"the server's limit of {limit:,} bytes ({setting})"
    if declared is not None and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body of {int(declared):,} bytes exceeds {over}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds {over}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(request: Request, body: bytes) -> dict[str, Any]:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=2, max_fields=10).parse()
    except MultiPartException as error:
        raise ApiError(400, "malformed_multipart", f"cannot parse the multipart body: {error.message}")
    values = {}
    for key, value in form.multi_items():
        values[key] = await value.read() if hasattr(value, "read") else value
    return values


def check_json_depth(body: bytes, limit: int = JSON_MAX_DEPTH) -> None:
    """Refuse (400) JSON nested deeper than `limit` before parsing it (vectorised, so a large body stays cheap).

    Brackets are counted outside strings only when the raw count exceeds the limit (base64 has none)."""
    raw = np.frombuffer(body, dtype=np.uint8)
    if _max_depth(raw) <= limit:
        return
    if _max_depth(np.frombuffer(re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', body), dtype=np.uint8)) > limit:
        raise ApiError(400, "json_too_deep", f"the JSON body nests deeper than {limit} levels; send one flat "
                       "object {'image': base64, 'threshold', 'top_k'}")


def _max_depth(raw: np.ndarray) -> int:
    if raw.size == 0:
        return 0
    steps = np.isin(raw, (91, 123)).astype(np.int32) - np.isin(raw, (93, 125)).astype(np.int32)  # [{ +1, ]} -1
    return int(np.cumsum(steps).max())


def request_timeout(raw: str | None, default: float) -> float:
    """The deadline in seconds for an X-Timeout-Ms header value (None: the default; never beyond it)."""
    if raw is None:
        return default
    try:
        value = float(raw) / 1000.0
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ApiError(422, "invalid_header", f"X-Timeout-Ms must be a positive, finite number of milliseconds, "
                       f"got {raw[:40]!r}; omit it for the server's deadline of {default:g} s")
    return min(value, default)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse_detect(request: Request, body: bytes) -> tuple[bytes, DetectParams]:
    media = _media_type(request)
    try:
        if media == "multipart/form-data":
            fields = await _form(request, body)
            if not isinstance(fields.get("image"), (bytes, bytearray)):
                raise ApiError(422, "invalid_request", "multipart body needs a file field 'image'")
            form = DetectForm(**fields)
            return bytes(form.image), DetectParams(form.threshold, form.top_k)
        if media in ("application/json", ""):
            check_json_depth(body)
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ApiError(400, "malformed_json", f"the body is not valid JSON ({error})") from None
            except RecursionError:
                raise ApiError(400, "json_too_deep", f"the JSON body nests deeper than {JSON_MAX_DEPTH} levels; "
                               "send one flat object {'image': base64, 'threshold', 'top_k'}") from None
            if not isinstance(data, dict):
                raise ApiError(422, "invalid_request", "the JSON body must be an object with an 'image' field")
            req = DetectJSON(**data)
            encoded = req.image.split(",", 1)[1] if req.image.startswith("data:") else req.image
            try:
                image = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "invalid_base64", "'image' is not valid base64") from None
            return image, DetectParams(req.threshold, req.top_k)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise ApiError(422, "invalid_request", problems) from None
    raise ApiError(415, "unsupported_media_type", f"content type {media!r} is not supported; send "
                   "multipart/form-data (field 'image') or application/json ({'image': base64})")


# ---------------------------------------------------------------------------------------------------- app


def create_app(backend: Backend, tenancy: Tenancy | None = None, limits: HTTPLimits = HTTPLimits(), *,
               manage_backend: bool = True, docs: bool = False) -> FastAPI:
    """The FastAPI app over `backend`; with `manage_backend` its lifespan starts and stops the backend; with
    `docs` it serves Swagger UI at /docs."""
    tenancy = tenancy or Tenancy()
    metrics = add_http_metrics(backend.metrics)
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
    api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="or the key in X-API-Key")

    @asynccontextmanager
    async def lifespan(_app):
        if manage_backend:
            await backend.start()
        try:
            yield
        finally:
            if manage_backend:
                await backend.stop()

    app = FastAPI(title="glip-adapt server", version="1", lifespan=lifespan, redirect_slashes=False,
                  docs_url="/docs" if docs else None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  description="Many task adapters on one shared GLIP, batched across tenants.")
    app.add_middleware(ResponseGuard, metrics=metrics)

    async def tenant(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                     header_key: str | None = Depends(api_key)) -> Tenant:
        key = credentials.credentials if credentials else header_key
        found = tenancy.authenticate(key)
        if found is None:
            raise ApiError(401, "unauthorized", "missing or unknown API key; send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})
        return found

    async def admin(who: Tenant = Depends(tenant)) -> Tenant:
        if not who.admin:
            raise ApiError(403, "forbidden", "this route needs an admin key")
        return who

    def visible(who: Tenant, task: str) -> bool:
        return who.may_call(task) and backend.has_task(task)

    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, error: RequestValidationError):
        return error_response(422, "invalid_request", "; ".join(str(e.get("msg")) for e in error.errors()))

    @app.post("/v1/tasks/{task}/detect", response_model=DetectResponse, responses=_ERRORS,
              openapi_extra=_DETECT_BODY, summary="Detect the task's categories in one image")
    async def detect(task: str, request: Request, who: Tenant = Depends(tenant)):
        if not visible(who, task):  # another tenant's task looks exactly like a missing one
            raise ApiError(404, "unknown_task", f"unknown task {task!r}; GET /v1/tasks lists yours")
        request.state.task = task  # the label ResponseGuard counts it under (unknown tasks share one)
        share = None if tenancy.open else who.name  # an open server cannot tell callers apart: each task is one
        timeout = request_timeout(request.headers.get("x-timeout-ms"), backend.deadline_s)  # before queueing
        backend.check_capacity(share, task)  # refuse before spending time on decoding
        body = await read_body(request, limits.max_body_bytes, "--max-body-bytes")
        data, params = await parse_detect(request, body)
        image = await run_in_threadpool(backend.prepare, data)
        result = await backend.detect(task, image, params, timeout, share)
        return result.to_dict()

    @app.get("/v1/tasks", response_model=TaskList, responses={401: _ERRORS[401]}, summary="Tasks this key may call")
    async def list_tasks(who: Tenant = Depends(tenant)):
        names = [n for n in backend.task_names() if who.may_call(n)]
        return {"tasks": [TaskInfo(**info) for info in await backend.task_infos(names)]}

    @app.put("/v1/adapters/{name}", response_model=AdapterInfo, openapi_extra=_UPLOAD_BODY,
             responses={k: _ERRORS[k] for k in (401, 403, 413, 422)}, summary="Upload or replace an adapter (admin)")
    async def put_adapter(name: str, request: Request, _who: Tenant = Depends(admin)):
        try:
            validate_name(name)
            body = await read_body(request, backend.max_upload_bytes, "--max-upload-bytes")
            if _media_type(request) == "multipart/form-data":
                body = (await _form(request, body)).get("adapter")
                if not isinstance(body, (bytes, bytearray)):
                    raise ApiError(422, "invalid_request", "multipart upload needs a file field 'adapter'")
            info = await backend.put_adapter(name, bytes(body))
        except Exception as error:
            api = to_api_error(error)
            if api.code == "adapter_refused":
                api = ApiError(422, "invalid_adapter", api.message)
            raise api from None
        return JSONResponse(AdapterInfo(**info).model_dump(), status_code=200 if info["replaced"] else 201)

    @app.get("/v1/adapters", response_model=AdapterList, responses={k: _ERRORS[k] for k in (401, 403)},
             summary="Every adapter with its version, strategy and status (admin)")
    async def list_adapters(_who: Tenant = Depends(admin)):
        return {"adapters": await backend.adapter_list()}

    @app.delete("/v1/adapters/{name}", response_model=Deleted,
                responses={k: _ERRORS[k] for k in (401, 403, 404, 422)}, summary="Delete an adapter (admin)")
    async def delete_adapter(name: str, _who: Tenant = Depends(admin)):
        try:
            validate_name(name)
            deleted = await backend.delete_adapter(name)
        except Exception as error:
            raise to_api_error(error) from None
        if not deleted:
            raise ApiError(404, "unknown_task", f"unknown adapter {name!r}")
        return {"deleted": name}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", response_model=Status, summary="Liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}}, summary="Readiness")
    async def readyz():
        if not backend.ready():
            raise ApiError(503, "not_ready", "the model is not loaded or the batcher is not running")
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: _ERRORS[401], 403: _ERRORS[403]},
             summary="Prometheus metrics (admin key unless the server is open)")
    async def prometheus(who: Tenant = Depends(tenant)):
        if not tenancy.open and not who.admin:  # per-task series would reveal other tenants' task names
            raise ApiError(403, "forbidden", "/metrics needs an admin key")
        return PlainTextResponse(await backend.metrics_text(), media_type=CONTENT_TYPE)

    def openapi() -> dict:
        # The detect and upload bodies are parsed by hand (size limit first), so their schemas are added here.
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (DetectForm, DetectJSON):
                schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app


def serve_engine(engine: MultiTenantEngine, tenancy: Tenancy | None = None, limits: HTTPLimits = HTTPLimits(),
                 *, docs: bool = False) -> FastAPI:
    """`create_app` over an engine in this process."""
    return create_app(EngineBackend(engine), tenancy, limits, docs=docs)


class ResponseGuard:
    """The app's outermost layer (pure ASGI): every response gets the security headers, any exception that
    escapes a route becomes its JSON error here, and /metrics counts each response by the status code the
    client actually got (so an error raised while rendering a 200 counts as the 500 that was sent)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})
        started, sent = time.perf_counter(), {}

        async def send_guarded(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if scope["path"] == "/docs":
                    headers["Content-Security-Policy"] = _DOCS_CSP
            await send(message)

        try:
            await self.app(scope, receive, send_guarded)
        except Exception as error:
            if "status" in sent:  # too late for an error response: the client sees the connection close
                raise
            api = to_api_error(error)
            await error_response(api.status, api.code, api.message, api.headers)(scope, receive, send_guarded)
        finally:
            if "status" in sent:
                self._count(scope, sent["status"], time.perf_counter() - started)

    def _count(self, scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        self.metrics.inc("adapt_http_responses_total", method=scope["method"], code=str(status),
                         route=getattr(route, "path", "(no route)"))
        if scope["method"] == "POST" and _DETECT_PATH.fullmatch(scope["path"]):
            task = scope["state"].get("task", "(unknown)")
            self.metrics.inc("adapt_requests_total", task=task, code=str(status))
            if status == 200:
                self.metrics.observe("adapt_request_seconds", seconds, task=task)
