"""Benchmarks of the multi-tenant server (issue 6): printed figures, not timed tests.

Sections (all by default; pick with --sections):
  load  throughput and p50/p99 latency from a closed-loop load generator on 127.0.0.1 against the HTTP
        server (uvicorn, one process), for 1, 8 and 100 tenants in a random mix, batching on vs off.
  cold  cold adapter load + verify + attach latency (prompt-tune, linear-probe, LoRA) and the warm
        switch cost, in-process through the engine.
  rss   resident memory of a server process with 1, 100 and 1,000 registered prompt adapters, before and
        after each was served once.
  soak  N requests with 5% bad inputs mixed in, and broken adapters uploaded by the admin every 100 requests:
        crashes (5xx, dead server), healthy-tenant failures, wrong-tenant answers, RSS drift after the
        warm-up; with --soak-profile the server also runs tracemalloc and reports its traced heap, glibc's
        arena figures and the lines whose allocations grew most since the warm-up.
  fair  a fair share for every tenant: tenant A's p50/p99 latency alone and while tenant B floods at 10x
        A's rate with the heaviest adapter the server accepts (LoRA of the largest rank on every default
        target, the longest prompt), A's failures, B's throughput and refusals, the mean batch time.
  batch in-process: 4 and 8 tenants' requests as one engine batch vs one at a time (ms per image).
  lora  LoRA served unmerged: bytes per resident LoRA tenant (default targets, --lora-rank), how many fit
        the default cache, and one batch of 8 LoRA tenants vs 8 requests of one tenant vs the old way
        (each adapter folded into dense weights, run alone); batched vs single score difference.

The adapters are synthetic (adapt.serve.testing: the base's P0 of a category prompt plus a random
offset), in the real file format; every tenant has its own key and may call only its own task.
Examples (the figures in docs/serving.md come from these):
    python benchmarks/serve_bench.py --base glip-nano --label glip-nano
    python benchmarks/serve_bench.py --base /tmp/glip_t.safetensors --label GLIP-T --image-size 320 \
        --requests 24 --concurrency 8 --soak-requests 200
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["fish", "shark", "penguin", "jellyfish", "starfish", "puffin", "stingray", "car", "bus", "truck",
         "person", "dog", "cat", "bicycle", "traffic light", "boat", "kite", "umbrella", "chair", "bottle",
         "airplane", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "tie"]


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ setup


def load_base(base: str):
    from backbone.model import GLIP

    return GLIP.from_pretrained(base).eval()


def make_processor(config, image_size: int | None):
    from adapt.serve.server import processor_for
    from backbone.processor import GLIPProcessor

    return processor_for(config, image_size) or GLIPProcessor.from_config(config)


def tenant_categories(i: int) -> list[str]:
    rng = random.Random(i)
    return rng.sample(WORDS, rng.randint(2, 5))


def prepare_workdir(args) -> dict:
    """Adapters for 100 tenants (+ a LoRA and a linear probe), keys, images; returns the plan."""
    import torch

    from adapt.adapter import save_adapter
    from adapt.serve.tenancy import hash_key
    from adapt.serve.testing import image_bytes, random_adapter

    work = Path(args.workdir)
    adapters = work / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    base = load_base(args.base)
    processor = make_processor(base.config, args.image_size)
    tenants = []
    started = time.perf_counter()
    for i in range(100):
        task = f"tenant-{i:03d}"
        cats = tenant_categories(i)
        path = adapters / f"{task}.safetensors"
        if not path.exists():
            save_adapter(random_adapter(base, processor, task, cats, seed=i), path)
        tenants.append({"task": task, "key": f"key-{task}", "categories": cats})
    for strategy in ("lora", "linear-probe"):
        path = adapters / f"{strategy}-task.safetensors"
        if not path.exists():
            adapter = random_adapter(base, processor, f"{strategy}-task", ["fish", "shark"], strategy=strategy)
            # the synthetic factors scaled into what validation accepts (an update within 10x the weight's norm)
            adapter.lora = {name: 0.1 * factor for name, factor in adapter.lora.items()}
            save_adapter(adapter, path)
    # 1,000 registered prompt adapters for the memory figures: the 100 prompts with new offsets (no BERT run).
    rss_dirs = {}
    for count in (1, 100, 1000):
        folder = work / f"rss-{count}"
        folder.mkdir(exist_ok=True)
        rss_dirs[count] = str(folder)
        for j in range(count):
            path = folder / f"p-{j:04d}.safetensors"
            if path.exists():
                continue
            from adapt.adapter import load_adapter

            template = load_adapter(adapters / f"tenant-{j % 100:03d}.safetensors")
            g = torch.Generator().manual_seed(10_000 + j)
            hidden = template.prompt.hidden + 0.05 * torch.randn(template.prompt.hidden.shape, generator=g)
            template.prompt = type(template.prompt)(hidden, hidden.clone(), template.prompt.mask)
            template.task = f"p-{j:04d}"
            save_adapter(template, path)
    # The soak adds the LoRA and linear-probe tenants, and "mallory", whose adapter in the folder is broken
    # (a P0 of batch size 2, written past validation): its requests are refused, nobody else's may fail.
    from adapt.serve.testing import faulty_adapter_bytes

    extra = [{"task": f"{s}-task", "key": f"key-{s}-task", "categories": ["fish", "shark"]}
             for s in ("lora", "linear-probe")]
    mallory = {"task": "mallory", "key": "key-mallory", "categories": ["cat", "dog"]}
    (adapters / "mallory.safetensors").write_bytes(faulty_adapter_bytes(base, processor, "p0_batch_2"))
    keys = {"tenants": [{"name": t["task"], "key_sha256": hash_key(t["key"]), "tasks": [t["task"]]}
                        for t in tenants + extra + [mallory]],
            "admins": [{"name": "ops", "key_sha256": hash_key("key-admin")}]}
    (work / "keys.json").write_text(json.dumps(keys))
    side = args.image_size or base.config.image.max_size
    images = [image_bytes(side, side, seed=s) for s in range(8)]
    print(f"prepared {work} in {time.perf_counter() - started:.1f} s (base {base.config.name}, images {side}x{side})",
          flush=True)
    from adapt.serve.testing import FAULTY_KINDS

    faulty = {kind: faulty_adapter_bytes(base, processor, kind) for kind in FAULTY_KINDS}
    return {"adapters": str(adapters), "tenants": tenants, "images": images, "rss_dirs": rss_dirs,
            "keys": str(work / "keys.json"), "soak_tenants": tenants + extra, "mallory": mallory, "faulty": faulty}


# ------------------------------------------------------------------------------------------- the server


def start_server(args, plan, *, max_batch: int, window_ms: float, port: int, config: dict | None = None,
                 profile_file: str | None = None) -> subprocess.Popen:
    """The HTTP server in a child process; `config` overrides the engine settings (default: a queue and deadline
    large enough that a closed-loop load is never refused); `profile_file`: run tracemalloc (see child_server)."""
    config = {"max_batch": max_batch, "batch_window_ms": window_ms, "max_queue": 1024, "deadline_s": 600.0,
              **(config or {})}
    cmd = [sys.executable, __file__, "--child-server", json.dumps({
        "base": args.base, "adapters": plan["adapters"], "keys": plan["keys"], "port": port,
        "config": config, "image_size": args.image_size, "threads": args.threads, "profile_file": profile_file})]
    log = Path(args.workdir, f"server-{port}.log")  # a file, not a pipe nobody reads while the server runs
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def child_server(spec: dict) -> None:
    import torch

    from adapt.serve.engine import EngineConfig
    from adapt.serve.server import load_keys, run_http

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("profile_file"):
        profile_on_signal(spec["profile_file"])
    run_http(base=spec["base"], adapters_dir=spec["adapters"], engine_config=EngineConfig(**spec["config"]),
             keys=load_keys(spec["keys"]), port=spec["port"], image_size=spec["image_size"], log_level="warning")


def profile_on_signal(path: str) -> None:
    """Trace Python allocations; on each SIGUSR1 write (atomically) the traced heap, glibc's arena figures and
    the 12 source lines whose live allocations grew most since the first SIGUSR1 (the baseline)."""
    import ctypes
    import tracemalloc

    from glip_io import atomic_write

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        mallinfo2 = None
    tracemalloc.start(1)
    state = {"baseline": None, "count": 0}
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap*")]

    def dump(*_):
        snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
        baseline = state["baseline"] = state["baseline"] or snapshot
        current, peak = tracemalloc.get_traced_memory()
        info = mallinfo2() if mallinfo2 else None
        growth = [{"where": str(stat.traceback), "kib": stat.size_diff / 1024, "blocks": stat.count_diff}
                  for stat in snapshot.compare_to(baseline, "lineno")[:12]]
        state["count"] += 1
        atomic_write(path, json.dumps({
            "dump": state["count"], "traced_mb": current / 2**20, "traced_peak_mb": peak / 2**20, "rss_mb": rss_mb(),
            "profiler_own_mb": tracemalloc.get_tracemalloc_memory() / 2**20,  # its traces, the kept baseline
            "heap_in_use_mb": info and info.uordblks / 2**20, "heap_free_mb": info and info.fordblks / 2**20,
            "heap_arena_mb": info and info.arena / 2**20, "mmapped_mb": info and info.hblkhd / 2**20,
            "top_growth_since_baseline": growth}).encode())

    signal.signal(signal.SIGUSR1, dump)


def read_profile(proc: subprocess.Popen, path: str, timeout_s: float = 120.0) -> dict | None:
    """Ask the profiled server for a dump and wait for it."""
    before = json.loads(Path(path).read_text())["dump"] if Path(path).exists() else 0
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = json.loads(Path(path).read_text())
            if data["dump"] > before:
                return data
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    return None


# ----------------------------------------------------------------------------------------- load generator


async def drive(url: str, jobs: list[dict], concurrency: int) -> list[dict]:
    """Closed loop: `concurrency` clients send `jobs` in order; returns per-job status, latency, body."""
    import httpx

    results: list[dict | None] = [None] * len(jobs)
    cursor = iter(range(len(jobs)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            for index in cursor:
                job = jobs[index]
                start = time.perf_counter()
                try:
                    response = await client.request(job.get("method", "POST"), job["path"], **job["kwargs"])
                    status, body = response.status_code, response.content
                except httpx.HTTPError as error:
                    status, body = -1, repr(error).encode()
                results[index] = {"status": status, "seconds": time.perf_counter() - start, "body": body}

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def detect_job(tenant: dict, image: bytes) -> dict:
    return {"path": f"/v1/tasks/{tenant['task']}/detect", "tenant": tenant,
            "kwargs": {"files": {"image": ("x.png", image, "image/png")}, "data": {"threshold": "0.3"},
                       "headers": {"Authorization": f"Bearer {tenant['key']}"}}}


def run_load(url: str, plan: dict, tenants: int, requests: int, concurrency: int, seed: int, warmup: int) -> dict:
    rng = random.Random(seed)
    pool = plan["tenants"][:tenants]
    # Warm-up: the model and a few adapters (a cold adapter load is ~ms, see [cold]; not worth 100 requests).
    warm = [detect_job(rng.choice(pool), rng.choice(plan["images"])) for _ in range(warmup)]
    asyncio.run(drive(url, warm, concurrency))
    jobs = [detect_job(rng.choice(pool), rng.choice(plan["images"])) for _ in range(requests)]
    started = time.perf_counter()
    results = asyncio.run(drive(url, jobs, concurrency))
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["seconds"] * 1000 for r in ok]
    return {"tenants": tenants, "requests": requests, "ok": len(ok), "throughput_rps": len(ok) / wall,
            "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99)}


def section_load(args, plan) -> dict:
    out = {}
    modes = {"on": (args.max_batch, args.window_ms), "off": (1, 0.0)}
    for mode in args.modes.split(","):
        max_batch, window = modes[mode]
        port = free_port()
        proc = start_server(args, plan, max_batch=max_batch, window_ms=window, port=port)
        try:
            for tenants in map(int, args.mixes.split(",")):
                row = run_load(f"http://127.0.0.1:{port}", plan, tenants, args.requests, args.concurrency,
                               seed=tenants, warmup=args.concurrency if args.warmup is None else args.warmup)
                out[f"batching {mode}, {tenants} tenants"] = row
                print(f"  batching {mode:<3} tenants {tenants:>3}: {row['throughput_rps']:7.2f} req/s  "
                      f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  ({row['ok']}/{row['requests']} ok)",
                      flush=True)
        finally:
            stop_server(proc)
    if len(out) < 6:
        return out
    on1, on100 = out["batching on, 1 tenants"]["throughput_rps"], out["batching on, 100 tenants"]["throughput_rps"]
    on8 = out["batching on, 8 tenants"]["throughput_rps"]
    off_best = max(out[f"batching off, {t} tenants"]["throughput_rps"] for t in (1, 8, 100))
    out["mixed/single (8 tenants)"] = on8 / on1
    out["mixed/single (100 tenants)"] = on100 / on1
    out["on/off (100 tenants)"] = on100 / out["batching off, 100 tenants"]["throughput_rps"]
    print(f"  mixed-tenant / single-tenant batched throughput: 8 tenants {on8 / on1:.2f}x, 100 tenants "
          f"{on100 / on1:.2f}x (target >= 0.9); batching on / off at 100 tenants: "
          f"{out['on/off (100 tenants)']:.2f}x (best off {off_best:.2f} req/s)", flush=True)
    return out


# ------------------------------------------------------------------------------------------- in process


def section_cold(args, plan) -> dict:
    import torch

    from adapt.serve.engine import DetectParams, EngineConfig, MultiTenantEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.base)
    engine = MultiTenantEngine(base, plan["adapters"], EngineConfig(cache_bytes=2**34),
                               processor=make_processor(base.config, args.image_size))
    names = [t["task"] for t in plan["tenants"]]
    cold = []
    for name in names:
        start = time.perf_counter()
        engine.pool.get(name)
        cold.append((time.perf_counter() - start) * 1000)
    other = {}
    for name in ("lora-task", "linear-probe-task"):
        times = []
        for _ in range(5):
            engine.pool.clear()
            start = time.perf_counter()
            engine.pool.get(name)
            times.append((time.perf_counter() - start) * 1000)
        other[name] = statistics.median(times)
    hits = []
    for name in names * 5:
        start = time.perf_counter()
        engine.pool.get(name)
        hits.append((time.perf_counter() - start) * 1e6)
    image = engine.prepare(plan["images"][0])
    params = DetectParams(0.3, 100)

    def latency(sequence: list[str]) -> list[float]:
        times = []
        for name in sequence:
            start = time.perf_counter()
            engine.run([(name, image, params)])
            times.append((time.perf_counter() - start) * 1000)
        return times[2:]

    reps = args.switch_reps
    for name in names[:2] + ["lora-task", "linear-probe-task"]:
        engine.pool.get(name)
    same = latency([names[0]] * reps)
    switch = latency([names[i % 2] for i in range(reps)])
    lora_same = latency(["lora-task"] * reps)
    lora_switch = latency([("lora-task", "linear-probe-task")[i % 2] for i in range(reps)])
    out = {"cold_prompt_p50_ms": pct(cold, 50), "cold_prompt_p99_ms": pct(cold, 99),
           "cold_lora_ms": other["lora-task"], "cold_linear_probe_ms": other["linear-probe-task"],
           "cache_hit_p50_us": pct(hits, 50),
           "request_same_adapter_p50_ms": statistics.median(same),
           "request_alternating_prompt_adapters_p50_ms": statistics.median(switch),
           "request_same_lora_p50_ms": statistics.median(lora_same),
           "request_alternating_lora_linear_probe_p50_ms": statistics.median(lora_switch)}
    out["warm_switch_prompt_ms"] = out["request_alternating_prompt_adapters_p50_ms"] - out["request_same_adapter_p50_ms"]
    print(f"  cold load+verify+attach: prompt-tune p50 {out['cold_prompt_p50_ms']:.2f} ms (p99 "
          f"{out['cold_prompt_p99_ms']:.2f}; target p50 <= 5 ms), LoRA {out['cold_lora_ms']:.2f} ms, linear-probe "
          f"{out['cold_linear_probe_ms']:.2f} ms; cache hit p50 {out['cache_hit_p50_us']:.1f} us", flush=True)
    print(f"  warm switch: one request, same prompt adapter {out['request_same_adapter_p50_ms']:.1f} ms vs "
          f"alternating two {out['request_alternating_prompt_adapters_p50_ms']:.1f} ms (switch cost "
          f"{out['warm_switch_prompt_ms']:+.2f} ms); same LoRA {out['request_same_lora_p50_ms']:.1f} ms vs "
          f"alternating LoRA/linear-probe {out['request_alternating_lora_linear_probe_p50_ms']:.1f} ms", flush=True)
    return out


def section_batch(args, plan) -> dict:
    """In-process: N requests of N different prompt-tuning tenants as one engine batch vs one at a time."""
    import torch

    from adapt.serve.engine import DetectParams, EngineConfig, MultiTenantEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.base)
    engine = MultiTenantEngine(base, plan["adapters"], EngineConfig(),
                               processor=make_processor(base.config, args.image_size))
    params = DetectParams(0.3, 100)
    items = [(t["task"], engine.prepare(plan["images"][i % len(plan["images"])]), params)
             for i, t in enumerate(plan["tenants"][:8])]
    for n in (1, 8):  # warm-up: adapters loaded, buffers allocated
        engine.run(items[:n])
    out = {}
    for n in (4, 8):
        batched, single = [], []
        for _ in range(args.batch_reps):
            start = time.perf_counter()
            engine.run(items[:n])
            batched.append((time.perf_counter() - start) * 1000 / n)
            start = time.perf_counter()
            for item in items[:n]:
                engine.run([item])
            single.append((time.perf_counter() - start) * 1000 / n)
        out[n] = {"batched_ms_per_image": statistics.median(batched), "single_ms_per_image": statistics.median(single)}
        print(f"  {n} tenants' requests: one batch {out[n]['batched_ms_per_image']:.1f} ms/image vs one at a time "
              f"{out[n]['single_ms_per_image']:.1f} ms/image "
              f"({out[n]['single_ms_per_image'] / out[n]['batched_ms_per_image']:.2f}x)", flush=True)
    return out


def section_lora(args, plan=None) -> dict:
    """LoRA served unmerged: bytes per resident tenant, how many fit the default cache, and one engine batch of 8
    requests of 8 LoRA tenants (grouped rank-r terms) vs 8 requests of one, vs folding each adapter into dense
    weights and running it alone (what the server did before)."""
    import re

    import torch
    from torch import nn

    from adapt.adapter import load_adapter, save_adapter, weight_overrides
    from adapt.serve.engine import DetectParams, EngineConfig, MultiTenantEngine, _select
    from adapt.serve.testing import image_bytes, random_adapter
    from adapt.strategies import LORA_DEFAULT_TARGETS

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.base)
    processor = make_processor(base.config, args.image_size)
    folder = Path(args.workdir) / "lora"
    folder.mkdir(parents=True, exist_ok=True)
    r = args.lora_rank
    linear = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(LORA_DEFAULT_TARGETS, n)}
    for i in range(8):
        path = folder / f"lora-{i}.safetensors"
        if path.exists():
            continue
        # One category list for all: the tenants differ only in their LoRA factors (and P0 offset), so prompt
        # length and the number of candidates to post-process do not differ between the mixed and the single batch.
        adapter = random_adapter(base, processor, f"lora-{i}", tenant_categories(0), strategy="lora", seed=i)
        g = torch.Generator().manual_seed(100 + i)
        adapter.lora = {}
        for name, m in linear.items():
            adapter.lora[f"{name}.lora_A.weight"] = 0.02 * torch.randn(r, m.in_features, generator=g)
            adapter.lora[f"{name}.lora_B.weight"] = 0.02 * torch.randn(m.out_features, r, generator=g)
        adapter.lora_config = {"r": r, "alpha": 2.0 * r, "target_modules": list(linear), "dropout": 0.0}
        save_adapter(adapter, path)
    engine = MultiTenantEngine(base, folder, EngineConfig(), processor=processor)
    entry = engine.pool.get("lora-0")
    lora_bytes = sum(t.nbytes for d in (entry.lora.down, entry.lora.up) for t in d.values())
    dense_bytes = sum(m.weight.nbytes for m in linear.values())  # one folded copy of every target weight
    out = {"targets": len(linear), "rank": r, "resident_bytes": entry.nbytes, "lora_factor_bytes": lora_bytes,
           "prompt_bytes": entry.nbytes - lora_bytes, "folded_dense_bytes": dense_bytes,
           "cache_bytes": engine.pool.max_bytes, "tenants_fit_default_cache": engine.pool.max_bytes // entry.nbytes,
           "tenants_fit_folded": engine.pool.max_bytes // (dense_bytes + entry.nbytes - lora_bytes)}
    side = args.image_size or base.config.image.max_size
    images = [engine.prepare(image_bytes(side, side, seed=i)) for i in range(8)]
    params = DetectParams(0.3, 100)
    mixed = [(f"lora-{i}", images[i], params) for i in range(8)]
    one = [("lora-0", images[i], params) for i in range(8)]
    adapters = [load_adapter(folder / f"lora-{i}.safetensors", base=base) for i in range(8)]
    folded = [weight_overrides(a, base) for a in adapters]

    def run_folded():  # the old way: O0 once, then each adapter's own pass with its dense override tensors
        with torch.inference_mode():
            pixels = torch.stack([im.pixel_values for im in images])
            visual = base.encode_images(pixels, [im.image_size for im in images])
            for i, adapter in enumerate(adapters):
                outputs = torch.func.functional_call(base, folded[i], (adapter.prompt,), {"visual": _select(visual, [i])})
                engine.postprocessor(outputs, [adapter.positive_map])

    timings = {"mixed_8_tenants": lambda: engine.run(mixed), "one_tenant": lambda: engine.run(one),
               "folded_per_adapter": run_folded}
    for fn in timings.values():
        fn()  # warm-up
    times = {name: [] for name in timings}
    for _ in range(args.batch_reps):  # interleaved, so that a change in the machine's load hits all alike
        for name, fn in timings.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, series in times.items():
        out[f"{name}_s_per_batch"] = statistics.median(series)
        out[f"{name}_images_per_s"] = 8 / statistics.median(series)
    worst = 0.0
    for item, batched in zip(mixed, engine.run(mixed)):
        [single] = engine.run([item])
        for b, s_ in zip(batched.detections, single.detections):
            worst = max(worst, abs(b["score"] - s_["score"]))
        assert [d["category"] for d in batched.detections] == [d["category"] for d in single.detections]
    out["batched_vs_single_max_score_diff"] = worst
    print(f"  LoRA r={r} on {len(linear)} target layers: resident tenant {entry.nbytes / 2**20:.2f} MiB "
          f"({lora_bytes / 2**20:.2f} MiB factors + {(entry.nbytes - lora_bytes) / 2**10:.0f} KiB prompt) vs "
          f"{dense_bytes / 2**20:.1f} MiB folded; default cache ({engine.pool.max_bytes / 2**20:.0f} MiB) holds "
          f"{out['tenants_fit_default_cache']} (folded: {out['tenants_fit_folded']})", flush=True)
    print(f"  batch of 8: 8 LoRA tenants {out['mixed_8_tenants_images_per_s']:.2f} img/s vs one tenant "
          f"{out['one_tenant_images_per_s']:.2f} img/s "
          f"({out['mixed_8_tenants_images_per_s'] / out['one_tenant_images_per_s']:.2f}x); folded per adapter "
          f"{out['folded_per_adapter_images_per_s']:.2f} img/s; batched vs single max |score diff| {worst:.1e}",
          flush=True)
    return out


def child_rss(spec: dict) -> None:
    import gc

    import torch

    from adapt.serve.engine import DetectParams, EngineConfig, MultiTenantEngine
    from adapt.serve.testing import image_bytes

    torch.set_num_threads(spec.get("threads") or 1)
    before_model = rss_mb()
    base = load_base(spec["base"])
    engine = MultiTenantEngine(base, spec["dir"], EngineConfig(), processor=make_processor(base.config,
                                                                                             spec["image_size"]))
    side = spec["image_size"] or base.config.image.max_size
    image = engine.prepare(image_bytes(side, side))
    names = engine.pool.names()
    engine.run([(names[0], image, DetectParams(0.3, 100))])  # warm: activations allocated once
    engine.pool.clear()
    gc.collect()
    base_rss = rss_mb()
    registered = len(engine.pool.names())
    registered_rss = rss_mb()
    for name in names:
        engine.pool.get(name)
    gc.collect()
    served_rss = rss_mb()
    print(json.dumps({"process_before_model_mb": before_model, "base_mb": base_rss, "registered": registered,
                      "registered_mb": registered_rss, "served_once_mb": served_rss,
                      "cached_adapters": engine.pool.stats()["entries"], "cache_bytes": engine.pool.cached_bytes}))


def section_rss(args, plan) -> dict:
    out = {}
    for count, folder in plan["rss_dirs"].items():
        spec = {"base": args.base, "dir": folder, "image_size": args.image_size, "threads": args.threads}
        line = subprocess.run([sys.executable, __file__, "--child-rss", json.dumps(spec)], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row = json.loads(line)
        out[count] = row
        print(f"  {count:>5} registered prompt adapters: base process {row['base_mb']:.0f} MiB; registered "
              f"+{row['registered_mb'] - row['base_mb']:.1f} MiB ({(row['registered_mb'] / row['base_mb'] - 1):+.2%}); "
              f"all served once (cached {row['cached_adapters']}, {row['cache_bytes'] / 2**20:.1f} MiB of tensors) "
              f"+{row['served_once_mb'] - row['base_mb']:.1f} MiB ({(row['served_once_mb'] / row['base_mb'] - 1):+.2%})",
              flush=True)
    return out


# --------------------------------------------------------------------------------------------------- soak


BAD_KINDS = ("not_image", "truncated", "bomb", "oversized", "malformed_json", "deep_json", "nan_threshold",
             "nan_timeout", "bad_key", "foreign_task", "faulty_adapter_task")


def bad_job(kind: str, tenant: dict, other: dict, image: bytes, bomb: bytes, mallory: dict) -> dict:
    headers = {"Authorization": f"Bearer {tenant['key']}"}
    path = f"/v1/tasks/{tenant['task']}/detect"
    json_headers = {**headers, "Content-Type": "application/json"}
    form = {"files": {"image": image}, "headers": headers}
    kwargs = {
        "not_image": {"files": {"image": b"GIF89a but not really an image" * 20}, "headers": headers},
        "truncated": {"files": {"image": image[: len(image) // 3]}, "headers": headers},
        "bomb": {"files": {"image": bomb}, "headers": headers},
        "oversized": {"content": b"\0" * (17 * 2**20), "headers": json_headers},
        "malformed_json": {"content": b'{"image": ', "headers": json_headers},
        "deep_json": {"content": b"[" * 100_000 + b"]" * 100_000, "headers": json_headers},
        "nan_threshold": {"content": b'{"image": "aGk=", "threshold": NaN}', "headers": json_headers},
        "nan_timeout": {"files": {"image": image}, "headers": {**headers, "X-Timeout-Ms": "nan"}},
        "bad_key": {"files": {"image": image}, "headers": {"Authorization": "Bearer nope"}},
    }
    expected = {"not_image": 422, "truncated": 422, "bomb": 413, "oversized": 413, "malformed_json": 400,
                "deep_json": 400, "nan_threshold": 422, "nan_timeout": 422, "bad_key": 401}
    if kind == "foreign_task":
        return {"path": f"/v1/tasks/{other['task']}/detect", "expect": 404, "bad": kind, "kwargs": form}
    if kind == "faulty_adapter_task":  # the tenant whose adapter in the folder fails validation
        return {"path": f"/v1/tasks/{mallory['task']}/detect", "expect": 422, "bad": kind,
                "kwargs": {"files": {"image": image}, "headers": {"Authorization": f"Bearer {mallory['key']}"}}}
    return {"path": path, "expect": expected[kind], "bad": kind, "kwargs": kwargs[kind]}


def bad_upload_job(kind: str, target: str, data: bytes) -> dict:
    """The admin uploads a broken adapter over a healthy tenant's (or under a name with a newline)."""
    path = "/v1/adapters/x%0a" if kind == "newline_name" else f"/v1/adapters/{target}"
    return {"method": "PUT", "path": path, "expect": 422, "bad": f"upload_{kind}",
            "kwargs": {"content": data, "headers": {"Authorization": "Bearer key-admin",
                                                    "Content-Type": "application/octet-stream"}}}


