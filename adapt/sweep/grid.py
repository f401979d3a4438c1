"""The sweep's settings and its grid: every cell named, hashed and checked before any run starts."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from adapt import STRATEGY_NAMES
from adapt.strategy_spec import get_strategy

ZERO_SHOT = "zero-shot"
EXECUTORS = ("local", "ray")
# Bases pretrained on the icon world keep their own vocabulary measurable offline on the held-in test split.
ICON_BASES = ("glip-nano", "glip-nano-a")
ICON_RETENTION_TASK, ICON_RETENTION_PROTOCOL = "icons-heldin", "per-image-16"


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    task: tuple[str, ...] = field(metadata={"help": "one or more tasks, comma-separated: registry names, task files or dataset folders"})
    base: tuple[str, ...] = field(default=("glip-nano",), metadata={"help": "one or more base checkpoints, comma-separated (names or paths)"})
    strategies: tuple[str, ...] = field(default=STRATEGY_NAMES, metadata={"help": "strategies to compare"})
    shots: tuple[str, ...] = field(default=("0", "1", "10"), metadata={
        "help": "images per category: 0 (zero-shot), N, or full (all training data)"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "few-shot subset and training seeds"})
    steps: str | None = field(default=None, metadata={
        "help": "optimizer steps: N for every cell, or per shots as 1:20,10:50,full:60 (default: by shots)"})
    batch_size: int = field(default=4, metadata={"help": "images per step"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N test images only"})
    validate: bool = field(default=False, metadata={"help": "keep the best valid-split checkpoint, not the last"})
    dtype: str = field(default="float32", metadata={"help": "training precision: float32, bfloat16 or float16"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: CUDA when available)"})
    retention_task: str | None = field(default=None, metadata={
        "help": "COCO-format task in the base's own vocabulary (default for glip-nano bases: icons-heldin)"})
    retention_protocol: str | None = field(default=None, metadata={
        "help": "its evaluation protocol (default: per-image-16 on icons-heldin, else task)"})
    retention_limit: int | None = field(default=50, metadata={"help": "retention images scored per run"})
    keep_adapters: bool = field(default=True, metadata={"help": "keep each run's adapter (finetune's never: a "
                                                                  "full weight set per run)"})
    out: Path = field(default=Path("runs/sweep"), metadata={"help": "folder for results, plots and adapters"})
    executor: str = field(default="local", metadata={"help": "local (in-process, one cell after another) or ray "
                                                              "(one Ray Tune trial per cell)"})
    trial_resources: str = field(default="cpu=1", metadata={
        "help": "per trial, e.g. cpu=1 or cpu=2,gpu=0.5 (CPU threads; a GPU fraction where GPUs exist)"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: start a local one)"})
    retries: int = field(default=1, metadata={"help": "extra attempts for a failing cell"})
    data_root: Path | None = field(default=None, metadata={"help": "data root (default: the tasks' own)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in ("task", "base", "strategies", "shots", "seeds"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int)) else tuple(value))
            if not getattr(self, name):
                raise ValueError(f"--{name} is empty; pass at least one value")
        for strategy in self.strategies:
            get_strategy(strategy)  # refuses an unknown one with the closest registered name
        _check_choice("executor", self.executor, EXECUTORS)
        object.__setattr__(self, "shots", tuple(str(parse_shots(s) if parse_shots(s) is not None else "full")
                                                for s in self.shots))
        self.steps_for(None)  # parse --steps now, not in the middle of a sweep
        self.resources()

    def steps_for(self, shots: int | None) -> int | None:
        """The optimizer steps of a cell with `shots` (None = all data), or None for tune's default."""
        if self.steps is None:
            return None
        text = self.steps.strip()
        if ":" not in text:
            return _positive_int(text, "--steps")
        table = {}
        for part in text.split(","):
            key, _, value = part.partition(":")
            table[parse_shots(key)] = _positive_int(value, "--steps")
        if shots not in table:
            label = "full" if shots is None else shots
            raise ValueError(f"--steps {self.steps!r} has no entry for shots {label}; add {label}:N")
        return table[shots]

    def resources(self) -> dict[str, float]:
        """--trial-resources as Ray resources, {"CPU": threads, "GPU": fraction}."""
        out = {}
        for part in self.trial_resources.split(","):
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key not in ("cpu", "gpu"):
                raise ValueError(f"--trial-resources {self.trial_resources!r}: unknown resource {key!r}; use "
                                 "cpu=N[,gpu=F]")
            try:
                out[key.upper()] = float(value)
            except ValueError:
                raise ValueError(f"--trial-resources {self.trial_resources!r}: {value!r} is not a number") from None
            if out[key.upper()] < 0 or (key == "cpu" and out["CPU"] < 1):
                raise ValueError(f"--trial-resources {self.trial_resources!r}: cpu must be >= 1, gpu >= 0")
        out.setdefault("CPU", 1.0)
        return out

    def threads(self) -> int:
        return max(1, int(self.resources()["CPU"]))

    def to_dict(self) -> dict:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
                for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Cell:
    """One run of the grid. shots None = all training data; strategy "zero-shot" = the base itself."""

    task: str
    base: str
    strategy: str
    shots: int | None
    seed: int

    @property
    def shots_label(self) -> str:
        return "full" if self.shots is None else str(self.shots)

    def settings(self, config: SweepConfig) -> dict:
        """Everything that decides this cell's result: what its config hash covers."""
        tuned = self.strategy != ZERO_SHOT
        return {"task": self.task, "base": self.base, "strategy": self.strategy, "shots": self.shots_label,
                "seed": self.seed, "steps": config.steps_for(self.shots) if tuned else None,
                "batch_size": config.batch_size if tuned else None, "validate": config.validate if tuned else None,
                "dtype": config.dtype if tuned else "float32", "eval_limit": config.eval_limit,
                "retention": retention_source(config, self.base), "retention_limit": config.retention_limit}

    def identity(self, config: SweepConfig) -> dict:
        """The columns that name this cell in results.csv, whatever its outcome."""
        return {"task": self.task, "base": self.base, "strategy": self.strategy, "shots": self.shots_label,
                "seed": self.seed, "dtype": config.dtype if self.strategy != ZERO_SHOT else "float32",
                "config_hash": self.config_hash(config)}

    def config_hash(self, config: SweepConfig) -> str:
        return hashlib.sha256(json.dumps(self.settings(config), sort_keys=True).encode()).hexdigest()[:16]

    def name(self) -> str:
        return f"{_slug(self.base)}-{_slug(self.task)}-{self.strategy}-{self.shots_label}-s{self.seed}"


