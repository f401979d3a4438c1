"""The Ray Serve deployment end to end on a local Ray instance (2 CPUs): same HTTP contract, multiplexed tasks."""
import base64
import os
import socket
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from adapt.serve.app import HTTPLimits  # noqa: E402
from adapt.serve.engine import EngineConfig  # noqa: E402
from adapt.serve.tenancy import hash_key  # noqa: E402
from adapt.serve.testing import image_bytes, tiny_base, write_adapter  # noqa: E402
from backbone.checkpoints import save_model  # noqa: E402
from backbone.processor import GLIPProcessor  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    from adapt.serve.ray_app import build_app, run

    root = tmp_path_factory.mktemp("ray")
    base = tiny_base()
    save_model(base, root / "tiny.safetensors")
    processor = GLIPProcessor.from_config(base.config)
    adapters = root / "adapters"
    write_adapter(base, processor, adapters, "alpha", ["cat", "dog"], seed=1)
    write_adapter(base, processor, adapters, "beta", ["car"], strategy="lora", seed=2)
    tenancy = {"tenants": [{"name": "a", "key_sha256": hash_key("key-a"), "tasks": ["alpha"]},
                           {"name": "b", "key_sha256": hash_key("key-b"), "tasks": ["beta"]}],
               "admins": [{"name": "ops", "key_sha256": hash_key("key-ops")}]}
    port = free_port()
    # A loaded machine (CI neighbours) can keep the HTTP proxy from answering Serve's 5 s readiness check
    # three times, after which Serve kills it; give it a minute. Local Ray processes inherit this env.
    patience = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    saved = {name: os.environ.get(name) for name in patience}
    os.environ.update(patience)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **patience}})
    try:
        app = build_app(base=str(root / "tiny.safetensors"), adapters_dir=adapters,
                        engine_config=EngineConfig(max_batch=4, batch_window_ms=20, max_pixels=4_000_000),
                        tenancy=tenancy, limits=HTTPLimits(max_body_bytes=300_000), model_cpus=1, threads=1)
        run(app, port=port, blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, adapters
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        serve.shutdown()
        ray.shutdown()


def test_ray_deployment_serves_the_same_contract(ray_server):
    url, adapters = ray_server
    png = image_bytes(120, 80, seed=4)
    with httpx.Client(base_url=url, timeout=60) as c:
        a = c.post("/v1/tasks/alpha/detect", files={"image": png}, data={"threshold": "0.0", "top_k": "5"},
                   headers={"Authorization": "Bearer key-a"})
        assert a.status_code == 200, a.text
        body = a.json()
        assert body["task"] == "alpha" and body["image"] == {"width": 120, "height": 80}
        assert 0 < len(body["detections"]) <= 5 and {d["category"] for d in body["detections"]} <= {"cat", "dog"}
        b = c.post("/v1/tasks/beta/detect", json={"image": base64.b64encode(png).decode(), "threshold": 0.0},
                   headers={"X-API-Key": "key-b"})
        assert b.status_code == 200 and b.json()["strategy"] == "lora"
        assert {d["category"] for d in b.json()["detections"]} == {"car"}

        # Same answers as the engine in this process.
        from adapt.serve.engine import EngineConfig, MultiTenantEngine

        local = MultiTenantEngine(tiny_base(), adapters, EngineConfig())
        expected = local.detect("alpha", png, threshold=0.0, top_k=5)
        assert [d["category"] for d in body["detections"]] == [d["category"] for d in expected.detections]
        assert [d["score"] for d in body["detections"]] == pytest.approx([d["score"] for d in expected.detections],
                                                                         abs=1e-4)

        # The error contract: other tenant's task, bad key, non-image, malformed JSON.
        assert c.post("/v1/tasks/beta/detect", files={"image": png},
                      headers={"Authorization": "Bearer key-a"}).json()["error"]["code"] == "unknown_task"
        assert c.post("/v1/tasks/alpha/detect", files={"image": png}).status_code == 401
        bad = c.post("/v1/tasks/alpha/detect", files={"image": b"not an image"}, headers={"X-API-Key": "key-a"})
        assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_image")
        broken = c.post("/v1/tasks/alpha/detect", content=b"{", headers={"X-API-Key": "key-a",
                                                                          "Content-Type": "application/json"})
        assert broken.status_code == 400
        assert [t["name"] for t in c.get("/v1/tasks", headers={"X-API-Key": "key-b"}).json()["tasks"]] == ["beta"]
        assert "adapt_batch_size_count" in c.get("/metrics", headers={"X-API-Key": "key-ops"}).text
