"""What each adaptation strategy is, declared once: the table that tune, the CLI, adapter files, the server and
export read instead of naming strategies.

A strategy is one `StrategySpec` in `STRATEGIES` plus the `adapt.strategies.AdaptedGLIP` subclass its `model`
names (the class holds the spec as its `spec`). This module imports nothing heavy, so the CLI lists the
strategies without importing torch; the class is imported only when a run builds it. A new strategy registers
its spec (`register_strategy`, or `registered(spec)` for a scope such as a test) and needs no edit elsewhere:

    BIAS = StrategySpec(name="bias-tune", summary="Train the head's bias0 only.", model="mypkg.bias:BiasTune",
                        lr=1e-2, weight_decay=0.0, weights=("head.bias0",), serving="weights", export="folded")
    register_strategy(BIAS)
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import re
from dataclasses import dataclass, field
from typing import Iterator

# How the shared multi-tenant server runs an adapter of the strategy.
SERVING_MODES = {
    "prompt": "shared base, each request with its own P0",
    "weights": "shared base, the adapter's tensors swapped in for its requests",
    "lora": "shared base, each adapter's low-rank update applied to its requests",
    "own-model": "its own model: the shared server refuses it (merge it and serve it as a base)",
}
# How `adapt export` writes the task (a strategy with export=None is refused by export, which says so).
EXPORT_MODES = {"folded": "weights and LoRA folded into the base, P0 a constant of the graph"}

# The official linear-probe tensors: the head's box, centerness and alignment projections and biases.
LINEAR_PROBE_PARAMETERS = (
    "head.bbox_pred.weight", "head.bbox_pred.bias", "head.centerness.weight", "head.centerness.bias",
    "head.dot_product_projection_text.weight", "head.dot_product_projection_text.bias",
    "head.log_scale", "head.bias_lang", "head.bias0",
)
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


@dataclass(frozen=True, kw_only=True)
class StrategySpec:
    """One strategy's declaration. The fields are all any stage needs to know of it."""

    name: str = field(metadata={"help": "the CLI command and the 'strategy' of its adapter files"})
    summary: str = field(metadata={"help": "one line: what it trains (the command's help)"})
    model: str = field(metadata={"help": "'module:Class' of its AdaptedGLIP subclass, imported when a run builds it"})
    lr: float = field(metadata={"help": "default learning rate (a CPU budget of a few hundred steps)"})
    weight_decay: float = field(metadata={"help": "default AdamW weight decay"})
    lr_multipliers: tuple[tuple[str, float], ...] = field(default=(), metadata={
        "help": "(parameter-name prefix, factor) pairs: those parameters train at lr x factor"})
    weights: tuple[str, ...] = field(default=(), metadata={
        "help": "fnmatch patterns of the base-model keys its adapter's weights.* tensors replace ('*': any); "
                "with patterns, an adapter carries at least one such tensor"})
    lora: bool = field(default=False, metadata={"help": "its adapter carries lora.* factors and a lora_config"})
    serving: str = field(default="prompt", metadata={"help": "how the shared server runs it: a SERVING_MODES key"})
    export: str | None = field(default="folded", metadata={
        "help": "how `adapt export` writes it: an EXPORT_MODES key; None: export refuses it"})

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            problems.append(f"name {self.name!r} must be lower-case words joined by '-' (it is a CLI command)")
        if not self.summary or "\n" in self.summary:
            problems.append("summary must be one non-empty line")
        if self.model.count(":") != 1:
            problems.append(f"model {self.model!r} must be 'module:Class'")
        if not self.lr > 0 or not self.weight_decay >= 0:
            problems.append(f"lr {self.lr} must be > 0 and weight_decay {self.weight_decay} >= 0")
        if self.serving not in SERVING_MODES:
            problems.append(f"serving {self.serving!r} must be one of {', '.join(SERVING_MODES)}")
        if self.export is not None and self.export not in EXPORT_MODES:
            problems.append(f"export {self.export!r} must be None or one of {', '.join(EXPORT_MODES)}")
        # Each shared serving path runs exactly one kind of tensor on the shared base.
        if self.serving == "prompt" and (self.weights or self.lora):
            problems.append("serving 'prompt' is for adapters that carry no weights and no LoRA factors")
        if self.serving == "weights" and (not self.weights or self.lora):
            problems.append("serving 'weights' needs weight patterns and no LoRA factors")
        if self.serving == "lora" and (not self.lora or self.weights):
            problems.append("serving 'lora' needs lora=True and no weight patterns")
        if problems:
            raise ValueError(f"strategy {self.name!r}: {'; '.join(problems)}")

    def carries_weight(self, key: str) -> bool:
        """Whether its adapter may replace the base-model tensor `key`."""
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.weights)

    def model_class(self) -> type:
        """The AdaptedGLIP subclass that trains it (imported now), checked to declare this very spec."""
        module, _, attribute = self.model.partition(":")
        cls = getattr(importlib.import_module(module), attribute)
        if getattr(cls, "spec", None) != self:
            raise TypeError(f"{self.model} does not declare strategy {self.name!r} as its spec; set "
                            f"`spec = <the StrategySpec named {self.name!r}>` on the class")
        return cls


STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    """Make `spec` known to every stage (the CLI lists only strategies registered before it is imported)."""
    if STRATEGIES.get(spec.name, spec) != spec:
        raise ValueError(f"strategy {spec.name!r} is registered already, with another declaration; choose "
                         "another name")
    STRATEGIES[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(spec: StrategySpec) -> Iterator[StrategySpec]:
    """`spec` registered within the block only (tests, experiments)."""
    if spec.name in STRATEGIES:
        raise ValueError(f"strategy {spec.name!r} is registered already; choose another name")
    register_strategy(spec)
    try:
        yield spec
    finally:
        STRATEGIES.pop(spec.name, None)


def get_strategy(name: str) -> StrategySpec:
    """The registered spec of `name`; a ValueError lists the choices (and the closest name) otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), STRATEGIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown strategy {name!r}{hint}; choose from {', '.join(STRATEGIES)}") from None


register_strategy(StrategySpec(
    name="prompt-tune", summary="Prompt tuning: learn an offset to the prompt features P0 (everything else frozen).",
    model="adapt.strategies:PromptTuning", lr=0.05, weight_decay=0.25, serving="prompt"))
register_strategy(StrategySpec(
    name="linear-probe", summary="Linear probing: train the head's box, centerness and alignment projections.",
    model="adapt.strategies:LinearProbe", lr=1e-3, weight_decay=0.05, weights=LINEAR_PROBE_PARAMETERS,
    serving="weights"))
register_strategy(StrategySpec(
    name="lora", summary="LoRA (peft) on the fusion attention and head projections.",
    model="adapt.strategies:LoRA", lr=1e-3, weight_decay=0.05, lora=True, serving="lora"))
register_strategy(StrategySpec(
    name="finetune", summary="Full fine-tuning (all but the lowest backbone stage); the adapter is a full weight set.",
    model="adapt.strategies:FullFinetune", lr=1e-4, weight_decay=0.05, lr_multipliers=(("glip.text.", 0.1),),
    weights=("*",), serving="own-model"))

# The built-in strategies, in CLI order (benchmarks iterate over these; STRATEGIES also holds registered ones).
STRATEGY_NAMES = tuple(STRATEGIES)
