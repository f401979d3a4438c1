"""One adaptation run: zero-shot AP, training with a strategy, tuned AP, the adapter file and a report.

    result = tune(TuneConfig(strategy="prompt-tune", task="icons-aquarium", shots=10, seed=0))

The same function backs the command of each strategy (`adapt prompt-tune`, ...) and the benchmark scripts.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glip_io import check_writable
from adapt import STRATEGY_NAMES, get_strategy
from adapt.adapter import MAX_LORA_SCALE, Adapter, base_fingerprint, resolve_prompt_dtype, save_adapter
from adapt.cache import FeatureCache
from adapt.cli_config import config_dict, write_config
from adapt.evaluation import EvalResult, evaluate, task_prompt
from adapt.grounding import GroundingBatch, GroundingCollator, grounding_loss, grounding_loss_fn
from adapt.strategies import LORA_DEFAULT_TARGETS, AdaptedGLIP
from adapt.train import TrainConfig, Trainer, load_trainable, set_seed
from adapt.train.config import check_overrides
from adapt.train.tracking import Tracker, canonical_report_to, flat_params, open_trackers
from backbone.detector import GLIPDetector
from backbone.device import DTYPES, resolve_device, resolve_dtype
from backbone.model import GLIP
from backbone.outputs import Detections
from backbone.postprocess import Postprocessor
from backbone.processor import GLIPProcessor, TokenizedPrompt, rescale_boxes


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    strategy: str = field(metadata={"help": " | ".join(STRATEGY_NAMES)})
    task: str = field(metadata={"help": "task name, task file or dataset folder (COCO, YOLO, Pascal VOC)"})
    base: str = field(default="glip-nano", metadata={"help": "checkpoint name or path"})
    shots: int | None = field(default=None, metadata={"help": "images per category (None: all training data)"})
    seed: int = field(default=0, metadata={"help": "seed of the few-shot subset, the initialisation and the data "
                                                  "order"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: by shots)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training images (overrides steps)"})
    batch_size: int = field(default=4, metadata={"help": "images per optimizer step"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: the strategy's)"})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (default: the "
                                                                         "strategy's)"})
    cache_features: bool = field(default=True, metadata={"help": "cache frozen backbone+FPN features"})
    augment: bool = field(default=False, metadata={"help": "cache/train a horizontally flipped view too"})
    scales: tuple[float, ...] = field(default=(1.0,), metadata={
        "help": "training scales, as fractions of the model's input short side (each scale is a cached view; "
                "with augment, also flipped)"})
    eval_every: int | None = field(default=None, metadata={"help": "valid-split evaluation every N steps"})
    validate: bool = field(default=True, metadata={"help": "keep the checkpoint with the best valid-split AP "
                                                           "(off: keep the last one; saves the valid evaluations)"})
    zero_shot: bool = field(default=True, metadata={"help": "evaluate the base before training"})
    out: Path | None = field(default=None, metadata={"help": "adapter file to write (the command line's default: "
                                                               "adapters/<task>-<strategy>.safetensors)"})
    run_dir: Path | None = field(default=None, metadata={"help": "checkpoints and logs (default: a temp folder, "
                                                                 "removed at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in run_dir from its checkpoint"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (None: CUDA when available)"})
    dtype: str = field(default="float32", metadata={
        "help": "training compute precision: float32, bfloat16 (autocast, CPU or CUDA) or float16 (autocast + "
                "GradScaler, CUDA only); weights stay float32, evaluation runs in float32"})
    data_root: Path | None = field(default=None, metadata={"help": "root of the task data (default: the "
                                                                   "tasks package's)"})
    prompt_dtype: str | None = field(default=None, metadata={"help": "store P0 as float16/bfloat16 (half the "
                                                                         "bytes of a prompt adapter)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r of the low-rank update B·A"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / r"})
    lora_targets: str = field(default=LORA_DEFAULT_TARGETS, metadata={
        "help": "regular expression of the linear layers LoRA wraps (full match of the module name)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout on the input of the update"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N images only"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    trainer: dict = field(default_factory=dict, metadata={
        "help": "TrainConfig settings over the run's own, e.g. {'grad_accumulation': 2}"})
    report_to: str = field(default="none", metadata={
        "help": "trackers that also get the run (settings, training curves, AP and AP50 of each evaluation, final "
                "metrics, adapter size): 'none' or a comma-separated list of tensorboard, mlflow, wandb"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", canonical_report_to(self.report_to))
        get_strategy(self.strategy)  # refuses an unknown strategy, listing the registered ones
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}; pass one of them")
        if self.resume and self.run_dir is None:
            raise ValueError("resume needs the run folder of the earlier run: pass run_dir (--run-dir DIR)")
        check_overrides(self.trainer, "TuneConfig")
        if self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} must be >= 1; pass a positive rank")
        if abs(self.lora_alpha / self.lora_r) > MAX_LORA_SCALE:  # adapter files refuse such a scale: fail before training
            raise ValueError(f"lora_alpha / lora_r = {self.lora_alpha / self.lora_r:g} is beyond ±{MAX_LORA_SCALE:g}, "
                             f"which adapter files refuse; pass lora_alpha <= {MAX_LORA_SCALE:g} x lora_r")


@dataclass(frozen=True, kw_only=True)
class TuneTimings:
    train_s: float = field(metadata={"help": "seconds of training (evaluations during training included)"})
    step_s: float = field(metadata={"help": "train_s per optimizer step"})
    steps: int = field(metadata={"help": "optimizer steps done (across resumes)"})
    total_s: float = field(metadata={"help": "seconds of the whole run"})
    feature_cache: dict | None = field(metadata={"help": "hits and misses of the frozen-feature cache"})


@dataclass(frozen=True, kw_only=True)
class TuneResult:
    """What one `tune` run did; `to_dict()` is its JSON report."""

    strategy: str
    task: str
    base: str
    shots: int | None
    seed: int
    few_shot: str = field(metadata={"help": "the few-shot subset, described"})
    train_images: int
    prompt: str = field(metadata={"help": "the task prompt's caption"})
    device: str
    dtype: str
    zero_shot: EvalResult | None = field(metadata={"help": "the base on the evaluation split (None: not run)"})
    tuned: EvalResult = field(metadata={"help": "the adapted model on the evaluation split"})
    trainable_parameters: int
    trainable_tensors: int
    timings: TuneTimings
    best_valid_step: int | None = field(metadata={"help": "step of the kept checkpoint (None: the last one)"})
    best_valid_AP: float | None
    resumed_from_step: int | None
    adapter_path: Path | None = field(default=None, metadata={"help": "the adapter file written (None: not saved)"})
    adapter_bytes: int | None = None
    config: dict = field(default_factory=dict, metadata={"help": "the run's options (what --config reads)"})

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("strategy", "task", "base", "shots", "seed", "few_shot", "train_images",
                                             "prompt", "device", "dtype")}
        if self.zero_shot is not None:
            out["zero_shot"] = self.zero_shot.summary()
        out.update(tuned=self.tuned.summary(), trainable_parameters=self.trainable_parameters,
                   trainable_tensors=self.trainable_tensors, timings=asdict(self.timings),
                   best_valid={"step": self.best_valid_step, "AP": self.best_valid_AP},
                   resumed_from_step=self.resumed_from_step, config=self.config)
        if self.adapter_path is not None:
            out["adapter"] = {"path": str(self.adapter_path), "bytes": self.adapter_bytes}
        return out


def default_steps(shots: int | None) -> int:
    return {1: 100, 3: 150, 5: 200, 10: 250}.get(shots, 400)


def task_tokens(processor: GLIPProcessor, categories) -> TokenizedPrompt:
    """The task prompt as one chunk; adaptation trains one prompt, so it must fit the token limit."""
    prompts = processor.tokenize(task_prompt(categories))
    if len(prompts) > 1:
        raise ValueError(f"the task prompt needs {sum(p.num_tokens for p in prompts)} tokens in {len(prompts)} "
                         f"chunks, over the {processor.max_query_len}-token limit of one prompt; shorten the "
                         "category descriptions or split the task")
    return prompts[0]


def training_views(scales=(1.0,), flip: bool = False) -> tuple[tuple[float, bool], ...]:
    """The fixed augmented views of every training image: (scale, horizontal flip) pairs."""
    if not scales or any(not 0.25 <= s <= 2.0 for s in scales):
        raise ValueError(f"training scales {tuple(scales)} must be fractions of the input size in [0.25, 2]")
    return tuple((float(scale), flipped) for scale in scales for flipped in ((False, True) if flip else (False,)))


class AdaptDataset:
    """Training samples of a (few-shot) split; index i is image i % n in view (i // n) % views.

    A view is (scale, flip): the image flipped or not, resized to scale x the model's input short side by
    the collator. Views are fixed so the feature cache can hold each one (key: image id and view). A
    sample is `(image, target)` for `adapt.grounding.GroundingCollator` with a task prompt."""

    def __init__(self, split, image_ids, views=((1.0, False),), min_size: int | None = None):
        if not image_ids:
            raise ValueError("no training images: the split (or few-shot subset) is empty")
        if any(scale != 1.0 for scale, _ in views) and min_size is None:
            raise ValueError("scaled views need the model's min_size")
        self.split, self.image_ids, self.views, self.min_size = split, list(image_ids), tuple(views), min_size

    def __len__(self) -> int:
        return len(self.image_ids) * len(self.views)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index % len(self.image_ids)]
        scale, flip = self.views[(index // len(self.image_ids)) % len(self.views)]
        image, target = self.split.load_image(image_id), self.split.target(image_id)
        boxes = target["boxes"].clone()
        if flip:
            image = image.transpose(0)  # PIL FLIP_LEFT_RIGHT
            boxes[:, [0, 2]] = image.width - boxes[:, [2, 0]]
        min_size = None if scale == 1.0 else round(self.min_size * scale)
        return image, {"boxes": boxes, "labels": target["labels"], "min_size": min_size,
                       "key": (image_id, scale, flip)}


def adapted_detect_fn(model: AdaptedGLIP, processor: GLIPProcessor, postprocessor: Postprocessor, categories):
    """detect_fn for `adapt.evaluation.evaluate` that runs the adapted model on the task prompt."""

    @torch.no_grad()
    def detect(images, label_lists):
        batch = processor.preprocess(images)
        device = model.input_ids.device
        outputs = model(GroundingBatch(batch.pixel_values.to(device), batch.image_sizes, []))
        finals = postprocessor(outputs, model.task_prompt.positive_map.to(device))
        return [Detections(rescale_boxes(f.boxes, batch.image_sizes[i], batch.original_sizes[i]), f.scores, f.labels,
                           list(categories)) for i, f in enumerate(finals)]

    return detect


def build_strategy(name: str, glip: GLIP, prompt: TokenizedPrompt, config: TuneConfig) -> AdaptedGLIP:
    return get_strategy(name).model_class().from_tune_config(glip, prompt, config)


def tune(config: TuneConfig) -> TuneResult:
    """Run one adaptation. The resolved options go into the adapter's header (`config`) and, with a run_dir,
    into run_dir/config.yaml: `adapt <strategy> --config` on either reproduces the run.

    With `report_to`, the run also goes to those trackers: this config and the engine's resolved one as
    params, the zero-shot metrics at step 0, the training curves, and the final metrics and adapter size.
    TensorBoard's files go to run_dir/tensorboard, or runs/<run name> without a run_dir.
    """
    run_name = tracking_run_name(config)
    log_dir = Path(config.run_dir) / "tensorboard" if config.run_dir else Path("runs") / run_name
    with open_trackers(config.report_to, log_dir, run_name) as tracker:
        tracker.log_params(flat_params(asdict(config)))
        report = _tune(config, tracker)
        tracker.log_metrics(final_metrics(report), step=report.timings.steps)
    return report


def tracking_run_name(config: TuneConfig) -> str:
    """'prompt-tune-myfood-10shot-seed0-20261204-213000': what a tracker lists the run as."""
    task = Path(str(config.task)).stem if str(config.task).endswith((".yaml", ".yml", ".json")) else \
        Path(str(config.task)).name
    shots = f"{config.shots}shot" if config.shots else "all"
    return f"{config.strategy}-{task}-{shots}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def final_metrics(report: TuneResult) -> dict[str, float]:
    """The tracker metrics of a finished run's report: 'final/AP', 'final/AP50', ..., 'adapter/bytes'."""
    metrics = {f"final/{k}": float(v) for k, v in report.tuned.summary().items() if isinstance(v, (int, float))}
    if report.adapter_bytes is not None:
        metrics["adapter/bytes"] = float(report.adapter_bytes)
    return metrics


def _tune(config: TuneConfig, tracker: Tracker) -> TuneResult:
    from tasks import get_task

    started = time.perf_counter()
    if config.out is not None:
        _check_writable(Path(config.out).parent)
    if config.run_dir is not None:
        write_config(config, Path(config.run_dir) / "config.yaml")
    views = training_views(config.scales, config.augment)
    resolve_prompt_dtype(config.prompt_dtype)  # refuse a bad --prompt-dtype before training, not after
    device = resolve_device(config.device)
    resolve_dtype(config.dtype, device)  # refuse float16 on CPU before any work
    task = get_task(config.task, data_root=config.data_root)
    train_split = task.split("train")
    subset, image_ids = _training_images(task, train_split, config)
    test_split = task.split(task.eval_split)
    valid_split = task.split("valid") if config.validate and "valid" in task.splits else None

    glip = GLIP.from_pretrained(config.base).to(device)
    fingerprint = base_fingerprint(glip)
    processor = GLIPProcessor.from_config(glip.config)
    postprocessor = Postprocessor.from_config(glip.config)
    prompt = task_tokens(processor, task.categories)
    zero_shot = None
    if config.zero_shot:
        zero_shot = evaluate(GLIPDetector(glip, processor, postprocessor), test_split, limit=config.eval_limit)
        tracker.log_metrics({"zero_shot/AP": zero_shot.AP, "zero_shot/AP50": zero_shot.AP50}, step=0)

    set_seed(config.seed)  # the strategy's initial weights (e.g. LoRA's A) are a function of the seed alone
    model = build_strategy(config.strategy, glip, prompt, config)
    cache = FeatureCache() if config.cache_features and model.frozen_visual else None
    model.use_feature_cache(cache)
    dataset = AdaptDataset(train_split, image_ids, views, min_size=glip.config.image.min_size)
    detect_fn = adapted_detect_fn(model, processor, postprocessor, task.category_names)
    result, train_seconds = _fit(model, config, dataset, GroundingCollator(processor, task_prompt=prompt),
                                 valid_split, detect_fn, tracker)
    model.eval()
    tuned = evaluate(None, test_split, limit=config.eval_limit, detect_fn=detect_fn)
    adapter = adapter_from_tuned_model(model, task, prompt, config, fingerprint, zero_shot, tuned)
    if config.out is not None:
        save_adapter(adapter, config.out, prompt_dtype=config.prompt_dtype)
    return TuneResult(
        strategy=config.strategy, task=task.name, base=config.base, shots=config.shots, seed=config.seed,
        few_shot=subset.describe() if subset else "all training images", train_images=len(image_ids),
        prompt=prompt.caption, device=str(device), dtype=config.dtype, zero_shot=zero_shot, tuned=tuned,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        trainable_tensors=len(model.trainable_names()),
        timings=TuneTimings(train_s=round(train_seconds, 2), step_s=round(train_seconds / max(result.step, 1), 4),
                            steps=result.step, total_s=round(time.perf_counter() - started, 2),
                            feature_cache=cache.stats() if cache else None),
        best_valid_step=result.best_step, best_valid_AP=result.best_value, resumed_from_step=result.resumed_from_step,
        adapter_path=None if config.out is None else Path(config.out),
        adapter_bytes=None if config.out is None else Path(config.out).stat().st_size, config=adapter.config)


def _training_images(task, train_split, config: TuneConfig):
    from tasks.fewshot import sample_few_shot

    subset = sample_few_shot(train_split, config.shots, config.seed) if config.shots else None
    image_ids = list(subset.image_ids) if subset else list(train_split.image_ids)
    if not image_ids:
        raise ValueError(f"task {task.name!r} has no training images")
    return subset, image_ids


def train_config_for(config: TuneConfig, run_dir: Path, num_samples: int, has_valid: bool) -> TrainConfig:
    """The engine settings of an adaptation run (CPU-budget schedule; checkpoints at each evaluation when
    the run folder is kept, so a cut run resumes)."""
    steps = config.steps or default_steps(config.shots)
    if config.epochs:
        steps = max(1, math.ceil(config.epochs * num_samples / min(config.batch_size, num_samples)))
    eval_every = config.eval_every or max(steps // 4, 25)
    spec = get_strategy(config.strategy)
    weight_decay = config.weight_decay if config.weight_decay is not None else spec.weight_decay
    settings = dict(
        out_dir=run_dir, lr=config.lr or spec.lr, weight_decay=weight_decay, lr_multipliers=spec.lr_multipliers,
        schedule="cosine", warmup_steps=min(20, steps // 10), max_steps=steps,
        batch_size=min(config.batch_size, num_samples), grad_clip=1.0, eval_every=eval_every,
        checkpoint_every=min(eval_every, steps) if config.run_dir else steps,
        best_metric="AP" if has_valid else None, seed=config.seed, log_every=10, progress=config.progress,
        max_bad_steps=10, device=config.device, dtype=config.dtype, report_to=config.report_to)
    return TrainConfig(**{**settings, **config.trainer})


def _fit(model: AdaptedGLIP, config: TuneConfig, dataset: AdaptDataset, collate: GroundingCollator, valid_split,
         detect_fn, tracker: Tracker):
    """Train (or resume) in the run folder, then load the best validation checkpoint: (TrainResult, seconds)."""
    def eval_fn(wrapped) -> dict:
        metrics = evaluate(None, valid_split, limit=config.eval_limit, detect_fn=detect_fn)
        return {"AP": metrics.AP, "AP50": metrics.AP50}

    run_dir = Path(config.run_dir) if config.run_dir else Path(tempfile.mkdtemp(prefix=f"adapt-{config.strategy}-"))
    train_config = train_config_for(config, run_dir, len(dataset), valid_split is not None)
    trainer = Trainer(model, train_config, grounding_loss_fn(grounding_loss(model.glip.config)), dataset,
                      collate_fn=collate, eval_fn=eval_fn if valid_split is not None else None, tracker=tracker)
    started = time.perf_counter()
    try:
        result = trainer.fit(resume=config.resume)
        seconds = time.perf_counter() - started
        if result.best_path is not None and Path(result.best_path).exists():
            load_trainable(model, result.best_path)
    finally:
        if config.run_dir is None:  # a temp folder of ours: the adapter file is the result, not the checkpoints
            shutil.rmtree(run_dir, ignore_errors=True)
    return result, seconds


def adapter_from_tuned_model(model: AdaptedGLIP, task, prompt: TokenizedPrompt, config: TuneConfig, fingerprint: str,
                             zero_shot: EvalResult | None = None, tuned: EvalResult | None = None) -> Adapter:
    """The adapter file's content for a tuned model: its tensors, the task's prompt, the run's settings and results."""
    with torch.no_grad():
        features = model.prompt_features().detach()
    tensors = model.adapter_tensors()
    return Adapter(
        strategy=config.strategy, task=task.name,
        categories=[{"name": c.name, "prefix": c.prefix, "suffix": c.suffix, "phrase": c.prompt_phrase}
                    for c in task.categories],
        prompt=features, positive_map=prompt.positive_map, input_ids=prompt.input_ids, caption=prompt.caption,
        base_model=config.base, base_fingerprint=fingerprint, weights=tensors["weights"], lora=tensors["lora"],
        lora_config=getattr(model, "lora_config", None),
        training={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        evaluation={"zero_shot": zero_shot and zero_shot.summary(), "tuned": tuned and tuned.summary()},
        config=config_dict(config),
    )


def _check_writable(folder: Path) -> None:
    """Fail before any work when the adapter could not be written (a probe file, then removed)."""
    try:
        check_writable(folder)
    except OSError as error:
        raise PermissionError(f"cannot write the adapter into {folder} ({error.strerror or error}): "
                              "choose another --out") from error


def write_report(report: TuneResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=1, default=str))
