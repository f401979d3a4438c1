"""Process entry points: the single-process HTTP server (uvicorn) and the local Ray Serve deployment.

`adapt serve` (adapt/cli.py) reads flags and the environment and calls these; nothing here reads env.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from functools import partial
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from adapt.serve.allocator import steady_malloc
from adapt.serve.app import HTTPLimits, adapter_list, serve_engine
from adapt.serve.engine import EngineConfig, MultiTenantEngine
from adapt.serve.tenancy import Tenancy, read_key_file

log = logging.getLogger("adapt.serve")


class ReadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on reading each request.

    uvicorn times out only an idle keep-alive connection, so a client that sends half its headers, or trickles
    its body, holds a connection (and a task) for as long as it likes. Here a request's headers must arrive
    within `header_timeout_s` of the connection (or of the previous response) and its body within
    `body_timeout_s` of the headers; otherwise the client gets a 408 and the connection is closed.
    """

    def __init__(self, *args, header_timeout_s: float, body_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "headers" or "body"

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm("headers")

    def data_received(self, data: bytes) -> None:
        previous = self.cycle
        super().data_received(data)
        self._follow(previous)

    def on_response_complete(self) -> None:
        previous = self.cycle
        super().on_response_complete()  # may start the next pipelined request
        if self.cycle is previous and not self.transport.is_closing():
            self._arm("headers")
        else:
            self._follow(previous)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self, previous) -> None:
        if self.cycle is not previous:  # a new request's headers are complete
            self._arm("body") if self.cycle.more_body else self._disarm()
        elif self._waiting_for == "body" and not self.cycle.more_body:
            self._disarm()

    def _arm(self, part: str) -> None:
        self._disarm()
        self._waiting_for = part
        seconds = self.header_timeout_s if part == "headers" else self.body_timeout_s
        self._deadline = self.loop.call_later(seconds, self._expire, part, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None

    def _expire(self, part: str, seconds: float) -> None:
        self._deadline = self._waiting_for = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            option = "--header-timeout-s" if part == "headers" else "--body-timeout-s"
            body = json.dumps({"error": {"code": "request_timeout", "message": f"the request {part} did not arrive "
                               f"within the server's limit of {seconds:g} s ({option})"}}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"x-content-type-options: nosniff\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def http_config(app, limits: HTTPLimits, *, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info") -> uvicorn.Config:
    """The uvicorn settings of `adapt serve`: `app` on host:port with the read deadlines of `limits`."""
    protocol = partial(ReadDeadlineProtocol, header_timeout_s=limits.header_timeout_s,
                       body_timeout_s=limits.body_timeout_s)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_graceful_shutdown=5)


def load_keys(source: str | Path | None) -> dict | None:
    """Key config from a file path, or inline JSON (what $ADAPT_SERVE_KEYS may hold); None for none."""
    if not source:
        return None
    text = str(source).strip()
    data = json.loads(text) if text.startswith("{") else read_key_file(text)
    Tenancy.from_dict(data, source="inline keys" if text.startswith("{") else text)  # fail early on a bad file
    return data


def run_http(*, base: str, adapters_dir: str | Path, engine_config: EngineConfig = EngineConfig(),
             keys: dict | None = None, host: str = "127.0.0.1", port: int = 8000, http: HTTPLimits = HTTPLimits(),
             docs: bool = False, image_size: int | None = None, log_level: str = "info") -> None:
    """Load the base, build the engine and the app, and serve HTTP until interrupted.

    Args:
        keys: the key file's content (see adapt.serve.tenancy); None = an open server.
        http: body limits and read timeouts (the upload limit is the engine's `max_upload_bytes`).
        docs: serve Swagger UI at /docs.
        image_size: resize images to this square size instead of the base config's (benchmarks use it
            to keep GLIP-T affordable on CPU).
    """
    tenancy = Tenancy.from_dict(keys) if keys else Tenancy()
    steady_malloc()
    engine = MultiTenantEngine.from_pretrained(base, adapters_dir, engine_config,
                                               processor=processor_for(base_config_of(base), image_size))
    if tenancy.open:
        log.warning("no API keys configured: every caller may use every task and nobody may upload adapters")
    scan_folder(engine.pool)
    uvicorn.Server(http_config(serve_engine(engine, tenancy, http, docs=docs), http, host=host, port=port,
                               log_level=log_level)).run()


def scan_folder(pool) -> list[dict]:
    """Validate every adapter of the folder at start-up and log the refused ones (they would fail only their own
    task anyway: each is validated again when its file changes)."""
    infos = adapter_list(pool)
    for info in infos:
        if info["status"] != "ok":
            log.warning("adapter %r is %s: %s", info["name"], info["status"], info["message"])
    log.info("%d adapters in %s, %d refused", len(infos), pool.directory, sum(i["status"] != "ok" for i in infos))
    return infos


def run_ray(*, base: str, adapters_dir: str | Path, engine_config: EngineConfig = EngineConfig(),
            keys: dict | None = None, host: str = "127.0.0.1", port: int = 8000, http: HTTPLimits = HTTPLimits(),
            docs: bool = False, replicas: int | None = None, num_cpus: int | None = None,
            threads: int | None = None) -> None:
    """Start a local Ray instance, deploy the Serve application and block until interrupted (Ray Serve's own
    proxy reads the requests, so `http`'s read timeouts do not apply there)."""
    import torch
    from ray import serve

    from adapt.serve.ray_app import build_app, run  # imports Ray: only on this path
    from backbone.device import resolve_device

    if replicas is None:  # one replica per GPU on CUDA (each reserves one), else one
        replicas = torch.cuda.device_count() if resolve_device(engine_config.device).type == "cuda" else 1
    app = build_app(base=base, adapters_dir=str(Path(adapters_dir).resolve()), engine_config=engine_config,
                    tenancy=keys, limits=http,
                    num_replicas=replicas, threads=threads, docs=docs)
    run(app, host=host, port=port, num_cpus=num_cpus, blocking=False)
    print(f"serving on http://{host}:{port} (Ray Serve, {replicas} model replica(s)); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def base_config_of(base: str):
    from backbone.checkpoints import CHECKPOINTS, read_config
    from backbone.config import get_preset

    if base in CHECKPOINTS:
        return get_preset(CHECKPOINTS[base].preset)
    return read_config(base)


def processor_for(config, image_size: int | None):
    """None (the engine's default) unless a square `image_size` overrides the config's resize."""
    if config is None or image_size is None:
        return None
    from backbone.processor import GLIPProcessor

    image = dataclasses.replace(config.image, min_size=image_size, max_size=image_size)
    return GLIPProcessor.from_config(config.replace(image=image))
