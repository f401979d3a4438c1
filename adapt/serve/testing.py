"""Synthetic adapters and images for tests and benchmarks of the server (infinity's `debugengine` idea).

The adapters are real files in the real format, built directly from a base model: a prompt adapter is
the base's P0 of a category prompt plus a random offset (what prompt tuning produces), a linear probe
perturbs head tensors, a LoRA adds random low-rank factors. They are meaningless detectors but exercise
every code path of loading, verification, batching and isolation.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adapt import get_strategy
from adapt.adapter import Adapter, base_fingerprint, save_adapter
from adapt.strategies import LORA_DEFAULT_TARGETS
from backbone.model import GLIP
from backbone.processor import GLIPProcessor


def tiny_base(seed: int = 0) -> GLIP:
    """The tiny random GLIP of the tests, with scores raised so that detections exist at threshold 0."""
    from backbone.config import tiny_for_tests

    torch.manual_seed(seed)
    model = GLIP.from_config(tiny_for_tests()).eval()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)
    return model


def random_adapter(base: GLIP, processor: GLIPProcessor, task: str, categories: list[str], *,
                   strategy: str = "prompt-tune", seed: int = 0, offset: float = 0.1) -> Adapter:
    """An untrained adapter of `strategy` for `categories` on `base`: the base's P0 plus random offsets, and random
    head weights or LoRA factors where the strategy carries them (`base` must still have its language backbone)."""
    generator = torch.Generator().manual_seed(seed)
    [tokens] = processor.tokenize(categories)
    with torch.no_grad():
        prompt = base.encode_prompt(tokens.input_ids, tokens.attention_mask)
    hidden = prompt.hidden + offset * torch.randn(prompt.hidden.shape, generator=generator)  # (1, T, D)
    prompt = type(prompt)(hidden, hidden.clone(), prompt.mask)
    state = base.state_dict()
    spec = get_strategy(strategy)
    weights, lora, lora_config = {}, {}, None
    for key in ("head.bias0", "head.dot_product_projection_text.weight", "head.dot_product_projection_text.bias"):
        if spec.carries_weight(key):  # the head tensors its strategy may replace
            weights[key] = state[key] + 0.2 * torch.randn(state[key].shape, generator=generator)
    if spec.lora:
        module = "head.dot_product_projection_text"
        out_dim, in_dim = state[f"{module}.weight"].shape
        lora_config = {"r": 4, "alpha": 8, "target_modules": [module]}
        lora = {f"{module}.lora_A.weight": 0.5 * torch.randn(4, in_dim, generator=generator),
                f"{module}.lora_B.weight": 0.5 * torch.randn(out_dim, 4, generator=generator)}
    return Adapter(strategy=strategy, task=task, categories=[{"name": c, "prefix": "", "suffix": ""} for c in categories],
                   prompt=prompt, positive_map=tokens.positive_map, input_ids=tokens.input_ids,
                   caption=tokens.caption, base_model=base.config.name, base_fingerprint=base_fingerprint(base),
                   weights=weights, lora=lora, lora_config=lora_config)


def heaviest_adapter(base: GLIP, processor: GLIPProcessor, task: str, *, rank: int, max_tokens: int,
                     seed: int = 0) -> Adapter:
    """The costliest adapter a server with these bounds accepts, as a tenant out to slow the others down would
    build it: a LoRA of `rank` on every default LoRA target and a prompt of as many categories as fit
    `max_tokens` tokens."""
    count = 1
    while len(chunks := processor.tokenize([f"object {i}" for i in range(count + 1)])) == 1 and \
            chunks[0].input_ids.shape[1] <= max_tokens:
        count += 1
    adapter = random_adapter(base, processor, task, [f"object {i}" for i in range(count)], strategy="lora", seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    targets = [name for name, module in base.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA_DEFAULT_TARGETS, name)]
    lora = {}
    for name in targets:
        out_dim, in_dim = base.get_submodule(name).weight.shape
        lora[f"{name}.lora_A.weight"] = 0.01 * torch.randn(rank, in_dim, generator=generator)
        lora[f"{name}.lora_B.weight"] = 0.01 * torch.randn(out_dim, rank, generator=generator)
    adapter.lora, adapter.lora_config = lora, {"r": rank, "alpha": rank, "target_modules": targets}
    return adapter


def write_adapter(base: GLIP, processor: GLIPProcessor, directory: str | Path, task: str, categories: list[str],
                  **kwargs) -> Path:
    return save_adapter(random_adapter(base, processor, task, categories, **kwargs),
                        Path(directory) / f"{task}.safetensors")


def image_bytes(width: int = 96, height: int = 64, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A random-noise image with a few flat rectangles, encoded."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        array[y: y + height // 3, x: x + width // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_bytes(side: int = 20000) -> bytes:
    """A tiny PNG that declares side x side pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# Adapters that are broken in each way a crafted or damaged upload can be; every one must be refused
