"""Validation that covers every byte of an adapter, the server's bounds on one adapter's cost, run-time faults of
absurd values, and bounded memory for adapters in the folder. Each refusal is checked from what the user sees
(a 4xx naming the fix and the server's limit) and what the healthy tenant sees (the old version, still served)."""
import gc
import json
import os
import time
import tracemalloc

import pytest
import torch

pytest.importorskip("fastapi")
from safetensors.torch import save  # noqa: E402

from adapt.adapter import (LORA_UPDATE_FACTOR, PROMPT_NORM_FACTOR, AdapterError, base_magnitudes,  # noqa: E402
                           load_adapter, save_adapter)
from adapt.serve.engine import AdapterFailed, DetectParams  # noqa: E402
from adapt.serve.pool import AdapterQuarantined  # noqa: E402
from adapt.serve.testing import image_bytes, random_adapter, tiny_base  # noqa: E402
from tests._serve_helpers import auth, detect, make_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def adapter_bytes(adapter, **meta_changes) -> bytes:
    meta = {**adapter.metadata(), **meta_changes}
    return save(adapter.tensors(), metadata=meta)


def lora(base, processor, task="lora", *, rank=4, alpha=4.0, update_ratio=None,
         module="head.dot_product_projection_text"):
    """A LoRA adapter on one module; with `update_ratio`, its update scale·B·A has exactly that multiple of the
    weight's Frobenius norm."""
    adapter = random_adapter(base, processor, task, ["cat", "dog"], strategy="lora", seed=5)
    weight = base.state_dict()[f"{module}.weight"]
    generator = torch.Generator().manual_seed(1)
    down = torch.randn(rank, weight.shape[1], generator=generator)
    up = torch.randn(weight.shape[0], rank, generator=generator)
    if update_ratio is not None:
        up *= update_ratio * float(weight.norm()) / (alpha / rank * float((up @ down).norm()))
    adapter.lora = {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    adapter.lora_config = {"r": rank, "alpha": alpha, "target_modules": [module]}
    return adapter


def put(client, name, data):
    return client.put(f"/v1/adapters/{name}", content=data, headers=auth("ops"))


def assert_refused_and_old_version_served(client, adapters_dir, data, needle, name="alpha"):
    target = adapters_dir / f"{name}.safetensors"
    before = target.read_bytes()
    r = put(client, name, data)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter", r.text
    assert needle in r.json()["error"]["message"], r.text
    assert target.read_bytes() == before  # byte-identical
    assert detect(client, name).status_code == 200
    listing = client.get("/v1/adapters", headers=auth("ops"))
    assert listing.status_code == 200 and all(a["status"] == "ok" for a in listing.json()["adapters"]
                                              if a["name"] != "full"), listing.text
    return r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ metadata text


def test_lone_surrogate_category_is_refused_and_everything_keeps_working(client, processor, adapters_dir):
    adapter = random_adapter(tiny_base(), processor, "alpha", ["cat", "dog"], seed=1)
    categories = json.dumps([{"name": "\ud800fish", "prefix": "", "suffix": ""}, {"name": "dog"}])
    assert "\\ud800" in categories  # ASCII JSON with a lone-surrogate escape, as a crafted upload carries it
    message = assert_refused_and_old_version_served(client, adapters_dir, adapter_bytes(adapter, categories=categories),
                                                    "lone surrogate")
    assert "U+D800" in message and "'categories'" in message


@pytest.mark.parametrize("field,value", [
    ("categories", json.dumps([{"name": "c\x1bat"}, {"name": "dog"}])),
    ("categories", json.dumps([{"name": "cat", "suffix": "a\nb"}, {"name": "dog"}])),
    ("prompt", "cat\x00. dog."),
    ("task", "alpha\r"),
    ("training", json.dumps({"note": "\udfff"})),
])
def test_control_characters_and_surrogates_anywhere_are_refused(client, processor, adapters_dir, field, value):
    adapter = random_adapter(tiny_base(), processor, "alpha", ["cat", "dog"], seed=1)
    assert_refused_and_old_version_served(client, adapters_dir, adapter_bytes(adapter, **{field: value}), "not text")


def test_free_text_records_may_hold_line_breaks_and_any_language(tmp_path, processor):
    base = tiny_base()
    adapter = random_adapter(base, processor, "t", ["poisson", "鯨"], seed=1)
    adapter.training = {"notes": "line 1\nline 2\tend", "by": "José 🐟"}
    path = save_adapter(adapter, tmp_path / "t.safetensors")
    loaded = load_adapter(path, base=base)
    assert loaded.training["notes"] == "line 1\nline 2\tend" and loaded.category_names == ["poisson", "鯨"]


# ---------------------------------------------------------------------------------------------- magnitudes


def test_p0_bound_covers_every_prompt_the_base_produces(processor):
    base = tiny_base()
    bound = base_magnitudes(base).prompt_norm
    prompts = [["cat"], ["traffic light", "person", "car", "bicycle"], ["a" * 40, "zebra crossing"]]
    longest = 0.0
    for categories in prompts:
        for tokens in processor.tokenize(categories):
            with torch.no_grad():
                hidden = base.encode_prompt(tokens.input_ids, tokens.attention_mask).hidden
            longest = max(longest, float(hidden.norm(dim=-1).max()))
    assert 0.5 * bound < longest <= bound * (1 + 1e-6)  # a bound (to float rounding), and not a loose one


def test_p0_of_1e38_and_lora_alpha_1e308_are_refused_at_upload(client, processor, adapters_dir):
    base = tiny_base()
    adapter = random_adapter(base, processor, "alpha", ["cat", "dog"], seed=1)
    adapter.prompt = type(adapter.prompt)(torch.full_like(adapter.prompt.hidden, 1e38),
                                          torch.full_like(adapter.prompt.hidden, 1e38), adapter.prompt.mask)
    assert_refused_and_old_version_served(client, adapters_dir, adapter_bytes(adapter), "P0 has a token of norm")
    huge = lora(base, processor, "alpha", alpha=1e308)
    assert_refused_and_old_version_served(client, adapters_dir, adapter_bytes(huge), "alpha/r")


def test_bounds_accept_what_training_produces_and_refuse_beyond(tmp_path, processor):
    base = tiny_base()

    def loads(adapter):
        path = save_adapter(adapter, tmp_path / "a.safetensors")
        try:
            load_adapter(path, base=base)
            return True
        except AdapterError as error:
            return str(error)

    tuned = random_adapter(base, processor, "p", ["cat", "dog"], seed=1, offset=3.0)  # a large prompt-tuning offset
    assert loads(tuned) is True
    far = random_adapter(base, processor, "p", ["cat", "dog"], seed=1)
    far.prompt = type(far.prompt)(far.prompt.hidden * 2 * PROMPT_NORM_FACTOR, far.prompt.embedded, far.prompt.mask)
    assert "over this base's bound" in loads(far)
    assert loads(lora(base, processor, update_ratio=0.95 * LORA_UPDATE_FACTOR)) is True  # up to 10x the weight
    too_far = lora(base, processor, update_ratio=1.05 * LORA_UPDATE_FACTOR)
    assert f"over {LORA_UPDATE_FACTOR:g}x the norm" in loads(too_far)
    assert loads(lora(base, processor, rank=8, alpha=1024.0 * 8, update_ratio=1.0)) is True
    assert "alpha/r" in loads(lora(base, processor, rank=8, alpha=1025.0 * 8, update_ratio=1.0))
    probe = random_adapter(base, processor, "lp", ["cat"], strategy="linear-probe", seed=2)
    probe.weights["head.log_scale"] = base.state_dict()["head.log_scale"] + 5.0  # temperature x e^5: trainable
    assert loads(probe) is True
    probe.weights["head.log_scale"] = torch.full((1,), -1e4)
    assert "'head.log_scale'" in loads(probe)


# ------------------------------------------------------------------------------------ one adapter's cost


def test_server_limits_on_rank_prompt_and_file_size_hold_at_upload_and_in_the_folder(tmp_path, processor):
    base = tiny_base()
    save_adapter(random_adapter(base, processor, "ok", ["cat"], seed=1), tmp_path / "ok.safetensors")
    wide = lora(base, processor, "wide", rank=9, alpha=9.0, update_ratio=1.0)
    save_adapter(wide, tmp_path / "wide.safetensors")
    long = random_adapter(base, processor, "long", ["cat", "dog", "bird", "fish"], seed=2)
    save_adapter(long, tmp_path / "long.safetensors")
    engine = make_engine(tmp_path, max_lora_rank=8, max_prompt_tokens=long.prompt.length - 1)
    image = engine.prepare(image_bytes(96, 64))
    for task, needle in (("wide", "LoRA rank 9, over this server's limit of 8 (max_lora_rank)"),
                         ("long", f"over this server's limit of {long.prompt.length - 1} (max_prompt_tokens)")):
        [refused] = engine.run([(task, image, DetectParams())])
        assert isinstance(refused, AdapterError) and needle in str(refused), refused
        with pytest.raises(AdapterError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            engine.pool.put(f"{task}-2", (tmp_path / f"{task}.safetensors").read_bytes())
    assert not (tmp_path / "wide-2.safetensors").exists()
    small = make_engine(tmp_path, max_upload_bytes=100)
    [refused] = small.run([("ok", image, DetectParams())])
    assert "over this server's limit of 100 bytes per adapter file (max_upload_bytes)" in str(refused)


# ----------------------------------------------------------------------------------------- run-time faults


def test_non_finite_outputs_fail_only_that_adapter_and_count_toward_quarantine(adapters_dir):
    engine = make_engine(adapters_dir)
    image = engine.prepare(image_bytes(96, 64))
    params = DetectParams(threshold=0.0, top_k=5)
    healthy = {task: engine.run([(task, image, params)])[0] for task in ("alpha", "beta", "delta")}
    entry = engine.pool.get("gamma")  # a linear probe whose scores come out NaN: no exception, just NaN
    entry.overrides["head.bias0"] = torch.full_like(entry.overrides["head.bias0"], float("nan"))
    for attempt in range(2):
        results = engine.run([("gamma", image, params), *((t, image, params) for t in healthy)])
        assert isinstance(results[0], AdapterFailed), results[0]  # not a 200 with zero detections
        assert "'gamma'" in str(results[0]) and "NaN or Inf" in str(results[0])
        for task, result in zip(healthy, results[1:]):
            assert result.detections == healthy[task].detections  # the others answered as if alone
    assert engine.metrics.value("adapt_adapter_failures_total", task="gamma") == 2
    [refused] = engine.run([("gamma", image, params)])
    assert isinstance(refused, AdapterQuarantined)


def test_an_exception_anywhere_in_registration_is_a_refusal_that_keeps_the_old_file(adapters_dir, processor,
                                                                                    monkeypatch):
    import adapt.serve.pool as pool_module

    engine = make_engine(adapters_dir)
    target = adapters_dir / "alpha.safetensors"
    before = target.read_bytes()
    data = save(random_adapter(tiny_base(), processor, "alpha", ["cat"], seed=3).tensors(),
                metadata=random_adapter(tiny_base(), processor, "alpha", ["cat"], seed=3).metadata())
    monkeypatch.setattr(pool_module, "_share_embedded", lambda prompt: 1 / 0)
    with pytest.raises(AdapterError, match="'alpha' cannot be used"):
        engine.pool.put("alpha", data)
    monkeypatch.undo()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pool_module, "atomic_write", full_disk)
    with pytest.raises(AdapterError, match="could not be stored"):
        engine.pool.put("alpha", data)
    assert target.read_bytes() == before


# ---------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_a_sparse_2gib_file_in_the_folder_is_refused_without_reading_it(adapters_dir):
    engine = make_engine(adapters_dir)
    path = adapters_dir / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.truncate(2 * 2**30)  # `truncate -s 2G`: no disk blocks, 2 GiB to anyone who reads it
    try:
        image = engine.prepare(image_bytes(96, 64))
        before, start = rss_bytes(), time.perf_counter()
        for _ in range(3):
            [refused] = engine.run([("sparse", image, DetectParams())])
            assert isinstance(refused, AdapterError)
            assert "over this server's limit of 67,108,864 bytes per adapter file" in str(refused)
        assert time.perf_counter() - start < 2.0
        assert rss_bytes() - before < 256 * 2**20
        assert engine.run([("alpha", image, DetectParams())])[0].detections is not None  # others still served
    finally:
        path.unlink()


def test_a_refused_adapter_keeps_no_reference_to_its_bytes(adapters_dir, processor):
    """A 32 MiB file under the size cap, refused after it was read: its bytes must not outlive the refusal."""
    engine = make_engine(adapters_dir)
    adapter = random_adapter(tiny_base(), processor, "padded", ["cat"], seed=4)
    tensors = {**adapter.tensors(), "payload": torch.zeros(8 * 2**20)}  # an unexpected tensor: refused
    path = adapters_dir / "padded.safetensors"
    path.write_bytes(save(tensors, metadata=adapter.metadata()))
    try:
        image = engine.prepare(image_bytes(96, 64))
        gc.collect()
        tracemalloc.start()
        try:
            for _ in range(2):
                [refused] = engine.run([("padded", image, DetectParams())])
                assert isinstance(refused, AdapterError) and "unexpected tensors" in str(refused)
            del refused
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < 4 * 2**20, f"{held / 2**20:.1f} MiB still held after the refusal"
        status = engine.pool.status("padded")
        assert status["status"] == "refused" and "unexpected tensors" in status["message"]
    finally:
        path.unlink()
