"""Training runs in the user's experiment tracker: TensorBoard, MLflow, Weights & Biases.

One small interface, `Tracker` (log_params, log_metrics, finish), with one class per tracker behind it;
`open_trackers("tensorboard,mlflow", log_dir, run_name)` returns one `Trackers` that forwards to each.
Each tracker's package is imported only when that tracker is asked for. The run folder's JSONL log is
written whatever is chosen here; the trackers get the same records (`record_metrics`).

Where each tracker writes:
    tensorboard  event files in `log_dir` (SummaryWriter); the params as hparams, written at finish
    mlflow       the tracking URI MLflow resolves (MLFLOW_TRACKING_URI, else its default ./mlflow.db),
                 experiment MLFLOW_EXPERIMENT_NAME or "glip-adapt"
    wandb        project WANDB_PROJECT or "glip-adapt"; WANDB_MODE=offline keeps the run on disk
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("tensorboard", "mlflow", "wandb")
INSTALL_HINT = 'pip install "glip-adapt[track]"'
DEFAULT_PROJECT = "glip-adapt"
_TRAIN_RECORD_SKIP = ("event", "step", "skipped", "time_s")  # JSONL bookkeeping, not metrics


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record flat run settings (`flat_params`); keys must be new to the run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record numbers at optimizer step `step` (non-decreasing across calls)."""

    def finish(self, failed: bool = False) -> None:
        """Flush and close the run, marked failed or finished."""


def parse_report_to(value: str, owner: str = "report_to") -> tuple[str, ...]:
    """'none' -> (); 'tensorboard, MLflow' -> ('tensorboard', 'mlflow'); anything else: one-line ValueError."""
    names = [part.strip().lower() for part in str(value).split(",") if part.strip()]
    if names == ["none"] or not names:
        return ()
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or len(set(names)) != len(names):
        reason = f"unknown tracker {unknown[0]!r}" if unknown else "a tracker is named twice"
        raise ValueError(f"{owner}={value!r}: {reason}. Fix: pass 'none' or a comma-separated list of "
                         f"{', '.join(TRACKERS)}.")
    return tuple(names)


def canonical_report_to(value: str, owner: str = "report_to") -> str:
    """`value` as every config stores it: the checked tracker names, comma-joined, or 'none'."""
    return ",".join(parse_report_to(value, owner)) or "none"


def open_trackers(report_to: str, log_dir: str | Path, run_name: str) -> Trackers:
    """The trackers named in `report_to`, opened for one run. Use as a context manager, or call finish().

    `log_dir` is where file-based output goes (TensorBoard's event files); `run_name` names the run in
    MLflow and W&B. 'none' gives a `Trackers` that does nothing.
    """
    names = parse_report_to(report_to)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports the run
        names = ()
    for name in names:
        check_installed(name)
    opened: list[Tracker] = []
    try:
        for name in names:
            opened.append(_OPENERS[name](Path(log_dir), run_name))
    except BaseException:
        Trackers(opened).finish(failed=True)
        raise
    return Trackers(opened)


def check_installed(name: str) -> None:
    """Raise a one-line ImportError naming what to install when tracker `name`'s package (same name) is missing."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        hint = "pip install wandb" if name == "wandb" else INSTALL_HINT
        raise ImportError(f"report_to={name!r} needs the {name!r} package, which is not installed. "
                          f"Fix: {hint}, or drop {name!r} from report_to.")


class Trackers:
    """Forwards each call to every opened tracker; `finish` reaches all of them even if one fails."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if metrics:
            for tracker in self.trackers:
                tracker.log_metrics(metrics, step)

    def finish(self, failed: bool = False) -> None:
        errors = []
        for tracker in self.trackers:
            try:
                tracker.finish(failed)
            except Exception as error:  # close the others first, then report
                errors.append(error)
        self.trackers = []
        if errors:
            raise errors[0]

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested settings as one level of 'a.b' keys with values every tracker takes (None, paths and
    sequences as text)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The tracker metrics of one JSONL record of the training engine: 'train/<loss>', 'train/lr', ... for
    train records, 'eval/<metric>' for evaluations, 'model/trainable_params' at the start; {} otherwise."""
    event = record.get("event")
    if event == "train":
        return {f"train/{k}": float(v) for k, v in record.items() if k not in _TRAIN_RECORD_SKIP and _is_number(v)}
    if event == "eval":
        return {f"eval/{k}": float(v) for k, v in record.items() if k not in ("event", "step") and _is_number(v)}
    if event in ("start", "resume") and _is_number(record.get("trainable_params")):
        return {"model/trainable_params": float(record["trainable_params"])}
    return {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardTracker:
    """Scalars per step in `log_dir`; the params go in as hparams at finish, beside the last value of each
    scalar, so TensorBoard's HParams tab lines runs up by setting."""

    def __init__(self, log_dir: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.params: dict[str, bool | int | float | str] = {}
        self.last: dict[str, float] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(flat_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)
            self.last[key] = float(value)
        self.writer.flush()  # a few records per evaluation period: cheap, and the run is visible live

    def finish(self, failed: bool = False) -> None:
        if self.params:
            from torch.utils.tensorboard.summary import hparams

            # written into this run's own event file (SummaryWriter.add_hparams would open a sub-run)
            metric_tags = {key: value for key, value in self.last.items() if math.isfinite(value)}
            for summary in hparams(self.params, metric_tags):
                self.writer.file_writer.add_summary(summary)
        self.writer.close()


class MLflowTracker:
    """One MLflow run through `MlflowClient`, so nothing touches MLflow's global active run."""

    def __init__(self, log_dir: Path, run_name: str):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # created by a concurrent run in between
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in flat_params(params).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker:
    """One W&B run, created beside any other (reinit='create_new') so a sweep's runs stay apart."""

    def __init__(self, log_dir: Path, run_name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run_name,
                              reinit="create_new")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(flat_params(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_OPENERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
