"""Issue #11: no tenant can break another. Each broken adapter and each hostile input is fed while a healthy
tenant keeps calling; the healthy tenant must see 0 failures, and the user sees a 4xx naming the fix."""
import contextlib
import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from adapt.adapter import AdapterError, save_adapter  # noqa: E402
from adapt.serve.engine import AdapterFailed, DetectParams  # noqa: E402
from adapt.serve.pool import AdapterQuarantined  # noqa: E402
from adapt.serve.testing import FAULTY_KINDS, faulty_adapter_bytes, image_bytes, random_adapter, tiny_base  # noqa: E402
from tests._serve_helpers import auth, detect, make_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def healthy_tenant(client, task="beta", who="team-b"):
    """A tenant calling its task in a loop for the duration of the block; it must never fail."""
    statuses, stop = [], threading.Event()

    def loop():
        while not stop.is_set() or len(statuses) < 2:
            statuses.append(detect(client, task, who=who).status_code)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(60)
    assert statuses and set(statuses) == {200}, statuses


@pytest.mark.parametrize("kind", FAULTY_KINDS)
def test_broken_upload_is_refused_and_the_old_file_stays(client, processor, adapters_dir, kind):
    data = faulty_adapter_bytes(tiny_base(), processor, kind)
    target = adapters_dir / "alpha.safetensors"
    before = target.read_bytes()
    with healthy_tenant(client):
        r = client.put("/v1/adapters/alpha", content=data, headers=auth("ops"))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter", r.text
        message = r.json()["error"]["message"]
        assert "'alpha'" in message and str(adapters_dir) not in message and ".upload" not in message
        assert target.read_bytes() == before  # byte-identical
        assert detect(client, "alpha").status_code == 200  # still served, the old version
    assert not [p for p in adapters_dir.iterdir() if p.name.startswith(".")]  # no staged copy left


@pytest.mark.parametrize("kind", ["p0_batch_2", "token_ids_float", "unnamed_category", "nan_p0", "lora_wrong_rank"])
def test_broken_adapter_in_the_folder_fails_only_its_own_task(client, processor, adapters_dir, kind):
    path = adapters_dir / "new-broken.safetensors"
    path.write_bytes(faulty_adapter_bytes(tiny_base(), processor, kind))
    try:
        with healthy_tenant(client):
            for _ in range(3):
                r = detect(client, "new-broken", who="team-b")
                assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_refused", r.text
                assert "'new-broken'" in r.json()["error"]["message"]
        listed = {a["name"]: a for a in client.get("/v1/adapters", headers=auth("ops")).json()["adapters"]}
        assert listed["new-broken"]["status"] == "refused" and listed["alpha"]["status"] == "ok"
    finally:
        path.unlink()


def test_cli_refuses_every_broken_adapter(processor, tmp_path):
    for kind in FAULTY_KINDS:
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(faulty_adapter_bytes(tiny_base(), processor, kind))
        from adapt.adapter import load_adapter

        with pytest.raises(AdapterError):
            load_adapter(path, base=tiny_base())


def corrupt(engine, task):
    """Make a loaded adapter fail at run time although its file passed validation (a fault nobody foresaw)."""
    entry = engine.pool.get(task)
    hidden = entry.adapter.prompt.hidden[..., :-1]
    entry.adapter.prompt = type(entry.adapter.prompt)(hidden, hidden, entry.adapter.prompt.mask)
    return entry


def test_a_failing_batch_is_retried_per_adapter_and_the_faulty_one_is_quarantined(adapters_dir, processor):
    engine = make_engine(adapters_dir)
    image = engine.prepare(image_bytes(96, 64))
    params = DetectParams(threshold=0.0, top_k=5)
    healthy = {task: engine.run([(task, image, params)])[0] for task in ("beta", "gamma", "delta")}
    corrupt(engine, "alpha")
    for attempt in range(2):
        results = engine.run([("alpha", image, params), *((t, image, params) for t in healthy)])
        assert isinstance(results[0], AdapterFailed) and "'alpha'" in str(results[0])
        for task, result in zip(healthy, results[1:]):
            assert result.detections == healthy[task].detections  # the others answered as if alone
    assert "quarantined" in str(results[0])
    [refused] = engine.run([("alpha", image, params)])
    assert isinstance(refused, AdapterQuarantined) and "upload a new version" in str(refused)
    good = save_adapter(random_adapter(tiny_base(), processor, "alpha", ["cat", "dog"], seed=11),
                        adapters_dir.parent / "alpha-v2.safetensors").read_bytes()
    original = (adapters_dir / "alpha.safetensors").read_bytes()
    try:
        engine.pool.put("alpha", good)  # replaced: a new version, out of quarantine
        assert not isinstance(engine.run([("alpha", image, params)])[0], Exception)
    finally:
        engine.pool.put("alpha", original)


