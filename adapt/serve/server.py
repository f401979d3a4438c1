"""Process entry points: the single-process HTTP server (uvicorn) and the local Ray Serve deployment.

`adapt serve` (adapt/cli.py) reads flags and the environment and calls these; nothing here reads env.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from adapt.serve.engine import EngineConfig, MultiTenantEngine
from adapt.serve.tenancy import Tenancy, read_key_file

log = logging.getLogger("adapt.serve")


def steady_malloc(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Keep a long-running server's resident memory flat (glibc only; returns False elsewhere).

    glibc raises its mmap threshold every time a large block is freed; after that, tensors of changing sizes
    (image sizes, prompt lengths, batch sizes) come from the heap, fragment it and are never given back: a
    glip-nano engine grew 926 -> 1169 MiB over 200 mixed batches and was still growing. Pinning the threshold
    (blocks over 1 MiB are mmapped and returned on free) and capping the arenas held it at ~946 MiB.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_arena_max, arenas))


def load_keys(source: str | Path | None) -> dict | None:
    """Key config from a file path, or inline JSON (what $ADAPT_SERVE_KEYS may hold); None for none."""
    if not source:
        return None
    text = str(source).strip()
    data = json.loads(text) if text.startswith("{") else read_key_file(text)
    Tenancy.from_dict(data, source="inline keys" if text.startswith("{") else text)  # fail early on a bad file
    return data


def run_http(*, base: str, adapters_dir: str | Path, engine_config: EngineConfig = EngineConfig(),
             keys: dict | None = None, host: str = "127.0.0.1", port: int = 8000,
             max_body_bytes: int = 16 * 2**20, image_size: int | None = None, log_level: str = "info") -> None:
    """Load the base, build the engine and the app, and serve HTTP until interrupted.

    Args:
        keys: the key file's content (see adapt.serve.tenancy); None = an open server.
        image_size: resize images to this square size instead of the base config's (benchmarks use it
            to keep GLIP-T affordable on CPU).
    """
    import uvicorn

    from adapt.serve.app import HTTPLimits, serve_engine

    tenancy = Tenancy.from_dict(keys) if keys else Tenancy()
    steady_malloc()
    engine = MultiTenantEngine.from_pretrained(base, adapters_dir, engine_config,
                                               processor=processor_for(base_config_of(base), image_size))
    if tenancy.open:
        log.warning("no API keys configured: every caller may use every task and nobody may upload adapters")
    scan_folder(engine.pool)
    limits = HTTPLimits(max_body_bytes=max_body_bytes, max_upload_bytes=engine_config.max_upload_bytes)
    uvicorn.run(serve_engine(engine, tenancy, limits), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


def scan_folder(pool) -> list[dict]:
    """Validate every adapter of the folder at start-up and log the refused ones (they would fail only their own
    task anyway: each is validated again when its file changes)."""
    from adapt.serve.app import adapter_list

    infos = adapter_list(pool)
    for info in infos:
        if info["status"] != "ok":
            log.warning("adapter %r is %s: %s", info["name"], info["status"], info["message"])
    log.info("%d adapters in %s, %d refused", len(infos), pool.directory, sum(i["status"] != "ok" for i in infos))
    return infos


def run_ray(*, base: str, adapters_dir: str | Path, engine_config: EngineConfig = EngineConfig(),
            keys: dict | None = None, host: str = "127.0.0.1", port: int = 8000,
            max_body_bytes: int = 16 * 2**20, replicas: int | None = None, num_cpus: int | None = None,
            threads: int | None = None) -> None:
    """Start a local Ray instance, deploy the Serve application and block until interrupted."""
    from ray import serve

    from adapt.serve.app import HTTPLimits
    from adapt.serve.ray_app import build_app, run

    from backbone.device import resolve_device

    if replicas is None:  # one replica per GPU on CUDA (each reserves one), else one
        import torch

        replicas = torch.cuda.device_count() if resolve_device(engine_config.device).type == "cuda" else 1
    app = build_app(base=base, adapters_dir=str(Path(adapters_dir).resolve()), engine_config=engine_config,
                    tenancy=keys, limits=HTTPLimits(max_body_bytes=max_body_bytes, max_upload_bytes=engine_config.max_upload_bytes),
                    num_replicas=replicas, threads=threads)
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
    import dataclasses

    from backbone.processor import GLIPProcessor

    image = dataclasses.replace(config.image, min_size=image_size, max_size=image_size)
    return GLIPProcessor.from_config(config.replace(image=image))