# by validation, at upload, in the folder and in the CLI.
FAULTY_KINDS = ("p0_batch_2", "token_ids_float", "category_tokens_float", "tokens_outside_prompt", "unnamed_category",
                "nan_p0", "inf_p0", "wrong_width", "lora_nan", "lora_wrong_rank", "extra_tensor", "bad_json")


def faulty_adapter_bytes(base: GLIP, processor: GLIPProcessor, kind: str) -> bytes:
    """A safetensors adapter file for `base` broken as `kind` says (one of FAULTY_KINDS)."""
    import json

    from safetensors.torch import save

    strategy = "lora" if kind.startswith("lora") else "prompt-tune"
    adapter = random_adapter(base, processor, f"bad-{kind}", ["cat", "dog"], strategy=strategy, seed=3)
    tensors, meta = adapter.tensors(), adapter.metadata()
    hidden = tensors["prompt.hidden"]
    tokens = json.loads(meta["category_tokens"])
    if kind == "p0_batch_2":
        tensors["prompt.hidden"] = hidden.repeat(2, 1, 1)
    elif kind == "token_ids_float":
        tensors["prompt.input_ids"] = tensors["prompt.input_ids"].double() + 0.5
    elif kind == "category_tokens_float":
        meta["category_tokens"] = json.dumps([[t + 0.5 for t in row] for row in tokens])
    elif kind == "tokens_outside_prompt":
        meta["category_tokens"] = json.dumps([[t + 1000 for t in row] for row in tokens])
    elif kind == "unnamed_category":
        meta["categories"] = json.dumps([{"name": "cat"}, {"prefix": "", "suffix": ""}])
    elif kind in ("nan_p0", "inf_p0"):
        hidden[0, 0, 0] = float("nan") if kind == "nan_p0" else float("inf")
    elif kind == "wrong_width":
        tensors["prompt.hidden"] = hidden[..., :-1].contiguous()
    elif kind == "lora_nan":
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key][0, 0] = float("nan")
    elif kind == "lora_wrong_rank":
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    elif kind == "extra_tensor":
        tensors["payload"] = torch.zeros(4)
    elif kind == "bad_json":
        meta["lora_config"] = "{not json"
    else:
        raise ValueError(f"unknown faulty adapter kind {kind!r}; one of {', '.join(FAULTY_KINDS)}")
    return save(tensors, metadata=meta)


def chromium_path() -> str | None:
    """A Chromium binary for the browser test and the docs screenshot ($CHROMIUM, else Debian's `chromium`)."""
    import os
    import shutil

    return next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


def serve_in_thread(app, timeout_s: float = 30.0, limits=None):
    """Run `app` under uvicorn on a free 127.0.0.1 port in a daemon thread, configured as `adapt serve` runs it
    (`limits`: its HTTPLimits, for the read timeouts); a context manager yielding its URL."""
    import contextlib
    import socket
    import threading
    import time

    import uvicorn

    from adapt.serve.app import HTTPLimits
    from adapt.serve.server import http_config

    @contextlib.contextmanager
    def running():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(http_config(app, limits or HTTPLimits(), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"uvicorn did not start within {timeout_s:g} s")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(15)

    return running()


def drop_image(page, data: bytes, name: str = "photo.png") -> None:
    """Drop an image file on the web page's drop zone (a Playwright page), as a user's drag and drop does."""
    import base64

    page.evaluate("""([data, name]) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }""", [base64.b64encode(data).decode(), name])