def test_runtime_fault_over_http_fails_only_the_faulty_tenant(client):
    detect(client, "alpha")
    corrupt(client.engine, "alpha")
    with healthy_tenant(client):
        codes = [detect(client, "alpha").json()["error"]["code"] for _ in range(3)]
    assert codes[0] == "adapter_failed" and codes[-1] == "adapter_quarantined", codes
    assert client.engine.metrics.value("adapt_adapter_failures_total", task="alpha") == 2


def test_names_with_a_newline_are_refused_and_metrics_stay_parseable(client, adapters_dir):
    stored = (adapters_dir / "alpha.safetensors").read_bytes()
    for name in ("x%0a", "x%0A.safetensors", "x%0d", "new-x%0a"):
        r = client.put(f"/v1/adapters/{name}", content=stored, headers=auth("ops"))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_name", name
    assert not [p for p in adapters_dir.iterdir() if "\n" in p.name or "\r" in p.name]
    assert detect(client, "new-%22quote%5C%0a", who="team-b").status_code == 404
    text = client.get("/metrics", headers=auth("ops")).text
    families = {f.name for f in text_string_to_metric_families(text)}  # parses: no label broke a line
    assert {"adapt_requests", "adapt_batch_size", "adapt_queue_depth"} <= families


@pytest.mark.parametrize("case,status,code,needle", [
    ("deep_json", 400, "json_too_deep", "nests deeper"),
    ("deep_object", 400, "json_too_deep", "nests deeper"),
    ("nan_threshold_json", 422, "invalid_request", "finite"),
    ("inf_threshold_json", 422, "invalid_request", "finite"),
    ("nan_threshold_form", 422, "invalid_request", "finite"),
    ("nan_timeout", 422, "invalid_header", "X-Timeout-Ms"),
    ("inf_timeout", 422, "invalid_header", "X-Timeout-Ms"),
    ("negative_timeout", 422, "invalid_header", "X-Timeout-Ms"),
    ("bad_content_length", 400, "invalid_header", "Content-Length"),
])
def test_hostile_input_gets_a_4xx_while_others_are_served(client, case, status, code, needle):
    url, headers = "/v1/tasks/alpha/detect", auth("team-a")
    png = image_bytes(96, 64)
    json_headers = {**headers, "Content-Type": "application/json"}
    with healthy_tenant(client):
        if case == "deep_json":
            r = client.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=json_headers)
        elif case == "deep_object":
            r = client.post(url, content=b'{"a":' * 40_000 + b"1" + b"}" * 40_000, headers=json_headers)
        elif case in ("nan_threshold_json", "inf_threshold_json"):
            value = b"NaN" if case.startswith("nan") else b"Infinity"
            r = client.post(url, content=b'{"image": "aGk=", "threshold": ' + value + b"}", headers=json_headers)
        elif case == "nan_threshold_form":
            r = client.post(url, files={"image": png}, data={"threshold": "nan"}, headers=headers)
        elif case == "bad_content_length":
            r = client.post(url, content=png, headers={**json_headers, "Content-Length": "12abc"})
        else:
            value = {"nan_timeout": "nan", "inf_timeout": "inf", "negative_timeout": "-5"}[case]
            r = client.post(url, files={"image": png}, headers={**headers, "X-Timeout-Ms": value})
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and needle in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------------------------- LoRA unmerged


