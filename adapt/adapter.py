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

Loading validates everything a crafted or damaged file could get wrong (format, version, tensor names,
shapes with the batch dimension, dtypes, finite values, metadata types, category names, token ids, the
rules of the strategy, and with a base its fingerprint and tensor fit) and refuses any mismatch with one
AdapterError that says what to do. Writes are atomic.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from glip_io import atomic_write
from adapt import STRATEGIES, StrategySpec, __version__, get_strategy
from backbone.device import DTYPES
from backbone.outputs import PromptFeatures

FORMAT = "glip-adapt/adapter"
FORMAT_VERSION = 1


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
    config: dict = field(default_factory=dict)  # the run's options: `adapt <strategy> --config ADAPTER` reruns it
    toolkit_version: str = __version__

    @property
    def category_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        """Each category's id in the task's annotation files (position + 1 where the adapter stores none)."""
        return [int(c.get("id", i + 1)) for i, c in enumerate(self.categories)]

    @property
    def spec(self) -> StrategySpec:
        """Its strategy's declaration (what it carries, how it serves and exports)."""
        return get_strategy(self.strategy)

    @property
    def shares_base(self) -> bool:
        """True when the adapter changes no base weight (its requests can share a batch with other tasks)."""
        return self.spec.serving == "prompt"

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
            "config": json.dumps(self.config, default=str),
        }