def section_soak(args, plan) -> dict:
    import hashlib

    from adapt.serve.testing import bomb_bytes

    port = free_port()
    profile = str(Path(args.workdir, "soak-profile.json")) if args.soak_profile else None
    if profile and Path(profile).exists():
        Path(profile).unlink()
    proc = start_server(args, plan, max_batch=args.max_batch, window_ms=args.window_ms, port=port,
                        profile_file=profile)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(7)
    tenants = plan["soak_tenants"]
    files = {t["task"]: Path(plan["adapters"], f"{t['task']}.safetensors") for t in tenants}
    versions = {task: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for task, path in files.items()}
    bomb = bomb_bytes(6000)  # 36 Mpx, over the server's 25 Mpx default
    uploads = [*plan["faulty"].items(), ("newline_name", next(iter(plan["faulty"].values())))]
    jobs = []
    for i in range(args.soak_requests):
        tenant = rng.choice(tenants)
        image = rng.choice(plan["images"])
        if i % 100 == 50:  # mid-run, the admin keeps uploading broken adapters over healthy tenants' ones
            kind, data = uploads[(i // 100) % len(uploads)]
            jobs.append(bad_upload_job(kind, tenant["task"], data))
        elif rng.random() < 0.05:
            other = rng.choice([t for t in tenants if t is not tenant])
            jobs.append(bad_job(BAD_KINDS[i % len(BAD_KINDS)], tenant, other, image, bomb, plan["mallory"]))
        else:
            job = detect_job(tenant, image)
            job["expect"] = 200
            jobs.append(job)
    rss, results, crashed, profiles = [], [], False, []
    chunk = max(50, args.soak_requests // 40)
    warmup_chunks = max(1, round(0.1 * len(jobs) / chunk))  # the first 10 %: model, allocator and caches settle
    started = time.perf_counter()
    try:
        for offset in range(0, len(jobs), chunk):
            results += asyncio.run(drive(url, jobs[offset: offset + chunk], args.concurrency))
            if proc.poll() is not None:
                crashed = True
                break
            rss.append(rss_mb(proc.pid))
            healthy_failed = sum(r["status"] != 200 for j, r in zip(jobs, results) if j["expect"] == 200)
            line = (f"  {len(results)} requests, {time.perf_counter() - started:.0f} s, RSS {rss[-1]:.0f} MiB, "
                    f"healthy-tenant failures {healthy_failed}")
            if profile and len(rss) >= warmup_chunks:  # the first dump after the warm-up is the baseline
                dump = read_profile(proc, profile)
                if dump:
                    profiles.append({"requests": len(results), **{k: v for k, v in dump.items()
                                                                  if k != "top_growth_since_baseline"}})
                    line += (f", traced heap {dump['traced_mb']:.1f} MiB (profiler's own "
                             f"{dump['profiler_own_mb']:.0f}), "
                             f"glibc in use {dump['heap_in_use_mb']:.0f} "
                             f"free {dump['heap_free_mb']:.0f} mmapped {dump['mmapped_mb']:.0f} MiB")
            print(line, flush=True)
        alive = proc.poll() is None
        import httpx

        healthy = alive and httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    finally:
        wall = time.perf_counter() - started
        stop_server(proc)
    wrong_status = wrong_tenant = server_errors = healthy_failures = 0
    unexpected: dict[str, int] = {}
    for job, result in zip(jobs, results):
        if result["status"] >= 500 or result["status"] < 0:
            server_errors += 1
        if result["status"] != job["expect"]:
            wrong_status += 1
            healthy_failures += job["expect"] == 200
            key = f"{job.get('bad', 'healthy')}:{result['status']}"
            unexpected[key] = unexpected.get(key, 0) + 1
            continue
        if job["expect"] == 200:
            body = json.loads(result["body"])
            task = job["tenant"]["task"]
            if body["task"] != task or body["adapter_version"] != versions[task] or \
                    not {d["category"] for d in body["detections"]} <= set(job["tenant"]["categories"]):
                wrong_tenant += 1
    bad = sum(1 for j in jobs if "bad" in j)
    untouched = all(hashlib.sha256(path.read_bytes()).hexdigest()[:16] == versions[task] for task, path in files.items())
    out = {"requests": len(jobs), "answered": len(results), "bad_inputs": bad,
           "bad_uploads": sum(1 for j in jobs if j.get("method") == "PUT"), "seconds": wall,
           "healthy_requests": sum(1 for j in jobs if j["expect"] == 200), "healthy_failures": healthy_failures,
           "server_errors_5xx": server_errors, "unexpected_status": wrong_status, "unexpected_by_kind": unexpected,
           "wrong_tenant_answers": wrong_tenant, "adapter_files_untouched": untouched,
           "crashed": crashed or not healthy, "rss_mb_first": rss[0] if rss else None,
           "rss_mb_last": rss[-1] if rss else None, "rss_mb_max": max(rss) if rss else None,
           "rss_mb_after_10pct": rss[max(0, len(rss) // 10)] if rss else None,
           "rss_mb_every_chunk": [round(x) for x in rss], "chunk_requests": chunk}
    if len(rss) > warmup_chunks:
        settled = rss[warmup_chunks - 1]  # after the warm-up
        out.update({"warmup_requests": warmup_chunks * chunk, "rss_mb_after_warmup": settled,
                    "rss_drift_after_warmup_pct": 100 * (rss[-1] - settled) / settled,
                    "rss_max_after_warmup_pct": 100 * (max(rss[warmup_chunks - 1:]) - settled) / settled})
    if profiles:
        out["profile_every_chunk"] = profiles
        out["top_growth_since_warmup"] = json.loads(Path(profile).read_text())["top_growth_since_baseline"]
    print(f"  soak: {len(results)}/{len(jobs)} answered in {wall:.0f} s ({bad} bad inputs, {out['bad_uploads']} "
          f"bad adapter uploads): healthy-tenant failures {healthy_failures} of {out['healthy_requests']}, "
          f"5xx {server_errors}, unexpected status {wrong_status} {unexpected}, wrong-tenant answers {wrong_tenant}, "
          f"adapter files untouched {untouched}, crashed {out['crashed']}; server RSS {out['rss_mb_first']:.0f} -> "
          f"{out['rss_mb_last']:.0f} MiB (max {out['rss_mb_max']:.0f}, after 10% {out['rss_mb_after_10pct']:.0f})",
          flush=True)
    if "rss_drift_after_warmup_pct" in out:
        print(f"  RSS after the {out['warmup_requests']}-request warm-up {out['rss_mb_after_warmup']:.0f} MiB; "
              f"drift to the end {out['rss_drift_after_warmup_pct']:+.2f} %, "
              f"highest {out['rss_max_after_warmup_pct']:+.2f} %",
              flush=True)
    for row in out.get("top_growth_since_warmup", [])[:8]:
        print(f"    {row['kib']:+10.1f} KiB {row['blocks']:+7d} blocks  {row['where']}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------- fair


async def open_loop(url: str, schedule: list[tuple[float, dict]]) -> list[dict]:
    """Send each job at its time (seconds from the start) whatever the answers, as independent clients do;
    per job: status, latency and when it was sent."""
    import httpx

    results: list[dict | None] = [None] * len(schedule)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def one(index: int, at: float, job: dict) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            sent = time.perf_counter()
            try:
                status = (await client.request(job.get("method", "POST"), job["path"], **job["kwargs"])).status_code
            except httpx.HTTPError:
                status = -1
            results[index] = {"status": status, "seconds": time.perf_counter() - sent, "sent_s": sent - start,
                              "tenant": job["tenant"]["task"]}

        await asyncio.gather(*(one(i, at, job) for i, (at, job) in enumerate(schedule)))
    return results


def scrape(url: str, key: str) -> dict[str, float]:
    """/metrics as {sample with labels: value}."""
    import httpx

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                   if line and not line.startswith("#"))}


def section_fair(args, plan=None) -> dict:
    """Tenant A alone, then A while B floods at 10x A's rate with the heaviest adapter the server accepts."""
    from adapt.adapter import save_adapter
    from adapt.serve.engine import EngineConfig
    from adapt.serve.tenancy import hash_key
    from adapt.serve.testing import heaviest_adapter, image_bytes, random_adapter

    work = Path(args.workdir, "fair")
    adapters = work / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    base = load_base(args.base)
    processor = make_processor(base.config, args.image_size)
    bounds = EngineConfig()  # the server's defaults: queues, deadline and the per-adapter cost bounds
    a = {"task": "tenant-a", "key": "key-tenant-a"}
    b = {"task": "tenant-b", "key": "key-tenant-b"}
    save_adapter(random_adapter(base, processor, a["task"], ["fish", "shark", "penguin"], seed=1),
                 adapters / f"{a['task']}.safetensors")
    heavy = heaviest_adapter(base, processor, b["task"], rank=bounds.max_lora_rank, max_tokens=bounds.max_prompt_tokens,
                             seed=2)
    save_adapter(heavy, adapters / f"{b['task']}.safetensors")
    keys = {"tenants": [{"name": t["task"], "key_sha256": hash_key(t["key"]), "tasks": [t["task"]]} for t in (a, b)],
            "admins": [{"name": "ops", "key_sha256": hash_key("key-admin")}]}
    (work / "keys.json").write_text(json.dumps(keys))
    side = args.image_size or base.config.image.max_size
    image = image_bytes(side, side, seed=3)
    print(f"  A: prompt adapter, 3 categories; B: LoRA r={bounds.max_lora_rank} on "
          f"{len(heavy.lora_config['target_modules'])} layers, {heavy.input_ids.shape[1]}-token prompt; images "
          f"{side}x{side}; A {args.fair_rate:g} req/s, "
          f"B {10 * args.fair_rate:g} req/s; queues {bounds.tenant_queue} per tenant, {bounds.max_queue} in all",
          flush=True)
    del base
    port = free_port()
    config = {"max_queue": bounds.max_queue, "tenant_queue": bounds.tenant_queue, "deadline_s": bounds.deadline_s}
    proc = start_server(args, {"adapters": str(adapters), "keys": str(work / "keys.json")}, max_batch=args.max_batch,
                        window_ms=args.window_ms, port=port, config=config)
    url = f"http://127.0.0.1:{port}"
    gap = 1.0 / args.fair_rate
    try:
        asyncio.run(open_loop(url, [(i * 0.5, detect_job(t, image)) for i, t in enumerate([a, b] * 3)]))  # warm-up
        single_b = asyncio.run(drive(url, [detect_job(b, image) for _ in range(3)], 1))
        single_a = asyncio.run(drive(url, [detect_job(a, image) for _ in range(3)], 1))
        alone = asyncio.run(open_loop(url, [(i * gap, detect_job(a, image)) for i in range(args.fair_requests)]))
        before = scrape(url, "key-admin")
        lead = 2.0  # B's backlog builds before A's first request
        schedule = [(lead + i * gap, detect_job(a, image)) for i in range(args.fair_requests)]
        schedule += [(i * gap / 10, detect_job(b, image)) for i in range(10 * (args.fair_requests + round(lead / gap)))]
        flood = asyncio.run(open_loop(url, schedule))
        after = scrape(url, "key-admin")
    finally:
        stop_server(proc)

    def latencies(rows: list[dict]) -> dict:
        ok = [r["seconds"] * 1000 for r in rows if r["status"] == 200]
        return {"requests": len(rows), "ok": len(ok), "failures": len(rows) - len(ok),
                "p50_ms": pct(ok, 50) if ok else None, "p99_ms": pct(ok, 99) if ok else None}

    b_rows = [r for r in flood if r["tenant"] == b["task"]]
    b_window = max(r["sent_s"] + r["seconds"] for r in b_rows) - min(r["sent_s"] for r in b_rows)
    batches = after["adapt_batch_seconds_count"] - before["adapt_batch_seconds_count"]
    batch_s = (after["adapt_batch_seconds_sum"] - before["adapt_batch_seconds_sum"]) / max(batches, 1)

    def counted(family: str, tenant: str) -> float:
        name = f'{family}{{tenant="{tenant}"}}'
        return after.get(name, 0.0) - before.get(name, 0.0)

    def charged(tenant: str) -> float:
        return counted("adapt_tenant_compute_seconds_total", tenant)

    out = {"a_alone": latencies(alone), "a_under_flood": latencies([r for r in flood if r["tenant"] == a["task"]]),
           "a_single_ms": statistics.median(r["seconds"] * 1000 for r in single_a),
           "b_single_ms": statistics.median(r["seconds"] * 1000 for r in single_b),
           "b_sent": len(b_rows), "b_ok": sum(r["status"] == 200 for r in b_rows),
           "b_429": sum(r["status"] == 429 for r in b_rows),
           "b_other": sorted({r["status"] for r in b_rows} - {200, 429}),
           "b_throughput_rps": sum(r["status"] == 200 for r in b_rows) / b_window,
           "batches_during_flood": batches, "mean_batch_ms_during_flood": 1000 * batch_s,
           "compute_s_charged": {"a": charged(a["task"]), "b": charged(b["task"])},
           # the batches A can find in progress when it arrives: B's (cost classes keep A out of them)
           "mean_b_batch_ms_during_flood": 1000 * charged(b["task"]) / max(1, counted("adapt_tenant_batches_total",
                                                                                       b["task"])),
           "b_lora_rank": bounds.max_lora_rank, "b_prompt_tokens": int(heavy.input_ids.shape[1]),
           "a_rate_rps": args.fair_rate}
    alone_row, flood_row = out["a_alone"], out["a_under_flood"]
    # "one batch time", read two ways: the mean of every batch of the flood, and the mean of B's batches (those
    # an arriving request of A can find in progress)
    for key, batch_ms in (("all_batches", out["mean_batch_ms_during_flood"]),
                          ("b_batches", out["mean_b_batch_ms_during_flood"])):
        target_ms = 2 * alone_row["p99_ms"] + batch_ms
        out[f"target_p99_ms_{key}"] = target_ms
        out[f"target_met_{key}"] = flood_row["failures"] == 0 and flood_row["p99_ms"] <= target_ms
    print(f"  one request alone: A {out['a_single_ms']:.0f} ms, B {out['b_single_ms']:.0f} ms", flush=True)
    print(f"  A alone:        p50 {alone_row['p50_ms']:.0f} ms, p99 {alone_row['p99_ms']:.0f} ms, failures "
          f"{alone_row['failures']}/{alone_row['requests']}", flush=True)
    print(f"  A under flood:  p50 {flood_row['p50_ms']:.0f} ms, p99 {flood_row['p99_ms']:.0f} ms, failures "
          f"{flood_row['failures']}/{flood_row['requests']}", flush=True)
    for key, label in (("all_batches", "mean of all batches"), ("b_batches", "mean of B's batches")):
        batch_ms = out[f"target_p99_ms_{key}"] - 2 * alone_row["p99_ms"]
        print(f"  target p99 <= 2 x {alone_row['p99_ms']:.0f} + one batch ({label} {batch_ms:.0f} ms) = "
              f"{out[f'target_p99_ms_{key}']:.0f} ms: {'met' if out[f'target_met_{key}'] else 'MISSED'}", flush=True)
    print(f"  B flooding:     {out['b_sent']} sent, {out['b_ok']} answered ({out['b_throughput_rps']:.2f} req/s), "
          f"{out['b_429']} refused with 429, other statuses {out['b_other']}; compute charged during the flood "
          f"A {out['compute_s_charged']['a']:.1f} s, B {out['compute_s_charged']['b']:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="glip-nano", help="checkpoint name or path")
    parser.add_argument("--label", default=None, help="name printed with the figures")
    parser.add_argument("--image-size", type=int, default=None, help="square resize (default: the base config's)")
    parser.add_argument("--workdir", default=None, help="adapters, keys (default: a temporary folder)")
    parser.add_argument("--sections", default="load,cold,rss,soak,batch,lora,fair")
    parser.add_argument("--requests", type=int, default=200, help="requests per load configuration")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--modes", default="on,off", help="batching modes to load-test")
    parser.add_argument("--mixes", default="1,8,100", help="tenant counts to load-test")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests per mix (default: concurrency)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--soak-requests", type=int, default=10_000)
    parser.add_argument("--soak-profile", action="store_true", help="run the soak's server under tracemalloc")
    parser.add_argument("--fair-requests", type=int, default=40, help="tenant A's requests per [fair] phase")
    parser.add_argument("--fair-rate", type=float, default=0.4,
                        help="tenant A's requests per second (keep A well inside its share); B sends 10x")
    parser.add_argument("--switch-reps", type=int, default=22)
    parser.add_argument("--batch-reps", type=int, default=5, help="repetitions of the in-process batch comparison")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the [lora] section's adapters")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--child-server", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_server:
        return child_server(json.loads(args.child_server))
    if args.child_rss:
        return child_rss(json.loads(args.child_rss))
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="serve-bench-")
    print(f"serve_bench {args.label or args.base}: {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"max_batch {args.max_batch}, window {args.window_ms} ms, concurrency {args.concurrency}", flush=True)
    sections = args.sections.split(",")
    plan = prepare_workdir(args) if set(sections) - {"lora", "fair"} else None  # these make their own adapters
    figures = {}
    for section in sections:
        print(f"[{section}]", flush=True)
        figures[section] = {"load": section_load, "cold": section_cold, "rss": section_rss, "soak": section_soak,
                            "batch": section_batch, "lora": section_lora, "fair": section_fair}[section](args, plan)
    if args.out:
        from glip_io import atomic_write

        atomic_write(args.out, json.dumps(figures, indent=1, default=str).encode())


if __name__ == "__main__":
    main()