def test_lora_is_served_unmerged_and_batched_equals_single(tmp_path, processor):
    base = tiny_base()
    tasks = [f"lora-{i}" for i in range(3)]
    for i, task in enumerate(tasks):
        save_adapter(random_adapter(base, processor, task, ["shark", "whale", "fish"][: i + 1], strategy="lora",
                                  seed=20 + i), tmp_path / f"{task}.safetensors")
    save_adapter(random_adapter(base, processor, "prompt", ["cat"], seed=30), tmp_path / "prompt.safetensors")
    engine = make_engine(tmp_path)
    entry = engine.pool.get("lora-0")
    assert entry.overrides == {} and entry.lora is not None  # no dense weight copy
    A, B = entry.lora.down["head.dot_product_projection_text"], entry.lora.up["head.dot_product_projection_text"]
    assert A.shape[0] == B.shape[1] == 4  # kept at rank r
    prompt_bytes = sum(t.nbytes for t in (entry.prompt.hidden, entry.prompt.mask, entry.adapter.positive_map,
                                          entry.adapter.input_ids))
    assert entry.nbytes == prompt_bytes + A.nbytes + B.nbytes  # r x (in + out) floats, not out x in
    images = [engine.prepare(image_bytes(96, 64, seed=i)) for i in range(2)]
    params = DetectParams(threshold=0.0, top_k=20)
    items = [(task, images[i % 2], params) for i, task in enumerate([*tasks, "prompt", *tasks])]
    for item, batched in zip(items, engine.run(items)):
        [single] = engine.run([item])
        assert len(batched.detections) == len(single.detections) > 0
        for b, s in zip(batched.detections, single.detections):
            assert b["category"] == s["category"] and b["score"] == pytest.approx(s["score"], abs=1e-5)
            assert b["bbox"] == pytest.approx(s["bbox"], abs=1e-4)


def test_unmerged_lora_equals_the_merged_weights(tmp_path, processor):
    from adapt.adapter import apply_adapter, load_adapter

    base = tiny_base()
    path = save_adapter(random_adapter(base, processor, "lora", ["shark", "whale"], strategy="lora", seed=4),
                        tmp_path / "lora.safetensors")
    engine = make_engine(tmp_path)
    image = engine.prepare(image_bytes(96, 64))
    [served] = engine.run([("lora", image, DetectParams(threshold=0.0, top_k=20))])
    merged = tiny_base()
    adapter = load_adapter(path, base=merged)
    apply_adapter(merged, adapter)
    with torch.no_grad():
        outputs = merged(adapter.prompt, image.pixel_values[None], [image.image_size])
    final = engine.postprocessor(outputs, [adapter.positive_map])[0]
    keep = final.scores > 0.0
    assert [round(d["score"], 4) for d in served.detections] == [round(s, 4) for s in final.scores[keep][:20].tolist()]


# --------------------------------------------------------------------------------------------------- device


@pytest.mark.gpu
def test_one_serve_batch_on_cuda(adapters_dir):
    cpu = make_engine(adapters_dir, device="cpu")
    gpu = make_engine(adapters_dir, device="cuda")
    assert next(gpu.base.parameters()).device.type == "cuda"
    image = cpu.prepare(image_bytes(96, 64))
    items = [(task, image, DetectParams(threshold=0.0, top_k=10)) for task in ("alpha", "beta", "gamma", "delta")]
    for on_cpu, on_gpu in zip(cpu.run(items), gpu.run(items)):
        assert [d["category"] for d in on_gpu.detections] == [d["category"] for d in on_cpu.detections]
        assert [d["score"] for d in on_gpu.detections] == pytest.approx([d["score"] for d in on_cpu.detections],
                                                                         abs=1e-3)
    bf16 = make_engine(adapters_dir, device="cuda", dtype="bfloat16")
    assert all(not isinstance(r, Exception) for r in bf16.run(items))


def test_engine_refuses_a_device_it_lacks(adapters_dir):
    from backbone.device import DeviceError

    with pytest.raises(DeviceError, match="float16 runs on CUDA only"):
        make_engine(adapters_dir, device="cpu", dtype="float16")
    bf16 = make_engine(adapters_dir, device="cpu", dtype="bfloat16")  # autocast on CPU: runs, answers
    image = bf16.prepare(image_bytes(96, 64))
    assert all(not isinstance(r, Exception) for r in bf16.run([(t, image, DetectParams()) for t in ("alpha", "delta")]))
