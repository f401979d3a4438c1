"""A fair share for every tenant: per-tenant bounded queues, batches by fair queuing over measured compute,
429 + Retry-After for the tenant over its share, and a flooding tenant that never makes another one fail."""
import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from adapt.adapter import save_adapter  # noqa: E402
from adapt.serve.admission import FairQueue, QueueFull, TenantOverShare  # noqa: E402
from adapt.serve.app import serve_engine  # noqa: E402
from adapt.serve.engine import DetectParams, EngineConfig, MultiTenantEngine  # noqa: E402
from adapt.serve.tenancy import Tenancy, hash_key  # noqa: E402
from adapt.serve.testing import heaviest_adapter, image_bytes, serve_in_thread, tiny_base, write_adapter  # noqa: E402
from backbone.processor import GLIPProcessor  # noqa: E402

from tests._serve_helpers import KEYS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters")
    base = tiny_base()
    processor = GLIPProcessor.from_config(base.config)
    write_adapter(base, processor, directory, "alpha", ["cat", "dog"])
    bounds = EngineConfig()  # B's adapter: the largest LoRA rank and the longest prompt the server accepts
    heavy = heaviest_adapter(base, processor, "heavy", rank=bounds.max_lora_rank, max_tokens=bounds.max_prompt_tokens)
    assert heavy.input_ids.shape[1] > 200 and heavy.lora_config["r"] == bounds.max_lora_rank
    save_adapter(heavy, directory / "heavy.safetensors")
    return directory


def tenancy() -> Tenancy:
    return Tenancy.from_dict({
        "tenants": [{"name": "team-a", "key_sha256": hash_key(KEYS["team-a"]), "tasks": ["alpha"]},
                    {"name": "team-b", "key_sha256": hash_key(KEYS["team-b"]), "tasks": ["heavy"]}],
        "admins": [{"name": "ops", "key_sha256": hash_key(KEYS["ops"])}]})


# ------------------------------------------------------------------------------------------ the scheduler


def test_each_tenant_has_its_own_bounded_queue_and_the_fullest_makes_room():
    queue = FairQueue(max_total=4, per_tenant=3)
    for i in range(3):
        assert queue.put("b", f"b{i}") is None
    with pytest.raises(TenantOverShare, match="at most 3 per tenant") as over:
        queue.put("b", "b3")
    assert over.value.retry_after_s >= 1
    assert queue.put("a", "a0") is None  # B's backlog does not touch A's room
    assert queue.put("c", "c0") == "b2"  # the queue is full: the tenant holding the most loses its newest
    with pytest.raises(TenantOverShare, match="no fewer than any other"):
        queue.put("c", "c1")  # B holds 2, C 1: C would become the one over its share
    assert queue.put("d", "d0") == "b1"  # everyone holds 1 now
    with pytest.raises(QueueFull) as full:
        queue.put("e", "e0")
    assert type(full.value) is QueueFull  # no tenant holds more than E's share: overload, not E's fault
    assert sorted(item for _, item in queue.take(10, 0.0)) == ["a0", "b0", "c0", "d0"] and len(queue) == 0


def test_batches_share_measured_compute_not_request_counts():
    queue = FairQueue(max_total=100, per_tenant=50)
    queue.charge({"light": 1}, 0.1)  # what single-tenant batches measured: B's requests cost 10x A's
    queue.charge({"heavy": 1}, 1.0)
    for i in range(40):
        queue.put("light", i)
        queue.put("heavy", i)
    served = []
    for _ in range(22):
        [(tenant, _)] = queue.take(1, 0.0)
        served.append(tenant)
        queue.charge({tenant: 1}, 0.1 if tenant == "light" else 1.0)
    assert served.count("heavy") == 2 and served.count("light") == 20  # equal compute: 2.0 s each
    # A mixed batch is split by the tenants' measured cost per request, not evenly.
    split = queue.charge({"light": 1, "heavy": 1}, 1.1)
    assert split["heavy"] == pytest.approx(1.0, rel=0.05) and split["light"] == pytest.approx(0.1, rel=0.05)


def test_a_light_tenant_never_waits_on_a_long_heavy_batch_nor_shares_its_pass():
    queue = FairQueue(max_total=100, per_tenant=50)
    queue.put("light", "l0")
    queue.take(1, 0.0)
    queue.charge({"light": 1}, 0.1)  # light is active
    queue.charge({"heavy": 1}, 1.0)
    for i in range(8):
        queue.put("heavy", f"h{i}")
    assert [item for _, item in queue.take(8, 0.0)] == ["h0"]  # one heavy request at a time, not 8 s of them
    queue.put("light", "l1")
    queue.put("heavy", "h8")
    assert sorted(item for _, item in queue.take(8, 0.0)) == ["h1", "l1"]  # light ones still fill the batch
    picked = [("heavy", "h1"), ("light", "l1"), ("fresh", "f0"), ("light", "l2")]  # a batch in fair order
    runs = queue.runs(picked)  # parted by cost, cheapest first (an unmeasured tenant joins the cheapest)
    assert [[item for _, item in run] for run in runs] == [["f0", "l1", "l2"], ["h1"]]
    # A flooding tenant of the same cost as a light user runs after it, in its own pass.
    queue = FairQueue(max_total=100, per_tenant=50)
    queue.charge({"flood": 1}, 0.1)
    for i in range(6):
        queue.put("flood", f"x{i}")
    queue.put("light", "l3")
    picked = queue.take(4, 0.0)
    assert [[item for _, item in run] for run in queue.runs(picked)] == [["l3"], ["x0", "x1", "x2"]]
    # Once the light user is measured, a flood of the same cost runs one request per batch while it is about,
    # so the light user's next request waits for one request, not for a batch of the flood.
    queue.charge({"light": 1}, 0.1)
    queue.charge({"flood": 3}, 0.3)
    assert [item for _, item in queue.take(4, 0.0)] == ["x3"]
    # Without a light user about, the flood batches fully.
    queue = FairQueue(max_total=100, per_tenant=50)
    queue.charge({"flood": 1}, 0.1)
    for i in range(6):
        queue.put("flood", f"x{i}")
    assert len(queue.take(4, 0.0)) == 4


