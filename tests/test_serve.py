"""The multi-tenant server on the tiny random GLIP: batching invariants, the pool, tenancy, HTTP errors."""
import base64
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from adapt.adapter import save_adapter  # noqa: E402
from adapt.serve.app import serve_engine  # noqa: E402
from adapt.serve.engine import DetectParams  # noqa: E402
from adapt.serve.pool import InvalidAdapterName, validate_name  # noqa: E402
from adapt.serve.schemas import DetectResponse  # noqa: E402
from adapt.serve.tenancy import Tenancy  # noqa: E402
from adapt.serve.testing import bomb_bytes, image_bytes, random_adapter, tiny_base, write_adapter  # noqa: E402
from tests._serve_helpers import CATEGORIES, KEYS, assert_same, auth, detect, make_engine, tenancy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ the engine


def test_mixed_tenant_batch_equals_single_requests(adapters_dir):
    engine = make_engine(adapters_dir)
    assert engine.base.text is None  # prompt features come from adapters: the language backbone is gone
    # Two padded sizes (96x64 and 64x96 after resizing), prompts of 2 and 4 categories, all four strategies.
    images = [engine.prepare(image_bytes(w, h, seed=i)) for i, (w, h) in enumerate([(96, 64), (64, 96), (120, 80)])]
    params = DetectParams(threshold=0.0, top_k=20)
    items = [(task, images[i % 3], params) for i, task in enumerate(["alpha", "beta", "gamma", "delta"] * 2)]
    batched = engine.run(items)
    for item, result in zip(items, batched):
        [single] = engine.run([item])
        assert_same(result, single)
        names = CATEGORIES[item[0]][0]
        assert {d["category"] for d in result.detections} <= set(names)  # never another tenant's categories


def test_fixed_canvas_batches_all_sizes_and_still_matches(adapters_dir):
    engine = make_engine(adapters_dir, fixed_canvas=True)
    images = [engine.prepare(image_bytes(w, h, seed=i)) for i, (w, h) in enumerate([(96, 64), (64, 96)])]
    assert images[0].padded_shape == images[1].padded_shape == engine.canvas
    params = DetectParams(threshold=0.0, top_k=20)
    items = [("alpha", images[0], params), ("beta", images[1], params), ("gamma", images[1], params)]
    for item, result in zip(items, engine.run(items)):
        assert_same(result, engine.run([item])[0])


def test_batcher_merges_concurrent_requests_across_tenants(adapters_dir):
    engine = make_engine(adapters_dir, batch_window_ms=300.0, max_batch=4)
    image = engine.prepare(image_bytes(96, 64))
    params = DetectParams(threshold=0.0, top_k=5)
    expected = {task: engine.run([(task, image, params)])[0] for task in ("alpha", "beta", "gamma", "delta")}
    before = batch_stats(engine)
    with engine:
        futures = {task: engine.submit(task, image, params) for task in expected}
        results = {task: f.result(timeout=30) for task, f in futures.items()}
    after = batch_stats(engine)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 4)  # one batch of four tenants
    for task, result in results.items():
        assert_same(result, expected[task])


def batch_stats(engine) -> tuple[int, int]:
    lines = dict(line.rsplit(" ", 1) for line in engine.metrics.render().splitlines() if not line.startswith("#"))
    return int(float(lines.get("adapt_batch_size_count", 0))), int(float(lines.get("adapt_batch_size_sum", 0)))


def test_lru_evicts_by_bytes_and_reloads_transparently(adapters_dir):
    engine = make_engine(adapters_dir)
    one = engine.pool.get("alpha").nbytes
    engine.pool.max_bytes = one + 1  # room for one prompt adapter
    image = engine.prepare(image_bytes())
    first = engine.detect("alpha", image, threshold=0.0)
    engine.detect("beta", image, threshold=0.0)
    assert engine.pool.cached("alpha") is None and engine.pool.evictions >= 1
    misses = engine.pool.misses
    again = engine.detect("alpha", image, threshold=0.0)
    assert engine.pool.misses == misses + 1 and engine.pool.cached("alpha") is not None
    assert again.detections == first.detections
    assert engine.pool.cached_bytes <= engine.pool.max_bytes


