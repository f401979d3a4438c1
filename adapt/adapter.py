"""Adapter files: one safetensors file per task, naming its base model by fingerprint.

Layout (format version 1). Tensors:
  prompt.hidden                    (1, T, D) float  P0 of the task prompt, with any prompt-tuning offset applied
                                                    (GLIP's `embedded` = hidden x mask is rebuilt on load);
                                                    float32, or float16/bfloat16 when saved with prompt_dtype
                                                    (half the bytes; read back as float32)
  prompt.mask                      (1, T) int64
  prompt.positive_map              (C, T) uint8     tokens of each category (1 = positive)
  prompt.input_ids                 (1, T) int64     the tokenized prompt (to recompute P0 with a tuned BERT)
  weights.<model key>              tensors that replace the base's (linear-probe: 9 head tensors; finetune: all)
  lora.<peft key>                  LoRA matrices (lora strategy)
Header metadata (all strings, JSON where structured): format, format_version, strategy, task, categories,
prompt, category_tokens, base_model, base_fingerprint, lora_config, training, evaluation, toolkit_version.

Loading checks format, version, strategy, base fingerprint, tensor names, shapes and dtypes, and refuses
any mismatch with a message that names the base the adapter needs. Writes are atomic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from glip_io import atomic_write
from adapt import STRATEGY_NAMES, __version__
from backbone.outputs import PromptFeatures

FORMAT = "glip-adapt/adapter"
FORMAT_VERSION = 1
# Strategies whose adapter changes no base weight: they share one model in a server batch.
PROMPT_ONLY = ("prompt-tune",)


class AdapterError(ValueError):
    """An adapter file that cannot be used (corrupt, foreign, wrong base, wrong tensors)."""


@dataclass
class Adapter:
    strategy: str
    task: str
    categories: list[dict]  # [{"name", "prefix", "suffix"}], in label order
    prompt: PromptFeatures
    positive_map: Tensor  # (C, T) bool
    input_ids: Tensor  # (1, T)
    caption: str
    base_model: str
    base_fingerprint: str
    weights: dict[str, Tensor] = field(default_factory=dict)
    lora: dict[str, Tensor] = field(default_factory=dict)
    lora_config: dict | None = None
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    toolkit_version: str = __version__

    @property
    def category_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def shares_base(self) -> bool:
        """True when the adapter changes no base weight (its requests can share a batch with other tasks)."""
        return self.strategy in PROMPT_ONLY

    def tensors(self, prompt_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        # With real tokens only, `embedded` (= hidden x mask) equals `hidden`: store one, rebuild the other.
        hidden = self.prompt.hidden if prompt_dtype is None else self.prompt.hidden.to(prompt_dtype)
        out = {"prompt.hidden": hidden, "prompt.mask": self.prompt.mask}
        out["prompt.positive_map"] = self.positive_map.to(torch.uint8)
        out["prompt.input_ids"] = self.input_ids.long()
        out.update({f"weights.{k}": v for k, v in self.weights.items()})
        out.update({f"lora.{k}": v for k, v in self.lora.items()})
        return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "strategy": self.strategy, "task": self.task,
            "categories": json.dumps(self.categories), "prompt": self.caption,
            "category_tokens": json.dumps([row.nonzero().flatten().tolist() for row in self.positive_map]),
            "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
            "lora_config": json.dumps(self.lora_config), "training": json.dumps(self.training, default=str),
            "evaluation": json.dumps(self.evaluation, default=str), "toolkit_version": self.toolkit_version,
        }


PROMPT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_prompt_dtype(name: str | None) -> torch.dtype | None:
    """The storage dtype of P0 for `name` (None: as trained); refuses names outside PROMPT_DTYPES."""
    if name is None:
        return None
    if name not in PROMPT_DTYPES:
        raise AdapterError(f"prompt_dtype {name!r} is not one of {', '.join(PROMPT_DTYPES)}")
    return PROMPT_DTYPES[name]


def save_adapter(adapter: Adapter, path: str | Path, prompt_dtype: str | None = None) -> Path:
    """Write atomically: a crash leaves either the old file or the new one, never half of one.

    `prompt_dtype` ("float16"/"bfloat16") stores P0 at half width: a prompt adapter on GLIP-T is then half the
    bytes, and the scores move by the rounding of P0 (within 6e-5 on GLIP-T; see benchmarks/adapter_size.py)."""
    path = Path(path)
    if adapter.strategy not in STRATEGY_NAMES:
        raise AdapterError(f"unknown strategy {adapter.strategy!r}; expected one of {', '.join(STRATEGY_NAMES)}")
    dtype = resolve_prompt_dtype(prompt_dtype)
    return atomic_write(path, lambda tmp: save_file(adapter.tensors(dtype), str(tmp), metadata=adapter.metadata()))


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:
        raise AdapterError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                           "was the file truncated or is it another format?") from error
    if metadata.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a glip-adapt adapter (format {metadata.get('format')!r}); "
                           "adapters are written by `adapt prompt-tune|linear-probe|lora|finetune`")
    version = int(metadata.get("format_version", "0"))
    if version != FORMAT_VERSION:
        raise AdapterError(f"{path} has adapter format version {version}; this toolkit reads version "
                           f"{FORMAT_VERSION}. Upgrade glip-adapt or re-train the adapter.")
    return metadata


def load_adapter(path: str | Path, base=None, expect_strategy: str | None = None) -> Adapter:
    """Read an adapter; with `base` (a GLIP), refuse it unless it was trained on exactly that base."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise AdapterError(f"cannot read the tensors of {path} ({error}); the file is corrupt") from error
    strategy = meta.get("strategy", "")
    if strategy not in STRATEGY_NAMES:
        raise AdapterError(f"{path}: unknown strategy {strategy!r}")
    if expect_strategy and strategy != expect_strategy:
        raise AdapterError(f"{path} is a {strategy} adapter, not {expect_strategy}")
    required = {"prompt.hidden", "prompt.mask", "prompt.positive_map", "prompt.input_ids"}
    missing = required - set(tensors)
    if missing:
        raise AdapterError(f"{path} lacks tensors {sorted(missing)}; the file is damaged")
    adapter = Adapter(
        strategy=strategy, task=meta.get("task", ""), categories=json.loads(meta["categories"]),
        prompt=_prompt_features(tensors["prompt.hidden"], tensors["prompt.mask"]),
        positive_map=tensors["prompt.positive_map"].bool(), input_ids=tensors["prompt.input_ids"],
        caption=meta.get("prompt", ""), base_model=meta.get("base_model", ""),
        base_fingerprint=meta.get("base_fingerprint", ""),
        weights={k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")},
        lora={k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")},
        lora_config=json.loads(meta.get("lora_config") or "null"), training=json.loads(meta.get("training", "{}")),
        evaluation=json.loads(meta.get("evaluation", "{}")), toolkit_version=meta.get("toolkit_version", ""),
    )
    _check_consistency(adapter, path)
    if base is not None:
        check_base(adapter, base, path)
    return adapter


def _prompt_features(hidden: Tensor, mask: Tensor) -> PromptFeatures:
    if hidden.is_floating_point() and hidden.dtype != torch.float32:
        hidden = hidden.float()  # stored at half width to save bytes; computed with in float32
    mask = mask.long()
    return PromptFeatures(hidden, hidden * mask.unsqueeze(-1).to(hidden.dtype), mask)


def _check_consistency(adapter: Adapter, path: Path) -> None:
    p = adapter.prompt
    if p.hidden.dim() != 3 or p.hidden.shape != p.embedded.shape or p.mask.shape != p.hidden.shape[:2]:
        raise AdapterError(f"{path}: prompt tensors have inconsistent shapes {tuple(p.hidden.shape)}, "
                           f"{tuple(p.embedded.shape)}, {tuple(p.mask.shape)}")
    if not p.hidden.is_floating_point():
        raise AdapterError(f"{path}: prompt.hidden has dtype {p.hidden.dtype}, expected a float type")
    if adapter.positive_map.shape != (len(adapter.categories), p.length):
        raise AdapterError(f"{path}: positive map {tuple(adapter.positive_map.shape)} does not match "
                           f"{len(adapter.categories)} categories x {p.length} tokens")
    if adapter.strategy in ("linear-probe", "finetune") and not adapter.weights:
        raise AdapterError(f"{path}: a {adapter.strategy} adapter must carry weights.* tensors")
    if adapter.strategy == "lora" and (not adapter.lora or not adapter.lora_config):
        raise AdapterError(f"{path}: a lora adapter must carry lora.* tensors and its lora_config")


def base_fingerprint(model) -> str:
    """The fingerprint adapters record for their base (cached on the model; computed over every weight)."""
    cached = getattr(model, "_adapt_fingerprint", None)
    if cached is None:
        from backbone.checkpoints import fingerprint_state

        cached = fingerprint_state(model.state_dict())
        model._adapt_fingerprint = cached
    return cached


def check_base(adapter: Adapter, base, path: str | Path = "adapter") -> None:
    """Refuse an adapter trained on another base, or whose tensors do not fit this base."""
    ours = base_fingerprint(base)
    if adapter.base_fingerprint != ours:
        raise AdapterError(
            f"{path} was trained on base {adapter.base_model!r} (fingerprint {adapter.base_fingerprint[:12]}…) but the "
            f"loaded base {getattr(base.config, 'name', '?')!r} has fingerprint {ours[:12]}…; load it with "
            f"--base {adapter.base_model}")
    text_dim = base.config.text.hidden_size
    if adapter.prompt.hidden.shape[-1] != text_dim:
        raise AdapterError(f"{path}: prompt width {adapter.prompt.hidden.shape[-1]} != base text width {text_dim}")
    state = base.state_dict()
    for key, value in adapter.weights.items():
        if key not in state:
            raise AdapterError(f"{path}: weight {key!r} does not exist in the base model")
        if tuple(state[key].shape) != tuple(value.shape) or state[key].dtype != value.dtype:
            raise AdapterError(f"{path}: weight {key!r} is {tuple(value.shape)} {value.dtype}, the base has "
                               f"{tuple(state[key].shape)} {state[key].dtype}")


def describe(path: str | Path) -> str:
    """Everything an adapter file holds, for `adapt adapters inspect`."""
    meta = read_metadata(path)
    lines = [f"adapter {path} ({Path(path).stat().st_size:,} bytes)"]
    for key in ("strategy", "task", "base_model", "base_fingerprint", "format_version", "toolkit_version", "prompt"):
        lines.append(f"  {key:<17} {meta.get(key, '')}")
    categories = json.loads(meta.get("categories", "[]"))
    tokens = json.loads(meta.get("category_tokens", "[]"))
    lines.append(f"  categories ({len(categories)}):")
    for cat, toks in zip(categories, tokens):
        desc = (cat.get("prefix", "") + "…" + cat.get("suffix", "")).strip("…") if cat.get("prefix") or cat.get(
            "suffix") else ""
        lines.append(f"    {cat['name']:<24} tokens {toks} {desc}")
    for key in ("lora_config", "training", "evaluation"):
        value = json.loads(meta.get(key) or "null")
        if value:
            lines.append(f"  {key}: {json.dumps(value, sort_keys=True)}")
    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())
        lines.append(f"  tensors ({len(names)}):")
        for name in names[:40]:
            t = handle.get_slice(name)
            lines.append(f"    {name:<50} {t.get_shape()} {t.get_dtype()}")
        if len(names) > 40:
            lines.append(f"    … {len(names) - 40} more")
    return "\n".join(lines)



def weight_overrides(adapter: Adapter, base) -> dict[str, Tensor]:
    """Base-model tensors this adapter replaces, {model key: tensor}: linear-probe head tensors as stored,
    LoRA folded in (W + B·A·alpha/r), nothing for prompt tuning. A server runs a group of requests with
    `torch.func.functional_call(base, overrides, ...)`, never touching the shared weights.

    A finetune adapter replaces every weight: serve it as its own model instead.
    """
    if adapter.strategy == "finetune":
        raise AdapterError(f"adapter for task {adapter.task!r} is a full fine-tune; load it as its own model "
                           "(`adapt adapters merge`, then --base MERGED.safetensors)")
    overrides = dict(adapter.weights)
    if adapter.strategy == "lora":
        scale = float(adapter.lora_config["alpha"]) / float(adapter.lora_config["r"])
        state = base.state_dict()
        for key in sorted(k for k in adapter.lora if k.endswith(".lora_A.weight")):
            module = key.removesuffix(".lora_A.weight")
            down, up = adapter.lora[key], adapter.lora[f"{module}.lora_B.weight"]
            weight = state[f"{module}.weight"]
            overrides[f"{module}.weight"] = weight + (up.to(weight.dtype) @ down.to(weight.dtype)) * scale
    return overrides


def apply_adapter(base, adapter: Adapter) -> None:
    """Fold an adapter's weights into a base model this process owns (CLI eval/predict/merge; never a shared
    server model). Prompt tuning changes no weight: its P0 travels with the adapter."""
    if adapter.strategy == "finetune":
        base.load_state_dict(adapter.weights, strict=True)
        return
    overrides = weight_overrides(adapter, base)
    if overrides:
        state = base.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in overrides.items()})
        base.load_state_dict(state, strict=True)