def resolve_prompt_dtype(name: str | None) -> torch.dtype | None:
    """The storage dtype of P0 for `name` (None: as trained); refuses names outside `backbone.device.DTYPES`."""
    if name is None:
        return None
    if name not in DTYPES:
        raise AdapterError(f"prompt_dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def save_adapter(adapter: Adapter, path: str | Path, prompt_dtype: str | None = None) -> Path:
    """Write atomically: a crash leaves either the old file or the new one, never half of one.

    `prompt_dtype` ("float16"/"bfloat16") stores P0 at half width: a prompt adapter on GLIP-T is then half the
    bytes, and the scores move by the rounding of P0 (within 6e-5 on GLIP-T; see benchmarks/adapter_size.py)."""
    path = Path(path)
    if adapter.strategy not in STRATEGIES:
        raise AdapterError(f"unknown strategy {adapter.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    dtype = resolve_prompt_dtype(prompt_dtype)
    return atomic_write(path, lambda tmp: save_file(adapter.tensors(dtype), str(tmp), metadata=adapter.metadata()))


def read_adapter_header(path: str | Path, source: str | None = None) -> dict[str, str]:
    """The header metadata of an adapter file, refusing any file that is not one; `source` names it in errors
    (default: the path)."""
    path = Path(path)
    label = source or str(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {label} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:
        raise AdapterError(f"{label} is not a readable safetensors file ({type(error).__name__}); "
                           "was the file truncated or is it another format?") from None
    if metadata.get("format") != FORMAT:
        raise AdapterError(f"{label} is not a glip-adapt adapter (format {metadata.get('format')!r}); "
                           f"adapters are written by `adapt {'|'.join(STRATEGIES)}`")
    version = metadata.get("format_version", "0")
    if version != str(FORMAT_VERSION):
        raise AdapterError(f"{label} has adapter format version {version!r}; this toolkit reads version "
                           f"{FORMAT_VERSION}. Upgrade glip-adapt or re-train the adapter.")
    return metadata


def load_adapter(path: str | Path, base=None, expect_strategy: str | None = None, *,
                 source: str | None = None) -> Adapter:
    """Read and validate an adapter; with `base` (a GLIP), refuse it unless it fits exactly that base.

    Every check of `validate_adapter` runs here, so the CLI, a server's folder scan and an upload refuse the
    same files. Any failure, whatever raised it, is an AdapterError naming `source` (default: the path).
    """
    path = Path(path)
    label = source or str(path)
    meta = read_adapter_header(path, label)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise AdapterError(f"cannot read the tensors of {label} ({type(error).__name__}); the file is corrupt; "
                           "re-export it") from None
    try:
        strategy = meta.get("strategy", "")
        if strategy not in STRATEGIES:
            raise AdapterError(f"{label}: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if expect_strategy and strategy != expect_strategy:
            raise AdapterError(f"{label} is a {strategy} adapter, not {expect_strategy}")
        _check_tensors(tensors, label)
        adapter = Adapter(
            strategy=strategy, task=_meta_str(meta, "task", label), categories=_meta_json(meta, "categories", label),
            prompt=_prompt_features(tensors["prompt.hidden"], tensors["prompt.mask"]),
            positive_map=tensors["prompt.positive_map"].bool(), input_ids=tensors["prompt.input_ids"],
            caption=_meta_str(meta, "prompt", label), base_model=_meta_str(meta, "base_model", label),
            base_fingerprint=_meta_str(meta, "base_fingerprint", label),
            weights={k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")},
            lora={k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")},
            lora_config=_meta_json(meta, "lora_config", label, "null"),
            training=_meta_json(meta, "training", label, "{}"), evaluation=_meta_json(meta, "evaluation", label, "{}"),
            config=_meta_json(meta, "config", label, "{}"),
            toolkit_version=meta.get("toolkit_version", ""),
        )
        validate_adapter(adapter, label, category_tokens=_meta_json(meta, "category_tokens", label, "null"))
        if base is not None:
            check_base(adapter, base, label)
    except AdapterError as error:
        message = str(error)
        if any(fix in message for fix in _FIXES):
            raise
        raise AdapterError(f"{message}; re-train or re-export the adapter") from None
    except Exception as error:  # whatever a crafted file makes a check trip over is a refusal, never a crash
        raise AdapterError(f"{label} is not a valid adapter ({type(error).__name__}: {error}); re-export it "
                           f"with `adapt {'|'.join(STRATEGIES)}`") from None
    return adapter


_FIXES = ("re-", "load it", "pass ", "upgrade", "Upgrade", "serve it")  # messages that already name their next step


def _meta_str(meta: dict, key: str, label: str) -> str:
    value = meta.get(key, "")
    if not isinstance(value, str):
        raise AdapterError(f"{label}: metadata {key!r} must be a string")
    return value


def _meta_json(meta: dict, key: str, label: str, default: str | None = None):
    text = meta.get(key, default)
    if text is None:
        raise AdapterError(f"{label}: metadata {key!r} is missing; re-export the adapter")
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise AdapterError(f"{label}: metadata {key!r} is not valid JSON; re-export the adapter") from None


def _prompt_features(hidden: Tensor, mask: Tensor) -> PromptFeatures:
    if hidden.is_floating_point() and hidden.dtype != torch.float32:
        hidden = hidden.float()  # stored at half width to save bytes; computed with in float32
    mask = mask.long()
    return PromptFeatures(hidden, hidden * mask.unsqueeze(-1).to(hidden.dtype), mask)


_REQUIRED = ("prompt.hidden", "prompt.mask", "prompt.positive_map", "prompt.input_ids")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTEGERS = (torch.int64, torch.int32)
_FLAGS = (torch.bool, torch.uint8, torch.int64, torch.int32)


def _check_tensors(tensors: dict[str, Tensor], label: str) -> None:
    """Names, shapes (batch dimension included), dtypes and values of the prompt tensors; finite floats."""
    missing = [k for k in _REQUIRED if k not in tensors]
    if missing:
        raise AdapterError(f"{label} lacks tensors {missing}; the file is damaged, re-export it")
    unknown = [k for k in tensors if k not in _REQUIRED and not k.startswith(("weights.", "lora."))]
    if unknown:
        raise AdapterError(f"{label} has unexpected tensors {sorted(unknown)[:5]}; an adapter holds prompt.*, "
                           "weights.* and lora.* tensors only")
    hidden, mask = tensors["prompt.hidden"], tensors["prompt.mask"]
    positive, ids = tensors["prompt.positive_map"], tensors["prompt.input_ids"]
    if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
        raise AdapterError(f"{label}: prompt.hidden (P0) is {tuple(hidden.shape)}; it must be (1, T, D): one prompt "
                           "(batch size 1) of T >= 1 tokens")
    length = hidden.shape[1]
    if hidden.dtype not in _FLOATS:
        raise AdapterError(f"{label}: prompt.hidden has dtype {hidden.dtype}; expected float32, float16 or bfloat16")
    for name, tensor, dtypes in (("prompt.mask", mask, _FLAGS), ("prompt.input_ids", ids, _INTEGERS)):
        if tuple(tensor.shape) != (1, length):
            raise AdapterError(f"{label}: {name} is {tuple(tensor.shape)}; it must be (1, {length}) like P0")
        if tensor.dtype not in dtypes:
            raise AdapterError(f"{label}: {name} has dtype {tensor.dtype}; token ids and masks must be integers")
    if positive.dim() != 2 or positive.shape[0] < 1 or positive.shape[1] != length or positive.dtype not in _FLAGS:
        raise AdapterError(f"{label}: prompt.positive_map is {tuple(positive.shape)} {positive.dtype}; it must be "
                           f"(C, {length}) uint8 with C >= 1 categories")
    for name, tensor in (("prompt.mask", mask), ("prompt.positive_map", positive)):
        if not bool(((tensor == 0) | (tensor == 1)).all()):
            raise AdapterError(f"{label}: {name} holds values other than 0 and 1")
    if not bool(mask.bool().any()) or int(ids.min()) < 0:
        raise AdapterError(f"{label}: the prompt has no real token or a negative token id")
    if bool((positive.bool() & ~mask.bool()).any()):
        raise AdapterError(f"{label}: prompt.positive_map points at padding tokens outside the prompt")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{label}: tensor {name} holds NaN or Inf values; the adapter diverged in training, "
                               "re-train it (e.g. with a lower --lr)")
        if name.startswith(("weights.", "lora.")) and not tensor.is_floating_point():
            raise AdapterError(f"{label}: tensor {name} has dtype {tensor.dtype}; weights must be float")


# Metadata strings must be text: no lone surrogates (they cannot be encoded, so any reply naming them would fail)
# and no control characters, except tab and line breaks in the free-text records (training, evaluation, config).
_NOT_NAME_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NOT_FREE_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_FREE_TEXT_FIELDS = ("training", "evaluation", "config")


def _check_text(value, field_name: str, label: str, pattern: re.Pattern) -> None:
    """Every string in `value` (a decoded JSON value: keys included) is text by `pattern`'s rule."""
    if isinstance(value, str):
        bad = pattern.search(value)
        if bad:
            kind = "a lone surrogate" if 0xD800 <= ord(bad[0]) <= 0xDFFF else "a control character"
            raise AdapterError(f"{label}: metadata {field_name!r} holds {kind} (U+{ord(bad[0]):04X}), which is not "
                               "text; every name must be valid Unicode text; fix it and re-export the adapter")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, field_name, label, pattern)
            _check_text(item, field_name, label, pattern)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, field_name, label, pattern)


def _check_metadata_text(adapter: Adapter, label: str) -> None:
    for name in ("strategy", "task", "categories", "caption", "base_model", "base_fingerprint", "lora_config",
                 "toolkit_version", *_FREE_TEXT_FIELDS):
        pattern = _NOT_FREE_TEXT if name in _FREE_TEXT_FIELDS else _NOT_NAME_TEXT
        _check_text(getattr(adapter, name, None), "prompt" if name == "caption" else name, label, pattern)


def validate_adapter(adapter: Adapter, label: str = "adapter", category_tokens: list | None = None) -> None:
    """Metadata types and text, and the rules of the adapter's strategy (what any base requires; see check_base)."""
    _check_metadata_text(adapter, label)
    cats, positive = adapter.categories, adapter.positive_map
    if not isinstance(cats, list) or len(cats) != positive.shape[0]:
        raise AdapterError(f"{label}: metadata 'categories' must list {positive.shape[0]} categories, one per row "
                           "of prompt.positive_map")
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str) or not cat["name"].strip():
            raise AdapterError(f"{label}: category {i + 1} has no name; every category needs a non-empty "
                               "'name' string")
        if any(not isinstance(cat.get(k, ""), str) for k in ("prefix", "suffix")) or \
                type(cat.get("id", 0)) is not int:
            raise AdapterError(f"{label}: category {cat['name']!r} has a non-string prefix/suffix or a "
                               "non-integer id")
        if not bool(positive[i].any()):
            raise AdapterError(f"{label}: category {cat['name']!r} maps to no prompt token")
    if category_tokens is not None:
        length = positive.shape[1]
        if not isinstance(category_tokens, list) or len(category_tokens) != len(cats) or any(
                not isinstance(row, list) or any(type(t) is not int or not 0 <= t < length for t in row)
                for row in category_tokens):
            raise AdapterError(f"{label}: metadata 'category_tokens' must be {len(cats)} lists of integer token "
                               f"ids within the prompt's {length} tokens")
        if category_tokens != [row.nonzero().flatten().tolist() for row in positive]:
            raise AdapterError(f"{label}: metadata 'category_tokens' disagrees with prompt.positive_map")
    for key in ("training", "evaluation", "config"):
        if not isinstance(getattr(adapter, key), dict):
            raise AdapterError(f"{label}: metadata {key!r} must be a JSON object")
    _check_strategy(adapter, label)
    if adapter.lora_config is not None and abs(lora_scale(adapter.lora_config)) > MAX_LORA_SCALE:
        raise AdapterError(f"{label}: LoRA alpha/r = {lora_scale(adapter.lora_config):.3g} is outside "
                           f"±{MAX_LORA_SCALE:g}, beyond any scale LoRA training uses; re-train with alpha <= "
                           f"{MAX_LORA_SCALE:g} x r")


def _check_strategy(adapter: Adapter, label: str) -> None:
    """The tensors its strategy declares it carries (StrategySpec.weights and .lora), and a well-formed LoRA."""
    spec, weights, lora = STRATEGIES[adapter.strategy], adapter.weights, adapter.lora
    if not spec.weights and weights:
        raise AdapterError(f"{label}: a {spec.name} adapter carries no weights.* tensors (found {len(weights)})")
    if spec.weights and not weights:
        raise AdapterError(f"{label}: a {spec.name} adapter must carry weights.* tensors")
    extra = sorted(k for k in weights if not spec.carries_weight(k))
    if extra:
        raise AdapterError(f"{label}: a {spec.name} adapter may replace only the base tensors "
                           f"{', '.join(spec.weights)}; it has {extra[:3]}")
    if not spec.lora and (lora or adapter.lora_config):
        raise AdapterError(f"{label}: a {spec.name} adapter carries no lora.* tensors and no lora_config")
    if spec.lora:
        config = adapter.lora_config
        if not isinstance(config, dict) or type(config.get("r")) is not int or config["r"] < 1 or \
                not isinstance(config.get("alpha"), (int, float)) or isinstance(config.get("alpha"), bool) or \
                not math.isfinite(config["alpha"]) or not isinstance(config.get("target_modules"), list) or \
                not config["target_modules"] or not all(isinstance(t, str) for t in config["target_modules"]):
            raise AdapterError(f"{label}: a lora adapter needs a lora_config with an integer r >= 1, a finite "
                               "alpha and a non-empty list of target_modules")
        r, targets = config["r"], config["target_modules"]
        expected = {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
        if set(lora) != expected:
            raise AdapterError(f"{label}: lora tensors do not match lora_config.target_modules (missing "
                               f"{sorted(expected - set(lora))[:2]}, extra {sorted(set(lora) - expected)[:2]})")
        for t in targets:
            down, up = lora[f"{t}.lora_A.weight"], lora[f"{t}.lora_B.weight"]
            if down.dim() != 2 or up.dim() != 2 or down.shape[0] != r or up.shape[1] != r:
                raise AdapterError(f"{label}: LoRA factors of {t} are A {tuple(down.shape)}, B {tuple(up.shape)}; "
                                   f"expected A (r={r}, in) and B (out, r={r})")


def base_fingerprint(model) -> str:
    """The fingerprint adapters record for their base (cached on the model; computed over every weight)."""
    cached = getattr(model, "_adapt_fingerprint", None)
    if cached is None:
        from backbone.checkpoints import fingerprint_state

        cached = fingerprint_state(model.state_dict())
        model._adapt_fingerprint = cached
    return cached


# How far an adapter may move the base, relative to the base's own magnitudes. Each bound accepts anything
# training produces, with a wide margin, and refuses values that overflow the forward (a P0 of 1e38, alpha 1e308)
# or that no training run reaches:
# - P0: the base's P0 is the output of its text encoder's final LayerNorm, so no token of it is longer than
#   max|gamma|·sqrt(D) + |beta|. Prompt tuning adds a learned offset; Adam moves each element by at most ~lr per
#   step, so even lr 0.05 for 400 steps stays within 20·sqrt(D), under 100x that base bound for any LayerNorm with
#   max|gamma| >= 0.2. Norms from 0 up to 100x the base bound are accepted.
# - LoRA: alpha/r within ±MAX_LORA_SCALE (64x the largest scale in common use, alpha 16 at r 1), and each update
#   scale·B·A at most 10x the Frobenius norm of the weight it changes (trained updates are a fraction of it).
# - weights.* tensors (a linear probe's head tensors, among them the logit scale): within 10x the base tensor's
#   norm of it, with a floor of one per element for tensors that start at or near zero (biases, log_scale).
PROMPT_NORM_FACTOR = 100.0
MAX_LORA_SCALE = 1024.0
LORA_UPDATE_FACTOR = 10.0
WEIGHT_CHANGE_FACTOR = 10.0


def lora_scale(lora_config: dict) -> float:
    """alpha / r, what peft multiplies B·A by."""
    return float(lora_config["alpha"]) / float(lora_config["r"])


@dataclass(frozen=True)
class BaseMagnitudes:
    """The base's own magnitudes the bounds above are relative to."""

    prompt_norm: float | None  # the longest token its text encoder can output (None: no text encoder)
    weight_norms: dict[str, float]  # Frobenius norm of every floating tensor of its state dict


def base_magnitudes(model) -> BaseMagnitudes:
    """The magnitudes of `model` (cached on it, like its fingerprint)."""
    cached = getattr(model, "_adapt_magnitudes", None)
    if cached is None:
        from torch import nn

        prompt_norm = None
        text = getattr(model, "text", None)
        layer_norms = [m for m in text.modules() if isinstance(m, nn.LayerNorm)] if text is not None else []
        if layer_norms:  # P0 is the last LayerNorm's output: sqrt(D) unit-variance values scaled by gamma, plus beta
            final = layer_norms[-1]
            prompt_norm = float(final.weight.detach().abs().max()) * math.sqrt(final.weight.numel()) + \
                float(final.bias.detach().norm())
        norms = {k: float(v.detach().float().norm()) for k, v in model.state_dict().items() if v.is_floating_point()}
        cached = model._adapt_magnitudes = BaseMagnitudes(prompt_norm, norms)
    return cached


def _frobenius(down: Tensor, up: Tensor) -> float:
    """|B·A|_F without building B·A when the rank is small: |B·A|_F^2 = sum((BᵀB) * (A·Aᵀ)), in float64."""
    down, up = down.double(), up.double()
    if down.shape[0] ** 2 <= up.shape[0] * down.shape[1]:
        return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt())
    return float((up @ down).norm())


def check_magnitudes(adapter: Adapter, base, path: str | Path = "adapter") -> None:
    """Refuse an adapter whose P0, LoRA updates or replaced tensors exceed the bounds above for this base."""
    magnitudes = base_magnitudes(base)
    if magnitudes.prompt_norm is not None:
        longest = float(adapter.prompt.hidden.double().norm(dim=-1).max())
        bound = PROMPT_NORM_FACTOR * magnitudes.prompt_norm
        if not longest <= bound:
            raise AdapterError(f"{path}: P0 has a token of norm {longest:.3g}, over this base's bound of {bound:.3g} "
                               f"({PROMPT_NORM_FACTOR:g}x the longest token its text encoder outputs, "
                               f"{magnitudes.prompt_norm:.3g}); re-train the prompt, e.g. with a lower --lr")
    for key, value in adapter.weights.items():
        reference = magnitudes.weight_norms.get(key)
        if reference is None or not value.is_floating_point():
            continue
        bound = reference + WEIGHT_CHANGE_FACTOR * max(reference, math.sqrt(value.numel()))
        norm = float(value.double().norm())
        if not norm <= bound:
            raise AdapterError(f"{path}: weight {key!r} has norm {norm:.3g}, over the bound of {bound:.3g} (the "
                               f"base's {reference:.3g} plus {WEIGHT_CHANGE_FACTOR:g}x it); re-train the adapter")
    if adapter.lora:
        scale = abs(lora_scale(adapter.lora_config))
        for key in sorted(k for k in adapter.lora if k.endswith(".lora_A.weight")):
            module = key.removesuffix(".lora_A.weight")
            update = scale * _frobenius(adapter.lora[key], adapter.lora[f"{module}.lora_B.weight"])
            bound = LORA_UPDATE_FACTOR * magnitudes.weight_norms.get(f"{module}.weight", 0.0)
            if not update <= bound:
                raise AdapterError(f"{path}: the LoRA update of {module!r} has norm {update:.3g}, over "
                                   f"{LORA_UPDATE_FACTOR:g}x the norm of the weight it changes ({bound:.3g}); "
                                   "re-train the adapter")


def check_base(adapter: Adapter, base, path: str | Path = "adapter") -> None:
    """Refuse an adapter trained on another base, or whose tensors do not fit this base."""
    ours = base_fingerprint(base)
    loaded = getattr(base.config, "name", "?")
    if adapter.base_fingerprint != ours:
        if adapter.base_model and adapter.base_model != loaded:
            fix = f"load it with --base {adapter.base_model}"
        else:  # same name, other weights: advising the base that is loaded already would not help
            fix = (f"it was trained on other weights of {loaded!r}: pass the exact checkpoint file it was trained "
                   "on as --base, or re-train the adapter on this base")
        raise AdapterError(
            f"{path} was trained on base {adapter.base_model!r} (fingerprint {adapter.base_fingerprint[:12]}…) but the "
            f"loaded base {loaded!r} has fingerprint {ours[:12]}…; {fix}")
    text = base.config.text
    if adapter.prompt.hidden.shape[-1] != text.hidden_size:
        raise AdapterError(f"{path}: prompt width {adapter.prompt.hidden.shape[-1]} != base text width "
                           f"{text.hidden_size}; the adapter belongs to another base")
    if adapter.prompt.length > text.max_query_len or int(adapter.input_ids.max()) >= text.vocab_size:
        raise AdapterError(f"{path}: the prompt has {adapter.prompt.length} tokens (at most {text.max_query_len}) or "
                           f"token ids beyond the vocabulary of {text.vocab_size}")
    state = base.state_dict()
    for key, value in adapter.weights.items():
        if key not in state:
            raise AdapterError(f"{path}: weight {key!r} does not exist in the base model")
        if tuple(state[key].shape) != tuple(value.shape) or state[key].dtype != value.dtype:
            raise AdapterError(f"{path}: weight {key!r} is {tuple(value.shape)} {value.dtype}, the base has "
                               f"{tuple(state[key].shape)} {state[key].dtype}")
    for key, down in adapter.lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            weight = state.get(f"{module}.weight")
            up = adapter.lora[f"{module}.lora_B.weight"]
            if weight is None or weight.dim() != 2 or (up.shape[0], down.shape[1]) != tuple(weight.shape):
                raise AdapterError(f"{path}: LoRA target {module!r} is not a linear layer of shape "
                                   f"({up.shape[0]}, {down.shape[1]}) in the base model")
    check_magnitudes(adapter, base, path)


def describe(path: str | Path) -> str:
    """Everything an adapter file holds, for `adapt adapters inspect`."""
    meta = read_adapter_header(path)
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
    for key in ("lora_config", "config", "evaluation"):
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



def check_shareable(adapter: Adapter) -> None:
    """Refuse an adapter whose strategy declares it is served as its own model (StrategySpec.serving)."""
    if adapter.spec.serving == "own-model":
        raise AdapterError(f"adapter for task {adapter.task!r} is a {adapter.strategy} adapter, which replaces the "
                           "base model; load it as its own model (`adapt adapters merge`, then --base "
                           "MERGED.safetensors)")


def weight_overrides(adapter: Adapter, base) -> dict[str, Tensor]:
    """Base-model tensors this adapter replaces, {model key: tensor}: its weights.* tensors as stored, LoRA
    folded in (W + B·A·alpha/r), nothing for prompt tuning. A server runs a group of requests with
    `torch.func.functional_call(base, overrides, ...)`, never touching the shared weights.

    An adapter served as its own model (a full fine-tune) is refused: load it as its own base instead.
    """
    check_shareable(adapter)
    return _folded_weights(adapter, base)


def _folded_weights(adapter: Adapter, base) -> dict[str, Tensor]:
    overrides = dict(adapter.weights)
    if adapter.lora:
        scale = float(adapter.lora_config["alpha"]) / float(adapter.lora_config["r"])
        state = base.state_dict()
        for key in sorted(k for k in adapter.lora if k.endswith(".lora_A.weight")):
            module = key.removesuffix(".lora_A.weight")
            down, up = adapter.lora[key], adapter.lora[f"{module}.lora_B.weight"]
            overrides[f"{module}.weight"] = fold_lora(state[f"{module}.weight"], down, up, scale)
    return overrides


def fold_lora(weight: Tensor, down: Tensor, up: Tensor, scale: float) -> Tensor:
    """W + scale·B·A: the dense weight a LoRA-wrapped linear layer computes with (peft's merged form)."""
    return weight + (up.to(weight.dtype) @ down.to(weight.dtype)) * scale


def apply_adapter(base, adapter: Adapter) -> None:
    """Fold an adapter's weights into a base model this process owns (CLI eval/predict/merge; never a shared
    server model). Prompt tuning changes no weight: its P0 travels with the adapter."""
    overrides = _folded_weights(adapter, base)
    if overrides:
        state = base.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in overrides.items()})
        base.load_state_dict(state, strict=True)


def merge_adapter(path: str | Path, out: str | Path, base_name: str | None = None) -> Path:
    """A standalone model: the base with the adapter's weights folded in, carrying the adapter itself (its P0,
    categories and metadata) under "adapter.*" tensors and "adapter_metadata", so one file deploys one task."""
    from backbone.checkpoints import save_model
    from backbone.model import GLIP

    meta = read_adapter_header(path)
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