def test_changed_file_is_reloaded(tmp_path, processor):
    base = tiny_base()
    write_adapter(base, processor, tmp_path, "task", ["cat"], seed=1)
    engine = make_engine(tmp_path)
    v1 = engine.detect("task", image_bytes(), threshold=0.0)
    write_adapter(tiny_base(), processor, tmp_path, "task", ["dog", "cat"], seed=2)
    v2 = engine.detect("task", image_bytes(), threshold=0.0)
    assert v1.adapter_version != v2.adapter_version
    assert {d["category"] for d in v2.detections} <= {"dog", "cat"} and "dog" in {d["category"] for d in v2.detections}


def test_uploads_while_serving_never_break_the_task(tmp_path, processor):
    base = tiny_base()
    good = []
    for seed in (1, 2):
        path = save_adapter(random_adapter(base, processor, "task", ["cat", "dog"], seed=seed), tmp_path / f"{seed}.st")
        good.append(path.read_bytes())
    engine = make_engine(tmp_path / "served")
    versions = {engine.pool.put("task", data).version for data in good}
    errors = []

    def uploader():
        for i in range(20):
            try:
                engine.pool.put("task", good[i % 2])
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                errors.append(error)
            try:
                engine.pool.put("task", good[i % 2][:-100])  # a broken upload: refused, old file kept
            except Exception:
                pass

    thread = threading.Thread(target=uploader)
    thread.start()
    image = engine.prepare(image_bytes())
    seen = set()
    while thread.is_alive():
        seen.add(engine.detect("task", image, threshold=0.0).adapter_version)
    thread.join()
    assert not errors and seen and seen <= versions
    assert engine.detect("task", image, threshold=0.0).adapter_version in versions


def test_adapter_names_are_validated():
    assert validate_name("icons-aquarium") == "icons-aquarium"
    for bad in ["../etc/passwd", "a/b", "", ".hidden", "UPPER", "x" * 65, "a\\b", "nul\x00", "x\n", "x\r", " x",
                "x\n.safetensors"]:
        with pytest.raises(InvalidAdapterName):
            validate_name(bad)


def test_key_files_store_digests_only():
    with pytest.raises(ValueError, match="plain-text"):
        Tenancy.from_dict({"tenants": [{"name": "x", "key": "secret", "tasks": ["*"]}]})
    t = tenancy()
    assert t.authenticate(KEYS["team-a"]).name == "team-a"
    assert t.authenticate("wrong") is None and t.authenticate(None) is None


# -------------------------------------------------------------------------------------------------- HTTP


def test_detect_multipart_and_json_agree_in_original_pixels(client):
    png = image_bytes(300, 200, seed=3)
    multipart = detect(client, "alpha", image=png, top_k=5)
    assert multipart.status_code == 200, multipart.text
    body = DetectResponse.model_validate(multipart.json())
    assert body.image.width == 300 and body.image.height == 200 and 0 < len(body.detections) <= 5
    assert body.strategy == "prompt-tune" and len(body.adapter_version) == 16
    for d in body.detections:
        x, y, w, h = d.bbox
        assert 0 <= x <= x + w <= 300 and 0 <= y <= y + h <= 200 and d.category in ("cat", "dog")
        assert d.category_id == ["cat", "dog"].index(d.category) + 1
    as_json = client.post("/v1/tasks/alpha/detect", headers=auth("team-a"),
                          json={"image": base64.b64encode(png).decode(), "threshold": 0.0, "top_k": 5})
    assert as_json.status_code == 200 and as_json.json() == multipart.json()