def parse_shots(text: str | int) -> int | None:
    """'0' -> 0 (zero-shot), 'N' -> N, 'full' -> None (all training data)."""
    if str(text).strip().lower() == "full":
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"shots {text!r} is neither an integer nor 'full'; pass e.g. 0,1,10,full") from None
    if value < 0:
        raise ValueError(f"shots {text!r} is negative; pass 0 (zero-shot), a positive count or 'full'")
    return value


def retention_source(config: SweepConfig, base: str) -> tuple[str, str] | None:
    """(task, protocol) that measures what a run keeps of `base`'s own vocabulary, or None when unknown."""
    if config.retention_task is not None:
        return config.retention_task, config.retention_protocol or "task"
    if base in ICON_BASES:
        return ICON_RETENTION_TASK, config.retention_protocol or ICON_RETENTION_PROTOCOL
    return None


def plan(config: SweepConfig) -> list[Cell]:
    """Every cell: per task and base one zero-shot cell (the reference of AP and retention), then each
    strategy x tuned shots x seed."""
    cells = []
    for base in config.base:
        for task in config.task:
            cells.append(Cell(task, base, ZERO_SHOT, 0, 0))
            for shots in (parse_shots(s) for s in config.shots):
                if shots == 0:
                    continue
                cells += [Cell(task, base, strategy, shots, seed)
                          for seed in config.seeds for strategy in config.strategies]
    return cells


def check_inputs(config: SweepConfig) -> None:
    """Refuse an unknown task or base in one line, before any run starts."""
    from backbone.checkpoints import list_checkpoints
    from tasks import get_task

    for task in config.task:
        get_task(task, data_root=config.data_root)  # raises with close matches
    known = list(list_checkpoints())
    for base in config.base:
        if base not in known and not Path(base).exists():
            close = difflib.get_close_matches(base, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown base {base!r}: neither a checkpoint name ({', '.join(known)}) nor a file."
                             f"{hint}")
    for base in config.base:
        if retention_source(config, base) is None:
            raise ValueError(f"base {base!r} has no retention set: pass --retention-task with a COCO-format task "
                             "in its own vocabulary (e.g. a COCO val folder)")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}.{hint}")


def _positive_int(text: str, option: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{option}: {value} must be >= 1")
    return value


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(text).name or text)