def merge_adapter(path: str | Path, out: str | Path, base_name: str | None = None) -> Path:
    """A standalone model: the base with the adapter's weights folded in, carrying the adapter itself (its P0,
    categories and metadata) under "adapter.*" tensors and "adapter_metadata", so one file deploys one task."""
    from backbone.checkpoints import save_model
    from backbone.model import GLIP

    meta = read_metadata(path)
    base = GLIP.from_pretrained(base_name or meta["base_model"])
    adapter = load_adapter(path, base=base)
    apply_adapter(base, adapter)
    save_model(base, out, merged_adapter=json.dumps(adapter.metadata()))
    with safe_open(str(out), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors.update({f"adapter.{k}": v for k, v in adapter.tensors().items() if k.startswith("prompt.")})
    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_merged(path: str | Path) -> Adapter | None:
    """The task adapter embedded in a merged model file (its weights are already folded in), else None."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            if meta.get("format") != "glip-adapt/model" or "merged_adapter" not in meta:
                return None
            tensors = {k.removeprefix("adapter.prompt."): handle.get_tensor(k) for k in handle.keys()
                       if k.startswith("adapter.prompt.")}
    except Exception:
        return None
    info = json.loads(meta["merged_adapter"])
    return Adapter(strategy="prompt-tune", task=info["task"], categories=json.loads(info["categories"]),
                   prompt=_prompt_features(tensors["hidden"], tensors["mask"]),
                   positive_map=tensors["positive_map"].bool(), input_ids=tensors["input_ids"],
                   caption=info["prompt"], base_model=str(path), base_fingerprint="",
                   training=json.loads(info["training"]), evaluation=json.loads(info["evaluation"]))
