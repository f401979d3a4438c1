"""The adapter pool: one frozen base, many adapter files, loaded lazily into an LRU bounded by bytes.

The directory is the registry: `<dir>/<name>.safetensors` is task `name` (the format of `adapt.adapter`).
Registering costs a directory entry; an adapter is checked against the size cap by its stat, then read,
verified against the base (format version, fingerprint, magnitudes and every check of
`adapt.adapter.load_adapter`) and against the server's bounds on one adapter's cost (LoRA rank, prompt
length), and attached on first use (LoRA factors kept at rank r; their dense update exists only while a
group runs), and kept while it fits `max_bytes`; a refused file is remembered, as its message only, until
it changes. An adapter version that fails at run time twice is quarantined until a new
version replaces it. A file changed on disk (an upload, possibly by another server
process) is noticed by its stat and reloaded on the next request; an evicted one reloads transparently.
Uploads are verified in a temporary file beside the target and moved over it atomically, so a bad
upload never replaces a working adapter. Modelled on lorax's adapter cache (LRU of loaded adapters).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from glip_io import atomic_write
from adapt import STRATEGIES
from adapt.adapter import Adapter, AdapterError, base_fingerprint, check_shareable, load_adapter
from adapt.adapter import base_magnitudes, lora_scale
from adapt.serve.lora import LoRAFactors
from backbone.outputs import PromptFeatures

SUFFIX = ".safetensors"
# Lower-case letters, digits, '.', '_', '-', starting with a letter or digit; matched with re.fullmatch, so
# nothing may follow (a `$` anchor would admit a trailing newline). No '/' and no leading '.', so no path parts.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SAFETENSORS_MAX_HEADER = 100 * 2**20


class InvalidAdapterName(ValueError):
    """A task/adapter name that could escape the adapter directory or is not a plain identifier."""


class UnknownAdapter(KeyError):
    """No adapter file of that name."""


def validate_name(name: str) -> str:
    """Return `name` if it is a safe adapter name, else raise InvalidAdapterName naming the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (e.g. 'icons-aquarium')")
    return name


def list_adapters(directory: str | Path) -> list[str]:
    """Every registered task: the valid names of the directory's adapter files, sorted."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            stem = entry.name[: -len(SUFFIX)] if entry.name.endswith(SUFFIX) else None
            if stem and _NAME.fullmatch(stem) and entry.is_file():
                found.append(stem)
    return sorted(found)


def adapter_exists(directory: str | Path, name: str) -> bool:
    try:
        return (Path(directory) / f"{validate_name(name)}{SUFFIX}").is_file()
    except InvalidAdapterName:
        return False


class AdapterQuarantined(AdapterError):
    """An adapter version that failed at run time twice; it is refused until a new version replaces it."""


@dataclass
class LoadedAdapter:
    """An adapter verified against the base and ready to run.

    Attributes:
        name: the task name it serves under (its file name).
        version: first 16 hex digits of the file's sha256; changes with every new upload.
        adapter: the adapter as read from the file.
        overrides: base-model tensors it replaces (a linear probe's head tensors; {} otherwise).
        lora: its LoRA factors at rank r, folded into its targets' weights only while its group runs (None
            unless a lora adapter).
        nbytes: bytes held by its tensors (what the LRU bound counts).
        stamp: (inode, size, mtime_ns) of the file it was read from.
        load_seconds: time to read, verify and attach it.
    """

    name: str
    version: str
    adapter: Adapter
    overrides: dict[str, Tensor]
    nbytes: int
    stamp: tuple[int, int, int]
    load_seconds: float
    lora: LoRAFactors | None = None

    @property
    def shares_base(self) -> bool:
        """Whether its requests run in the batch's shared pass (prompt tuning): it changes no base weight."""
        return not self.overrides and self.lora is None

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    @property
    def prompt(self) -> PromptFeatures:
        return self.adapter.prompt

    @property
    def strategy(self) -> str:
        return self.adapter.strategy


