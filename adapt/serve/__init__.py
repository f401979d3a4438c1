"""Serving many task adapters on one shared GLIP: the engine (library), the HTTP app, the Ray Serve deployment.

    from adapt.serve import EngineConfig, MultiTenantEngine, serve_engine
    engine = MultiTenantEngine.from_pretrained("glip-nano", "adapters/", EngineConfig(max_batch=8))
    app = serve_engine(engine)            # FastAPI; run it with uvicorn
    # or: adapt serve --base glip-nano --adapters adapters/ [--ray]

The HTTP and Ray layers are imported on first use, so the engine needs neither FastAPI nor Ray.
"""
from adapt.serve.admission import QueueFull, TenantOverShare
from adapt.serve.engine import (DeadlineExceeded, DetectParams, DetectResult, EngineConfig, ImageTooLarge,
                                InvalidImage, MultiTenantEngine, PreparedImage)
from adapt.serve.pool import AdapterPool, InvalidAdapterName, LoadedAdapter, UnknownAdapter, validate_name
from adapt.serve.tenancy import Tenancy, Tenant, hash_key, new_key

__all__ = ["AdapterPool", "DeadlineExceeded", "DetectParams", "DetectResult", "EngineConfig", "HTTPLimits",
           "ImageTooLarge", "InvalidAdapterName", "InvalidImage", "LoadedAdapter", "MultiTenantEngine",
           "PreparedImage", "QueueFull", "Tenancy", "Tenant", "TenantOverShare", "UnknownAdapter", "create_app",
           "hash_key", "new_key", "run_http", "serve_engine", "validate_name"]

_LAZY = {"create_app": "adapt.serve.app", "serve_engine": "adapt.serve.app", "HTTPLimits": "adapt.serve.app",
         "run_http": "adapt.serve.server"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapt.serve' has no attribute {name!r}")
