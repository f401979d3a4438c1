"""Helpers of the serving tests (the fixtures built on them are in tests/conftest.py): the tasks of the shared
adapters folder, the tenants and their keys, an engine on the tiny random GLIP, one detect request."""
from __future__ import annotations

import pytest

from adapt.serve.engine import EngineConfig, MultiTenantEngine
from adapt.serve.tenancy import Tenancy, hash_key
from adapt.serve.testing import image_bytes, tiny_base

CATEGORIES = {
    "alpha": (["cat", "dog"], "prompt-tune"),
    "beta": (["traffic light", "person", "car", "bicycle"], "prompt-tune"),
    "gamma": (["fish"], "linear-probe"),
    "delta": (["shark", "whale"], "lora"),
}
KEYS = {"team-a": "key-a-0123456789", "team-b": "key-b-0123456789", "ops": "key-admin-0123456789"}


def tenancy() -> Tenancy:
    return Tenancy.from_dict({
        "tenants": [{"name": "team-a", "key_sha256": hash_key(KEYS["team-a"]), "tasks": ["alpha", "gamma", "full"]},
                    {"name": "team-b", "key_sha256": hash_key(KEYS["team-b"]), "tasks": ["beta", "delta", "new-*"]}],
        "admins": [{"name": "ops", "key_sha256": hash_key(KEYS["ops"])}]})


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def make_engine(directory, **config) -> MultiTenantEngine:
    config = {"max_pixels": 4_000_000, **config}
    return MultiTenantEngine(tiny_base(), directory, EngineConfig(**config))


def detect(client, task, who="team-a", image=None, **fields):
    files = {"image": ("x.png", image if image is not None else image_bytes(96, 64), "image/png")}
    data = {"threshold": "0.0", **{k: str(v) for k, v in fields.items()}}
    return client.post(f"/v1/tasks/{task}/detect", files=files, data=data, headers=auth(who))


def assert_same(batched, single, tol=1e-4):
    assert batched.task == single.task and batched.adapter_version == single.adapter_version
    assert len(batched.detections) == len(single.detections) > 0
    for b, s in zip(batched.detections, single.detections):
        assert b["category"] == s["category"]
        assert b["score"] == pytest.approx(s["score"], abs=tol)
        assert b["bbox"] == pytest.approx(s["bbox"], abs=1e-3)