class _BaseView:
    """What `check_base` reads of the base (config, fingerprint, magnitudes, names/shapes/dtypes of its tensors),
    cached.

    `GLIP.state_dict()` walks every module (~ms for GLIP-T); verification needs only shapes, dtypes and norms,
    so a dict of meta tensors built once keeps a cold prompt-adapter load at a few milliseconds.
    """

    def __init__(self, base, fingerprint: str):
        self.config = base.config
        self._adapt_fingerprint = fingerprint
        self._adapt_magnitudes = base_magnitudes(base)  # while the base still has its text encoder
        self._state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in base.state_dict().items()}

    def state_dict(self) -> dict[str, Tensor]:
        return self._state


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _unique_nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _share_embedded(prompt: PromptFeatures) -> PromptFeatures:
    """`embedded` is `hidden` zeroed at padding; for an unpadded prompt they are equal, so keep one copy."""
    if bool(prompt.mask.all()) and prompt.embedded.data_ptr() != prompt.hidden.data_ptr() and \
            prompt.embedded.shape == prompt.hidden.shape and bool((prompt.embedded == prompt.hidden).all()):
        return PromptFeatures(prompt.hidden, prompt.hidden, prompt.mask)
    return prompt


class AdapterPool:
    """Adapters for one base model, from one directory.

    Args:
        base: the frozen GLIP every adapter must have been trained on.
        directory: where `<name>.safetensors` files live (created if missing; uploads go here).
        max_bytes: bound on the loaded adapters' tensor bytes; least recently used ones are evicted.
        max_upload_bytes: largest adapter file, uploaded or in the directory (a larger one is never read).
        device: where loaded adapters' tensors live (the model's device).
        max_failures: run-time failures after which an adapter version is quarantined.
        max_lora_rank: largest LoRA rank served (bounds one adapter's compute and memory).
        max_prompt_tokens: longest adapter prompt served, in tokens (bounds one adapter's fusion cost).
    """

    def __init__(self, base, directory: str | Path, *, max_bytes: int = 256 * 2**20,
                 max_upload_bytes: int = 64 * 2**20, device: torch.device | str = "cpu", max_failures: int = 2,
                 max_lora_rank: int = 64, max_prompt_tokens: int = 256):
        self.base = base
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes
        self.device = torch.device(device)
        self.max_failures = max_failures
        self.max_lora_rank = max_lora_rank
        self.max_prompt_tokens = max_prompt_tokens
        self.fingerprint = base_fingerprint(base)
        self._base_view = _BaseView(base, self.fingerprint)
        self._cache: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        # name -> (file stamp, why), until the file changes. Only the message: an exception's traceback would keep
        # the frames of the failed load alive, and with them whatever they had read.
        self._refused: dict[str, tuple[tuple, str]] = {}
        self._failures: dict[tuple[str, str], int] = {}  # (name, version) -> run-time failures
        self.hits = self.misses = self.evictions = self.loads = 0

    # ------------------------------------------------------------------------------------------ registry

    def path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        return list_adapters(self.directory)

    def exists(self, name: str) -> bool:
        return adapter_exists(self.directory, name)

    # --------------------------------------------------------------------------------------------- cache

    def get(self, name: str) -> LoadedAdapter:
        """The loaded adapter for `name`, reading and verifying it if it is not cached or changed on disk.

        Raises:
            UnknownAdapter: no such file. InvalidAdapterName: a name that is not allowed.
            AdapterError: the file is not a usable adapter for this base (e.g. a full fine-tune), or
                AdapterQuarantined: this version failed at run time `max_failures` times.
        """
        path = self.path(name)
        try:
            stamp = _stamp(path)
        except FileNotFoundError:
            with self._lock:
                self._drop(name)
            raise UnknownAdapter(name) from None
        with self._lock:
            entry = self._cache.get(name)
            if entry is not None and entry.stamp == stamp:
                self._cache.move_to_end(name)
                self.hits += 1
                return self._unless_quarantined(entry)
            refused = self._refused.get(name)
            if refused is not None and refused[0] == stamp:
                raise AdapterError(refused[1])  # the same bad file: refused again without reading it again
            self.misses += 1
        try:
            entry = self._load(name, path)
        except AdapterError as error:
            entry, refusal = None, str(error)
        if entry is None:  # raised outside the handler, so that no chained exception keeps the failed load's frames
            with self._lock:
                self._drop(name)
                self._refused[name] = (stamp, refusal)
            raise AdapterError(refusal)
        with self._lock:
            self._refused.pop(name, None)
            self._insert(entry)
        return self._unless_quarantined(entry)

    def cached(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            return self._cache.get(name)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._bytes = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "loads": self.loads, "evictions": self.evictions,
                    "bytes": self._bytes, "entries": len(self._cache), "max_bytes": self.max_bytes,
                    "quarantined": sum(n >= self.max_failures for n in self._failures.values())}

    def _load(self, name: str, path: Path) -> LoadedAdapter:
        """Read a file of the directory: its size checked first (stat), then parsed through safetensors' own
        reader and hashed in blocks, so no more than the size cap is ever read and nothing keeps the raw bytes."""
        start = time.perf_counter()
        try:
            for _ in range(3):  # retry if the file is replaced while we read it
                before = _stamp(path)
                self._check_size(name, before[1])
                adapter = _verified(self._base_view, path, name)
                version = _file_version(path)
                if _stamp(path) == before:
                    break
            else:
                raise AdapterError(f"adapter {name!r} keeps changing while it is read; retry")
            entry = self._attach(name, adapter, version, before)
        except AdapterError:
            raise
        except Exception as error:  # a refusal naming the adapter, never a 500
            raise AdapterError(f"adapter {name!r} cannot be used ({type(error).__name__}); re-export it") from None
        entry.load_seconds = time.perf_counter() - start
        self.loads += 1
        return entry

    def _check_size(self, name: str, size: int) -> None:
        if size > self.max_upload_bytes:
            raise AdapterError(f"adapter {name!r} is {size:,} bytes, over this server's limit of "
                               f"{self.max_upload_bytes:,} bytes per adapter file (max_upload_bytes); serve a "
                               "smaller adapter (lower LoRA rank, fewer targets) or raise the limit")

    def _check_cost(self, name: str, adapter: Adapter) -> None:
        """The server's bounds on what one adapter may cost per request."""
        if adapter.prompt.length > self.max_prompt_tokens:
            raise AdapterError(f"adapter {name!r} has a prompt of {adapter.prompt.length} tokens, over this server's "
                               f"limit of {self.max_prompt_tokens} (max_prompt_tokens); shorten the category names "
                               "or descriptions and re-train")
        rank = (adapter.lora_config or {}).get("r", 0)
        if rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r} has LoRA rank {rank}, over this server's limit of "
                               f"{self.max_lora_rank} (max_lora_rank); re-train with a lower --lora-r")

    def _attach(self, name: str, adapter: Adapter, version: str, stamp) -> LoadedAdapter:
        """Ready `adapter` the way its strategy declares it is served (StrategySpec.serving): its P0 only, its
        override tensors, its LoRA factors, or refused when it is its own model."""
        check_shareable(adapter)  # the "load it as its own model" AdapterError
        self._check_cost(name, adapter)
        lora = None
        if adapter.spec.serving == "lora":
            targets = adapter.lora_config["target_modules"]
            scale = lora_scale(adapter.lora_config)
            lora = LoRAFactors({t: adapter.lora[f"{t}.lora_A.weight"].to(self.device) for t in targets},
                               {t: adapter.lora[f"{t}.lora_B.weight"].to(self.device) for t in targets}, scale)
            adapter.lora = {}  # the factors above are what runs; no dense copy of any weight is made
        overrides = {k: v.to(self.device) for k, v in adapter.weights.items()}
        adapter.prompt = _share_embedded(adapter.prompt).to(self.device)
        adapter.positive_map = adapter.positive_map.to(self.device)
        tensors = [*adapter.prompt.state_dict().values(), adapter.positive_map, adapter.input_ids, *overrides.values(),
                   *(lora.down.values() if lora else ()), *(lora.up.values() if lora else ())]
        adapter.weights = overrides
        return LoadedAdapter(name=name, version=version, adapter=adapter, overrides=overrides,
                             nbytes=_unique_nbytes(tensors), stamp=stamp, load_seconds=0.0, lora=lora)

    def _insert(self, entry: LoadedAdapter) -> None:
        self._drop(entry.name)
        self._cache[entry.name] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1

    def _drop(self, name: str) -> None:
        old = self._cache.pop(name, None)
        if old is not None:
            self._bytes -= old.nbytes

    # ---------------------------------------------------------------------------------------- quarantine

    def record_failure(self, entry: LoadedAdapter) -> bool:
        """Count a run-time failure of this adapter version; True once it is quarantined."""
        with self._lock:
            count = self._failures[entry.key] = self._failures.get(entry.key, 0) + 1
        return count >= self.max_failures

    def quarantined(self, entry: LoadedAdapter) -> bool:
        return self._failures.get(entry.key, 0) >= self.max_failures

    def _unless_quarantined(self, entry: LoadedAdapter) -> LoadedAdapter:
        if self.quarantined(entry):
            raise AdapterQuarantined(f"adapter {entry.name!r} (version {entry.version}) failed {self.max_failures} "
                                     "times at run time and is quarantined; an admin must upload a new version")
        return entry

    # ------------------------------------------------------------------------------------------- listing

    def status(self, name: str) -> dict:
        """What an admin sees of one adapter: version, strategy, bytes and whether it serves (loads it)."""
        info = {"name": name, "adapter_version": None, "strategy": None, "status": "ok", "message": None}
        try:
            entry = self.get(name)
            info.update(adapter_version=entry.version, strategy=entry.strategy, categories=entry.adapter.category_names)
        except AdapterQuarantined as error:
            entry = self.cached(name)
            info.update(adapter_version=entry and entry.version, strategy=entry and entry.strategy,
                        status="quarantined", message=str(error))
        except (AdapterError, UnknownAdapter) as error:
            info.update(status="refused", message=str(error))
        return info

    # ------------------------------------------------------------------------------------------- uploads

    def put(self, name: str, data: bytes) -> LoadedAdapter:
        """Verify `data` as an adapter for this base, then atomically make it task `name`'s adapter.

        Any failure of the verification (whatever raises it) is an AdapterError and leaves the served file as it
        was, byte for byte.

        Raises:
            InvalidAdapterName, AdapterError (not safetensors, too large, wrong base, full fine-tune, ...).
        """
        path = self.path(name)
        self._check_size(name, len(data))
        _check_safetensors_header(data)
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=f".{name}.", suffix=".upload") as staged:
                staged.write(data)  # verified from a private copy; only a verified upload replaces the served file
                staged.flush()
                adapter = _verified(self._base_view, staged.name, name)
            entry = self._attach(name, adapter, hashlib.sha256(data).hexdigest()[:16], (0, 0, 0))
        except AdapterError:
            raise
        except Exception as error:  # a refusal, never a 500 that half-applies
            raise AdapterError(f"adapter {name!r} cannot be used ({type(error).__name__}); re-export it") from None
        with self._lock:
            try:
                atomic_write(path, data)  # readers see the old file or the new one
            except OSError as error:
                raise AdapterError(f"adapter {name!r} could not be stored ({type(error).__name__}); the served "
                                   "version is unchanged; retry, or ask the admin to free disk space") from None
            entry.stamp = _stamp(path)
            self._refused.pop(name, None)
            self._insert(entry)
        return entry

    def delete(self, name: str) -> bool:
        path = self.path(name)
        with self._lock:
            self._drop(name)
            self._refused.pop(name, None)
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        return True


def _file_version(path: Path) -> str:
    """First 16 hex digits of the file's sha256, read in blocks (the version a client sees)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def _verified(base_view, path, name: str) -> Adapter:
    """load_adapter with the task name, never a server path, in its messages."""
    return load_adapter(path, base=base_view, source=f"adapter {name!r}")


def _check_safetensors_header(data: bytes) -> None:
    """Cheap structural check before anything parses the upload: 8-byte length + a JSON header."""
    if len(data) < 10:
        raise AdapterError("upload is not a safetensors file (too short); adapters are .safetensors files")
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > min(_SAFETENSORS_MAX_HEADER, len(data) - 8) or data[8:9] != b"{":
        shared = "|".join(name for name, spec in STRATEGIES.items() if spec.serving != "own-model")
        raise AdapterError("upload is not a safetensors file (bad header); only .safetensors adapters written by "
                           f"`adapt {shared}` are accepted")