def test_tenants_see_and_call_only_their_tasks(client):
    listed = client.get("/v1/tasks", headers=auth("team-a")).json()
    assert [t["name"] for t in listed["tasks"]] == ["alpha", "full", "gamma"]
    assert [t["name"] for t in client.get("/v1/tasks", headers=auth("team-b")).json()["tasks"]] == ["beta", "delta"]
    assert len(client.get("/v1/tasks", headers=auth("ops")).json()["tasks"]) == 5
    foreign, missing = detect(client, "beta", who="team-a"), detect(client, "nosuch", who="team-a")
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "unknown_task"
    assert "beta" not in client.get("/metrics", headers=auth("team-a")).text  # 403, names nothing
    assert detect(client, "beta", who="team-b").status_code == 200


@pytest.mark.parametrize("case, status, code", [
    ("not_image", 422, "invalid_image"), ("truncated", 422, "invalid_image"), ("bomb", 413, "image_too_large"),
    ("oversized", 413, "body_too_large"), ("unknown_task", 404, "unknown_task"), ("bad_key", 401, "unauthorized"),
    ("no_key", 401, "unauthorized"), ("malformed_json", 400, "malformed_json"), ("bad_base64", 422, "invalid_base64"),
    ("bad_threshold", 422, "invalid_request"), ("no_image_field", 422, "invalid_request"),
    ("content_type", 415, "unsupported_media_type"), ("finetune", 422, "adapter_refused"),
    ("traversal", 404, "not_found"), ("bad_timeout", 422, "invalid_header"),
])
def test_bad_requests_get_the_right_json_error(client, case, status, code):
    png = image_bytes(96, 64)
    url, headers = "/v1/tasks/alpha/detect", auth("team-a")
    if case == "not_image":
        r = detect(client, "alpha", image=b"%PDF-1.4 definitely not an image" * 10)
    elif case == "truncated":
        r = detect(client, "alpha", image=png[: len(png) // 2])
    elif case == "bomb":
        r = detect(client, "alpha", image=bomb_bytes(4000))  # 16 Mpx > the 4 Mpx limit, ~2 kB on the wire
    elif case == "oversized":
        r = detect(client, "alpha", image=b"\0" * 400_000)
    elif case == "unknown_task":
        r = detect(client, "nope")
    elif case == "bad_key":
        r = client.post(url, files={"image": png}, headers={"X-API-Key": "guess"})
    elif case == "no_key":
        r = client.post(url, files={"image": png})
    elif case == "malformed_json":
        r = client.post(url, content=b'{"image": "abc",', headers={**headers, "Content-Type": "application/json"})
    elif case == "bad_base64":
        r = client.post(url, json={"image": "!!not base64!!"}, headers=headers)
    elif case == "bad_threshold":
        r = client.post(url, json={"image": base64.b64encode(png).decode(), "threshold": 7}, headers=headers)
    elif case == "no_image_field":
        r = client.post(url, data={"threshold": "0.5"}, files={"other": png}, headers=headers)
    elif case == "content_type":
        r = client.post(url, content=png, headers={**headers, "Content-Type": "image/png"})
    elif case == "finetune":
        r = detect(client, "full")
        assert "load it as its own model" in r.json()["error"]["message"]
    elif case == "traversal":
        r = detect(client, "..%2F..%2Fetc%2Fpasswd")
    elif case == "bad_timeout":
        r = client.post(url, files={"image": png}, headers={**headers, "X-Timeout-Ms": "soon"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert detect(client, "alpha").status_code == 200  # the server carries on


def test_internal_errors_are_json_500_and_the_server_survives(client):
    original = client.engine.base.fuse_and_predict
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom")

    client.engine.base.fuse_and_predict = broken
    try:
        r = detect(client, "alpha")
    finally:
        client.engine.base.fuse_and_predict = original
    assert calls and r.status_code == 500 and r.json()["error"]["code"] == "adapter_failed"
    assert "'alpha'" in r.json()["error"]["message"]
    assert detect(client, "alpha").status_code == 200


def blocked(engine):
    """Make the batcher hang on its next batch until the returned event is set."""
    release = threading.Event()
    original = engine._process

    def slow(batch):
        release.wait(30)
        original(batch)

    engine._process = slow
    return release


def test_full_queue_answers_503_with_retry_after(adapters_dir):
    engine = make_engine(adapters_dir, max_queue=1, max_batch=1, batch_window_ms=0.0)
    with TestClient(serve_engine(engine, tenancy())) as c:
        release = blocked(engine)
        image, params = engine.prepare(image_bytes()), DetectParams(0.0, 3)
        running = engine.submit("alpha", image, params)
        deadline = time.monotonic() + 10
        while len(engine._queue) and time.monotonic() < deadline:  # wait until the batcher holds it
            time.sleep(0.01)
        queued = engine.submit("alpha", image, params)  # fills the queue
        r = detect(c, "alpha")
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["Retry-After"]) >= 1
        release.set()
        running.result(30), queued.result(30)
        assert detect(c, "alpha").status_code == 200
        assert 'adapt_rejected_total{reason="queue_full"} 1' in c.get("/metrics", headers=auth("ops")).text


def test_request_deadline_answers_504(adapters_dir):
    engine = make_engine(adapters_dir)
    with TestClient(serve_engine(engine, tenancy())) as c:
        release = blocked(engine)
        r = c.post("/v1/tasks/alpha/detect", files={"image": image_bytes()},
                   headers={**auth("team-a"), "X-Timeout-Ms": "200"})
        release.set()
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert detect(c, "alpha").status_code == 200


def test_upload_is_verified_and_replaces_atomically(client, processor, adapters_dir, tmp_path):
    base = tiny_base()
    path = tmp_path / "up.safetensors"
    save_adapter(random_adapter(base, processor, "new-task", ["kite"], seed=5), path)
    first = client.put("/v1/adapters/new-task", content=path.read_bytes(), headers=auth("ops"))
    assert first.status_code == 201 and first.json()["replaced"] is False
    v1 = first.json()["adapter_version"]
    served = detect(client, "new-task", who="team-b")
    assert served.status_code == 200 and served.json()["adapter_version"] == v1
    save_adapter(random_adapter(base, processor, "new-task", ["kite", "balloon"], seed=6), path)
    second = client.put("/v1/adapters/new-task", files={"adapter": path.read_bytes()}, headers=auth("ops"))
    assert second.status_code == 200 and second.json()["replaced"] is True and second.json()["adapter_version"] != v1
    v2 = second.json()["adapter_version"]
    stored = (adapters_dir / "new-task.safetensors").read_bytes()

    torch.manual_seed(1)
    other_base = tiny_base(seed=1)  # a different base: wrong fingerprint
    save_adapter(random_adapter(other_base, processor, "new-task", ["kite"]), tmp_path / "foreign.safetensors")
    bad_uploads = {
        "garbage": (b"this is not safetensors at all", 422, "invalid_adapter"),
        "truncated": (stored[: len(stored) // 2], 422, "invalid_adapter"),
        "foreign base": ((tmp_path / "foreign.safetensors").read_bytes(), 422, "invalid_adapter"),
        "finetune": ((adapters_dir / "full.safetensors").read_bytes(), 422, "invalid_adapter"),
        "too big": (b"\0" * 250_000, 413, "body_too_large"),
    }
    for label, (data, status, code) in bad_uploads.items():
        r = client.put("/v1/adapters/new-task", content=data, headers=auth("ops"))
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), label
        assert (adapters_dir / "new-task.safetensors").read_bytes() == stored, label  # old version intact
        assert detect(client, "new-task", who="team-b").json()["adapter_version"] == v2, label
    assert "load it as its own model" in client.put("/v1/adapters/x", content=bad_uploads["finetune"][0],
                                                    headers=auth("ops")).json()["error"]["message"]
    assert client.put("/v1/adapters/Bad..Name", content=stored, headers=auth("ops")).status_code == 422
    assert client.put("/v1/adapters/new-task", content=stored, headers=auth("team-b")).status_code == 403
    assert not [p for p in adapters_dir.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert client.delete("/v1/adapters/new-task", headers=auth("team-b")).status_code == 403
    assert client.delete("/v1/adapters/new-task", headers=auth("ops")).json() == {"deleted": "new-task"}
    assert detect(client, "new-task", who="team-b").status_code == 404
    assert client.delete("/v1/adapters/new-task", headers=auth("ops")).status_code == 404


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    detect(client, "alpha")
    detect(client, "nope")
    text = client.get("/metrics", headers=auth("ops")).text
    for line in ['adapt_requests_total{code="200",task="alpha"}', 'adapt_requests_total{code="404",task="(unknown)"}',
                 'adapt_request_seconds_count{task="alpha"}', "adapt_batch_size_count", "adapt_queue_depth 0.0",
                 "adapt_adapter_cache_hits_total", "adapt_adapter_cache_misses_total", "adapt_adapter_cache_bytes"]:
        assert line in text, line
    assert client.get("/metrics", headers=auth("team-a")).status_code == 403


def test_openapi_matches_the_routes(client):
    spec = client.get("/openapi.json").json()
    routes = {(r.path, m) for r in client.app.routes if hasattr(r, "methods") and not r.path.startswith(("/doc",
              "/openapi", "/redoc")) and r.path != "/" for m in r.methods - {"HEAD"}}
    documented = {(p, m.upper()) for p, ops in spec["paths"].items() for m in ops}
    assert routes == documented == {
        ("/v1/tasks/{task}/detect", "POST"), ("/v1/tasks", "GET"), ("/v1/adapters/{name}", "PUT"),
        ("/v1/adapters/{name}", "DELETE"), ("/v1/adapters", "GET"), ("/healthz", "GET"), ("/readyz", "GET"),
        ("/metrics", "GET")}
    op = spec["paths"]["/v1/tasks/{task}/detect"]["post"]
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/DetectResponse")
    assert {"400", "401", "404", "413", "422", "503", "504"} <= set(op["responses"])
    for name in ("DetectForm", "DetectJSON", "DetectResponse", "Detection", "ErrorResponse", "AdapterInfo"):
        assert name in spec["components"]["schemas"], name
    # A real response has exactly the documented fields.
    body = detect(client, "alpha").json()
    schema = spec["components"]["schemas"]["DetectResponse"]
    assert set(body) == set(schema["properties"])
    assert set(body["detections"][0]) == set(spec["components"]["schemas"]["Detection"]["properties"])
    error = detect(client, "nope").json()
    assert set(error) == {"error"} and set(error["error"]) == {"code", "message"}
    assert json.dumps(spec)  # serialisable


def test_cli_serve_refuses_bad_settings_before_loading(tmp_path):
    from typer.testing import CliRunner

    from adapt.cli import app

    plain = tmp_path / "keys.json"
    plain.write_text(json.dumps({"tenants": [{"name": "x", "key": "secret", "tasks": ["*"]}]}))
    runner = CliRunner()
    for args, message in [(["--max-batch", "0"], "max_batch=0"), (["--keys", str(tmp_path / "none.json")], "none.json"),
                          (["--keys", str(plain)], "plain-text")]:
        result = runner.invoke(app, ["serve", "--adapters", str(tmp_path), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_steady_malloc_pins_glibc_allocator_settings():
    import platform

    from adapt.serve.allocator import steady_malloc

    # On glibc the settings must take (mallopt returns 1); elsewhere the call reports that it did nothing.
    assert steady_malloc() is (platform.libc_ver()[0] == "glibc")
