"""The training engine that every adaptation strategy and the glip-nano pretraining run on.

A plain PyTorch loop in the manner of nanoGPT's `train.py` and detectron2's `SimpleTrainer`. The
model is opaque: `loss_fn(model, batch) -> {"loss": Tensor, ...}` does the model-specific work, and
only parameters with `requires_grad` are trained. The optimiser follows the official GLIP
`solver/build.py` (`adapt.train.optim`).

The rest: linear warm-up, then cosine, step or constant decay; a device and a compute dtype (bf16
autocast on CPU and CUDA, fp16 autocast with GradScaler on CUDA, fp32 master weights); gradient
accumulation; JSONL metrics and a tqdm bar; evaluation with best-checkpoint keeping; atomic checkpoints
that resume exactly (`adapt.train.state`); the same metrics in TensorBoard, MLflow or W&B
(`adapt.train.tracking`); and torchrun DDP.

Step semantics: `step` counts optimizer iterations. A skipped iteration still advances the step,
the schedule and the data, but the parameters are not updated. An iteration is skipped for a
non-finite loss or gradient, for a loss without a grad path, or for an fp16 overflow. One
iteration consumes `grad_accumulation` micro-batches of `batch_size` samples on every process.
Batches arrive from the collator on the CPU; the engine moves them to the device (pinned memory,
non-blocking copies on CUDA) before calling `loss_fn`.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from glip_io import atomic_write
from torch import Tensor, nn

from adapt.train.config import NonFiniteLossError, TrainConfig, TrainResult
from adapt.train.data import ShardedSampler, move_to_device
from adapt.train.distributed import broadcast, init_distributed, max_across, resolve_training_device
from adapt.train.optim import build_param_groups, lr_factor, trainable_named_parameters
from adapt.train.state import (BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_NAME, CONFIG_NAME, LOG_NAME, check_writable,
                               json_safe, load_named, read_checkpoint, rng_state, save_best, set_rng_state,
                               set_seed, trainable_state, trim_log)
from adapt.train.tracking import Tracker, check_installed, flat_params, open_trackers, parse_report_to, record_metrics
from backbone.device import autocast, resolve_device, resolve_dtype

LossFn = Callable[[nn.Module, Any], Mapping[str, Any]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


class Trainer:
    """Trains the parameters of `model` that have requires_grad, with `loss_fn` on `train_dataset`.

    Args:
        model: any module; parameters with requires_grad=False stay untouched and are not saved.
        config: the run's settings.
        loss_fn: `loss_fn(model, batch) -> {"loss": scalar Tensor, **other}`; `model` may be wrapped
            in DDP, so call it (`model(...)`) rather than its methods, and use `unwrap_model` for
            attributes. Batches arrive on the training device. Other scalar entries are logged.
        train_dataset: a map-style dataset (`__len__`, `__getitem__`).
        collate_fn: DataLoader collate function (default: torch's default_collate).
        eval_fn: `eval_fn(model) -> {"metric": float}`, called on rank 0 under no_grad with the
            unwrapped model in eval mode every `eval_every` steps and at the end.
        tracker: where rank 0 also sends the run's params and metrics; the caller opened it and
            finishes it (to add its own results). None: `fit` opens `config.report_to` itself, with
            TensorBoard's files in out_dir/tensorboard, and finishes it at the end.

    Construction validates everything that can fail before training: the output folder, the
    dataset size, the device and dtype, and the parameter groups. `model.train()` is called at the start of
    `fit` and after each evaluation, so a strategy that keeps frozen parts in eval mode does so in
    its `train()` override, as GLIP's GeneralizedVLRCNN does.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, loss_fn: LossFn, train_dataset: Any, *,
                 collate_fn: Callable[[list[Any]], Any] | None = None, eval_fn: EvalFn | None = None,
                 tracker: Tracker | None = None):
        self.config, self.loss_fn, self.eval_fn = config, loss_fn, eval_fn
        self._given_tracker = tracker
        self.collate_fn = collate_fn
        self.train_dataset = train_dataset
        if config.best_metric is not None and eval_fn is None:
            raise ValueError(f"TrainConfig.best_metric={config.best_metric!r} needs an eval_fn to measure it. "
                             "Fix: pass eval_fn=..., or set best_metric=None.")
        device = resolve_device(config.device)  # refuses a device this machine lacks before joining a group
        self.dtype = resolve_dtype(config.dtype, device)
        self.rank, self.world_size, self._owns_process_group = (
            init_distributed(device.type) if config.distributed else (0, 1, False))
        self.is_main = self.rank == 0
        self.device = resolve_training_device(config.device, self.world_size)
        self.out_dir = config.out_dir
        error = self._broadcast(check_writable(self.out_dir) if self.is_main else None)
        if error:
            raise OSError(error)
        if tracker is None and self.is_main:
            for name in parse_report_to(config.report_to):
                check_installed(name)
        self.sampler = self._make_sampler(train_dataset)
        self.total_steps = self._total_steps()

        self.model = model.to(self.device)
        self._params = trainable_named_parameters(model)
        self.param_groups = build_param_groups(model, config)
        self.optimizer = torch.optim.AdamW(self.param_groups, lr=config.lr, weight_decay=config.weight_decay)
        schedule = functools.partial(lr_factor, config=config, total_steps=self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.wrapped = model
        if self.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters)

        self.step, self.epoch, self.batch_index = 0, 0, 0
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"}
        self.counts = {"updates": 0, "skipped_nonfinite": 0, "skipped_no_grad": 0, "skipped_overflow": 0}
        self._bad_in_row = 0
        self._timings = {"eval": 0.0, "checkpoint": 0.0}
        self._last_losses: dict[str, float] = {}
        self._last_metrics: dict[str, float] = {}
        self._log_file = None
        self._tracker: Tracker | None = None
        self._owns_tracker = False

    # -------------------------------------------------------------------------------- paths

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST_NAME

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_NAME

    # ---------------------------------------------------------------------------------- setup

    def _make_sampler(self, dataset: Any) -> ShardedSampler:
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(f"train_dataset ({type(dataset).__name__}) has no len(): the engine needs a map-style "
                            "dataset to order, shard and resume it. Fix: wrap the data in a map-style Dataset."
                            ) from None
        cfg = self.config
        if n == 0:
            raise ValueError("train_dataset is empty (0 samples): there is nothing to train on. "
                             "Fix: check the split, the annotation file and the few-shot selection.")
        need = cfg.batch_size * self.world_size
        if n < need:
            raise ValueError(f"train_dataset has {n} samples, fewer than one batch: batch_size={cfg.batch_size} "
                             f"per process x {self.world_size} process(es) = {need}. Fix: lower batch_size to "
                             f"at most {n // self.world_size or 1}"
                             f"{' or use fewer processes' if self.world_size > 1 else ''}, or add samples.")
        return ShardedSampler(n, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                              rank=self.rank, world_size=self.world_size)

    def _total_steps(self) -> int:
        cfg = self.config
        candidates = [cfg.max_steps] if cfg.max_steps is not None else []
        if cfg.epochs is not None:
            from_epochs = cfg.epochs * self.sampler.batches_per_epoch // cfg.grad_accumulation
            if from_epochs == 0:
                raise ValueError(f"TrainConfig.epochs={cfg.epochs} gives no optimizer step: an epoch has "
                                 f"{self.sampler.batches_per_epoch} batches and a step takes grad_accumulation="
                                 f"{cfg.grad_accumulation}. Fix: raise epochs or lower grad_accumulation.")
            candidates.append(from_epochs)
        return min(candidates)

    def _loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        # Own generator: DataLoader iterators otherwise draw from the global torch RNG, which would
        # make a resumed run's dropout differ from an uninterrupted one's.
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.sampler.batches(epoch, start),
            collate_fn=self.collate_fn or torch.utils.data.default_collate,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
            generator=self.sampler.generator(epoch))

    def _batches(self) -> Iterator[Any]:
        """The endless data stream; (epoch, batch_index) always names the next batch to consume."""
        while True:
            for batch in self._loader(self.epoch, self.batch_index):
                self.batch_index += 1
                yield batch
            self.epoch, self.batch_index = self.epoch + 1, 0

    # ------------------------------------------------------------------------ distributed util

    def _broadcast(self, obj: Any) -> Any:
        return broadcast(obj, self.world_size)

    # ------------------------------------------------------------------------------------ fit

    def fit(self, resume: bool | str | Path = False) -> TrainResult:
        """Trains until `total_steps`; `resume=True` continues from out_dir's checkpoint if there is
        one (else starts fresh), `resume=<path>` from that checkpoint."""
        start_time = time.perf_counter()
        resumed_from = self._start(resume)
        data = self._batches()
        finished = False
        try:
            self._loop(data, start_time)
            finished = True
        finally:
            data.close()
            self._close(finished)
        return self._result(start_time, resumed_from)

    def _start(self, resume: bool | str | Path) -> int | None:
        path: Path | None = None
        if resume is True:
            path = self.checkpoint_path if self.checkpoint_path.exists() else None
        elif resume:
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"resume={str(resume)!r}: no checkpoint there. Fix: pass the "
                                        f"{CHECKPOINT_NAME} of an earlier run, or resume=True for out_dir's.")
        elif self.checkpoint_path.exists():
            raise FileExistsError(f"out_dir '{self.out_dir}' already holds {CHECKPOINT_NAME} from an earlier run. "
                                  "Fix: pass resume=True to continue it, or choose a new out_dir.")
        if path is not None:
            self._load_checkpoint(path)
        else:
            set_seed(self.config.seed + self.rank)
        if self.is_main:
            for stale in self.out_dir.glob(".*.tmp-*"):  # left by a run killed mid-write
                stale.unlink(missing_ok=True)
            trim_log(self.log_path, self.step)
            atomic_write(self.out_dir / CONFIG_NAME,
                          lambda tmp: tmp.write_text(json.dumps(self.config.to_dict(), indent=2)))
            self._log_file = open(self.log_path, "a", encoding="utf-8")
            self._open_tracker()
            self._log({"event": "resume" if path else "start", "step": self.step, "total_steps": self.total_steps,
                       "world_size": self.world_size, "trainable_params": sum(p.numel() for _, p in self._params)})
        self.model.train()
        return self.step if path is not None else None

    def _loop(self, data: Iterator[Any], start_time: float) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        samples_per_step = cfg.batch_size * cfg.grad_accumulation * self.world_size
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        last_log = (self.step, time.perf_counter())
        try:
            while self.step < self.total_steps:
                lr = self.config.lr * lr_factor(self.step, cfg, self.total_steps)
                losses, grad_norm, skip = self._train_step(data)
                self.step += 1
                with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" after a skip
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                bar.update(1)
                self._account(skip, losses)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = (self.step - last_log[0]) * samples_per_step / max(now - last_log[1], 1e-9)
                    last_log = (self.step, now)
                    self._log({"event": "train", "step": self.step, "epoch": round(self._epoch_float(), 4),
                               **losses, "lr": lr, "grad_norm": grad_norm, "skipped": skip, "samples_per_s": rate,
                               "time_s": now - start_time})
                    if losses:
                        bar.set_postfix(loss=f"{losses.get('loss', float('nan')):.4f}",
                                        samples_s=f"{rate:.1f}", refresh=False)
                if self.eval_fn is not None and (self.step == self.total_steps or (
                        cfg.eval_every and self.step % cfg.eval_every == 0)):
                    self._evaluate()
                if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self._save_checkpoint()
        finally:
            bar.close()

    def _train_step(self, data: Iterator[Any]) -> tuple[dict[str, float], float | None, str | None]:
        """One optimizer iteration over grad_accumulation micro-batches.

        Returns (mean losses, grad norm before clipping, skip reason or None). With one process nothing
        in the forward and backward waits for the device: the losses are read once, after the backward.
        """
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        outs: list[dict[str, Tensor]] = []
        skip: str | None = None
        for micro in range(cfg.grad_accumulation):
            batch = next(data)
            if skip is not None:
                continue  # the iteration is lost already: consume its data, skip the compute
            last = micro == cfg.grad_accumulation - 1
            no_sync = self.wrapped.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with no_sync:
                with autocast(self.device, self.dtype):
                    out = self.loss_fn(self.wrapped, move_to_device(batch, self.device))
                loss = _loss_tensor(out)
                outs.append(_loggable(out))
                skip = self._skip_before_backward(loss)
                if skip is None:
                    self.scaler.scale(loss / cfg.grad_accumulation).backward()
        losses = _mean_scalars(outs)  # the step's one host sync before the update
        if skip is None and not math.isfinite(losses["loss"]):
            skip = "nonfinite"
        if skip is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return losses, None, skip
        return losses, *self._apply_update()

    def _skip_before_backward(self, loss: Tensor) -> str | None:
        """The skip reason known before the backward: 'no_grad' for a loss without grad path; across processes
        also 'nonfinite', agreed by every rank (DDP's backward all-reduce would otherwise wait on skipping ranks)."""
        code = 0 if loss.requires_grad else 1
        if self.world_size > 1:
            code = max_across(2 if not torch.isfinite(loss.detach()).all() else code, self.world_size, self.device)
        return {0: None, 1: "no_grad", 2: "nonfinite"}[code]

    def _apply_update(self) -> tuple[float, str | None]:
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        params = [p for _, p in self._params]
        if self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm_value = float(norm)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.scaler.update()
            return norm_value, "overflow" if self.scaler.get_scale() < scale else None
        if not math.isfinite(norm_value):  # identical on every rank: gradients are all-reduced
            self.optimizer.zero_grad(set_to_none=True)
            return norm_value, "nonfinite"
        self.optimizer.step()
        return norm_value, None

    def _account(self, skip: str | None, losses: dict[str, float]) -> None:
        if skip is None:
            self.counts["updates"] += 1
            self._bad_in_row = 0
            self._last_losses = losses
            return
        self.counts[f"skipped_{skip}"] += 1
        self._log({"event": "skip", "step": self.step, "reason": skip, **losses})
        if skip != "nonfinite":
            return
        self._bad_in_row += 1
        limit = self.config.max_bad_steps
        if limit is not None and self._bad_in_row >= limit:
            self._log({"event": "stop", "step": self.step, "reason": f"{self._bad_in_row} non-finite steps in a row"})
            last = f"the last checkpoint is '{self.checkpoint_path}'" if self.checkpoint_path.exists() else \
                "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"{self._bad_in_row} optimizer steps in a row (the last at step {self.step}) had a non-finite loss "
                f"or gradient (losses {losses}); stopping. The parameters were not updated by these steps and "
                f"{last}. Fix: lower lr (now {self.config.lr}), keep grad_clip on, prefer dtype='bfloat16' to 'float16', "
                f"or inspect the batches of these steps; raise max_bad_steps (now {limit}) to tolerate more.")

    def _epoch_float(self) -> float:
        return self.epoch + self.batch_index / self.sampler.batches_per_epoch

    # ------------------------------------------------------------------------ eval and logging

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        metrics = None
        if self.is_main:
            self.model.eval()
            try:
                with torch.no_grad():
                    raw = self.eval_fn(self.model)
            finally:
                self.model.train()
            metrics = {str(k): float(v) for k, v in dict(raw).items()}
        metrics = self._broadcast(metrics)
        self._last_metrics = metrics
        improved = False
        name = self.config.best_metric
        if name is not None:
            if name not in metrics:
                close = difflib.get_close_matches(name, list(metrics), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise KeyError(f"TrainConfig.best_metric={name!r} is not among eval_fn's metrics {sorted(metrics)}"
                               f"{hint}. Fix: set best_metric to one of them.")
            value = metrics[name]
            better = (lambda a, b: a > b) if self.config.best_mode == "max" else (lambda a, b: a < b)
            improved = math.isfinite(value) and (self.best is None or better(value, self.best["value"]))
            if improved:
                self.best = {"metric": name, "value": value, "step": self.step}
                if self.is_main:
                    self._save_best()
        self._log({"event": "eval", "step": self.step, **metrics, "is_best": improved})
        self._timings["eval"] += time.perf_counter() - t0

    def _log(self, record: dict[str, Any]) -> None:
        if self._log_file is None:
            return
        line = json.dumps({k: json_safe(v) for k, v in record.items()})
        self._log_file.write(line + "\n")
        self._log_file.flush()
        metrics = record_metrics(record)
        if self._tracker is not None and metrics:
            self._tracker.log_metrics(metrics, step=record["step"])

    def _open_tracker(self) -> None:
        """The given tracker, or config.report_to's opened here; either gets the resolved config."""
        self._owns_tracker = self._given_tracker is None
        self._tracker = self._given_tracker if self._given_tracker is not None else open_trackers(
            self.config.report_to, self.out_dir / "tensorboard", run_name=self.out_dir.name)
        self._tracker.log_params(flat_params(self.config.to_dict(), prefix="train."))

    def _close(self, finished: bool) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            if self._owns_tracker:
                tracker.finish(failed=not finished)
        # after an error on one rank the others may never reach a barrier: leave teardown to torchrun
        if finished and self._owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._owns_process_group = False

    # ----------------------------------------------------------------------------- checkpoints

    def _save_best(self) -> None:
        save_best(self.best_path, self._params, self.best)

    def _save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        rng = rng_state()
        rngs = [rng]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng)
        if self.is_main:
            state = {
                "format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                "batch_index": self.batch_index, "world_size": self.world_size,
                "trainable": trainable_state(self._params), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                "best": self.best, "counts": dict(self.counts), "bad_in_row": self._bad_in_row,
                "config": self.config.to_dict(),
            }
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        self._timings["checkpoint"] += time.perf_counter() - t0

    def _load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path, world_size=self.world_size, config_dict=self.config.to_dict(),
                                param_names=[g["param_names"] for g in self.param_groups])
        load_named(self.model, state["trainable"], source=f"'{path}'", require_all_trainable=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.best, self.counts, self._bad_in_row = state["best"], dict(state["counts"]), state["bad_in_row"]
        set_rng_state(state["rng"][self.rank])

    def _result(self, start_time: float, resumed_from: int | None) -> TrainResult:
        wall = time.perf_counter() - start_time
        return TrainResult(
            step=self.step, total_steps=self.total_steps, epoch=self._epoch_float(), **self.counts,
            resumed_from_step=resumed_from,
            best_metric=self.best["metric"] if self.best else None,
            best_value=self.best["value"] if self.best else None,
            best_step=self.best["step"] if self.best else None,
            last_losses=dict(self._last_losses), last_metrics=dict(self._last_metrics),
            out_dir=self.out_dir, checkpoint_path=self.checkpoint_path,
            best_path=self.best_path if self.best else None, log_path=self.log_path,
            wall_time_s=wall, train_time_s=wall - sum(self._timings.values()),
            eval_time_s=self._timings["eval"], checkpoint_time_s=self._timings["checkpoint"])


def _loggable(out: Mapping[str, Any]) -> dict[str, Tensor]:
    """The entries of a loss dict that can be logged (numbers and one-element tensors), detached, unsynced."""
    found = {}
    for key, value in out.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            found[str(key)] = value.detach().reshape(()).float()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[str(key)] = torch.tensor(float(value))
    return found


def _mean_scalars(outs: list[dict[str, Tensor]]) -> dict[str, float]:
    """Mean of every logged entry over the micro-batches, read from the device in one transfer."""
    keys = [k for k in outs[0] if all(k in o for o in outs)]
    if not keys:
        return {}
    device = outs[0]["loss"].device
    table = torch.stack([torch.stack([o[k].to(device) for o in outs]).mean() for k in keys])
    return dict(zip(keys, table.tolist()))


def _loss_tensor(out: Any) -> Tensor:
    if not isinstance(out, Mapping) or not isinstance(out.get("loss"), Tensor) or out["loss"].numel() != 1:
        got = {k: type(v).__name__ for k, v in out.items()} if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(f"loss_fn must return a dict with a scalar Tensor under 'loss' (other entries are logged); "
                        f"got {got}. Fix: return {{'loss': total, 'loss_box': ..., ...}}.")
    return out["loss"].reshape(())