def test_an_idle_tenant_banks_no_credit():
    queue = FairQueue(max_total=100, per_tenant=50)
    for i in range(10):
        queue.put("busy", i)
    for _ in range(5):
        [(tenant, _)] = queue.take(1, 0.0)
        queue.charge({tenant: 1}, 1.0)
    for i in range(5):  # idle until now: it starts level with the busy tenant, not 5 s of compute ahead
        queue.put("late", i)
    order = [tenant for tenant, _ in queue.take(4, 0.0)]
    assert order == ["busy", "late", "busy", "late"]  # alternating, not late four times first
    # Nor is a tenant that had the machine to itself behind: when others arrive, they start level with it.
    queue = FairQueue(max_total=100, per_tenant=50)
    for i in range(20):
        queue.put("solo", i)
        queue.take(1, 0.0)
        queue.charge({"solo": 1}, 1.0)  # 20 s of compute, nobody else waiting
    for i in range(10):
        queue.put("newcomer", i)
    queue.put("solo", 20)
    assert "solo" in [tenant for tenant, _ in queue.take(2, 0.0)]  # not after 20 s of the newcomer's requests


# --------------------------------------------------------------------------------------------- over HTTP


def test_a_tenant_over_its_share_gets_429_with_retry_after(adapters_dir):
    engine = MultiTenantEngine(tiny_base(), adapters_dir, EngineConfig(tenant_queue=2, max_batch=1))
    app = serve_engine(engine, tenancy())
    with serve_in_thread(app) as url:
        release = threading.Event()
        original = engine._process
        engine._process = lambda batch: (release.wait(30), original(batch))
        image, params = engine.prepare(image_bytes()), DetectParams(0.0, 3)
        held = [engine.submit("heavy", image, params, tenant="team-b")]
        deadline = time.monotonic() + 10
        while engine._queue.waiting("team-b") and time.monotonic() < deadline:  # the batcher holds it
            time.sleep(0.01)
        held += [engine.submit("heavy", image, params, tenant="team-b") for _ in range(2)]  # B's share: 2 waiting
        files = {"image": ("x.png", image_bytes(), "image/png")}
        r = httpx.post(f"{url}/v1/tasks/heavy/detect", files=files,
                       headers={"Authorization": f"Bearer {KEYS['team-b']}"}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "over_share"
        assert int(r.headers["Retry-After"]) >= 1 and "at most 2 per tenant" in r.json()["error"]["message"]
        release.set()
        assert all(f.result(30).task == "heavy" for f in held)
        a = httpx.post(f"{url}/v1/tasks/alpha/detect", files=files,
                       headers={"Authorization": f"Bearer {KEYS['team-a']}"}, timeout=30)
        assert a.status_code == 200
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}).text
    assert 'adapt_rejected_total{reason="tenant_over_share"} 1.0' in text
    assert 'adapt_tenant_compute_seconds_total{tenant="team-a"}' in text
    assert 'adapt_tenant_requests_total{tenant="team-b"} 3.0' in text


def test_a_flooding_tenant_never_makes_another_fail(adapters_dir):
    """B floods with its heaviest allowed adapter at 10x A's rate (open loop: 40 and 4 requests a second; B's come in
    bursts of 20 every half second, so each burst overflows B's share however fast the machine serves). The global
    queue is smaller than a burst, so without per-tenant queues A would be refused or expire behind B; with them,
    only B is refused."""
    config = EngineConfig(max_batch=4, batch_window_ms=2.0, max_queue=8, tenant_queue=4, deadline_s=20.0)
    engine = MultiTenantEngine(tiny_base(), adapters_dir, config)
    image = image_bytes(96, 64, seed=1)

    async def open_loop(url: str) -> list[tuple[str, int]]:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=256)) as client:
            async def call(tenant: str, task: str, at_s: float) -> tuple[str, int]:
                await asyncio.sleep(at_s)
                try:
                    r = await client.post(f"/v1/tasks/{task}/detect", files={"image": ("x.png", image, "image/png")},
                                          data={"threshold": "0.0"},
                                          headers={"Authorization": f"Bearer {KEYS[tenant]}"})
                    return tenant, r.status_code
                except httpx.HTTPError:
                    return tenant, -1

            calls = [call("team-a", "alpha", 0.5 + i * 0.25) for i in range(12)]
            calls += [call("team-b", "heavy", (i // 20) * 0.5) for i in range(150)]
            return await asyncio.gather(*calls)

    with serve_in_thread(serve_engine(engine, tenancy())) as url:
        outcomes = asyncio.run(open_loop(url))
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}).text
    a = [status for tenant, status in outcomes if tenant == "team-a"]
    b = [status for tenant, status in outcomes if tenant == "team-b"]
    assert a == [200] * 12  # A: 0 failures
    assert b.count(429) > 0 and set(b) <= {200, 429}  # B alone pays for its flood; none of its accepted requests expire
    assert 'adapt_rejected_total{reason="tenant_over_share"}' in text and 'reason="queue_full"' not in text
    for tenant in ("team-a", "team-b"):
        assert f'adapt_tenant_compute_seconds_total{{tenant="{tenant}"}}' in text
