"""One adaptation run: zero-shot AP, training with a strategy, tuned AP, the adapter file and a report.

    result = tune(TuneConfig(strategy="prompt-tune", task="icons-aquarium", shots=10, seed=0))

The same function backs `adapt prompt-tune|linear-probe|lora|finetune` and the benchmark scripts.
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
from adapt.adapter import Adapter, base_fingerprint, resolve_prompt_dtype, save_adapter
from adapt.cache import FeatureCache
from adapt.evaluation import evaluate, task_prompt
from adapt.grounding import GroundingBatch, GroundingCollator, grounding_loss, grounding_loss_fn
from adapt.strategies import AdaptedGLIP
from adapt.train import TrainConfig, Trainer, load_trainable
from backbone.detector import GLIPDetector
from backbone.device import DTYPES, resolve_device, resolve_dtype
from backbone.model import GLIP
from backbone.outputs import Detections
from backbone.postprocess import Postprocessor
from backbone.processor import GLIPProcessor, TokenizedPrompt, rescale_boxes


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    strategy: str = field(metadata={"help": " | ".join(STRATEGY_NAMES)})
    task: str = field(metadata={"help": "task name or task file"})
    base: str = field(default="glip-nano", metadata={"help": "checkpoint name or path"})
    shots: int | None = field(default=None, metadata={"help": "images per category (None: all training data)"})
    seed: int = 0
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: by shots)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training images (overrides steps)"})
    batch_size: int = 4
    lr: float | None = None
    weight_decay: float | None = None
    cache_features: bool = field(default=True, metadata={"help": "cache frozen backbone+FPN features"})
    augment: bool = field(default=False, metadata={"help": "cache/train a horizontally flipped view too"})
    scales: tuple[float, ...] = field(default=(1.0,), metadata={
        "help": "training scales, as fractions of the model's input short side (each scale is a cached view; "
                "with augment, also flipped)"})
    eval_every: int | None = field(default=None, metadata={"help": "valid-split evaluation every N steps"})
    validate: bool = field(default=True, metadata={"help": "keep the checkpoint with the best valid-split AP "
                                                           "(off: keep the last one; saves the valid evaluations)"})
    zero_shot: bool = field(default=True, metadata={"help": "evaluate the base before training"})
    out: Path | None = field(default=None, metadata={"help": "adapter file to write"})
    run_dir: Path | None = field(default=None, metadata={"help": "checkpoints and logs (default: a temp folder, "
                                                                 "removed at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in run_dir from its checkpoint"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (None: CUDA when available)"})
    dtype: str = field(default="float32", metadata={
        "help": "training compute precision: float32, bfloat16 (autocast, CPU or CUDA) or float16 (autocast + "
                "GradScaler, CUDA only); weights stay float32, evaluation runs in float32"})
    data_root: Path | None = None
    prompt_dtype: str | None = field(default=None, metadata={"help": "store P0 as float16/bfloat16 (half the "
                                                                         "bytes of a prompt adapter)"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N images only"})
    progress: bool = True

    def __post_init__(self) -> None:
        get_strategy(self.strategy)  # refuses an unknown strategy, listing the registered ones
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}; pass one of them")
        if self.resume and self.run_dir is None:
            raise ValueError("resume needs the run folder of the earlier run: pass run_dir (--run-dir DIR)")


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


def tune(config: TuneConfig) -> dict:
    """Run one adaptation; returns the report (also written beside the adapter)."""
    from tasks import get_task

    started = time.perf_counter()
    if config.out is not None:
        _check_writable(Path(config.out).parent)
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
    report = {"strategy": config.strategy, "task": task.name, "base": config.base, "shots": config.shots,
              "seed": config.seed, "few_shot": subset.describe() if subset else "all training images",
              "train_images": len(image_ids), "prompt": prompt.caption, "device": str(device), "dtype": config.dtype}
    if config.zero_shot:
        report["zero_shot"] = _metrics(evaluate(GLIPDetector(glip, processor, postprocessor), test_split,
                                                limit=config.eval_limit))

    model = build_strategy(config.strategy, glip, prompt, config)
    report["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report["trainable_tensors"] = len(model.trainable_names())
    cache = FeatureCache() if config.cache_features and model.frozen_visual else None
    model.use_feature_cache(cache)
    dataset = AdaptDataset(train_split, image_ids, views, min_size=glip.config.image.min_size)
    detect_fn = adapted_detect_fn(model, processor, postprocessor, task.category_names)
    result, train_seconds = _fit(model, config, dataset, GroundingCollator(processor, task_prompt=prompt),
                                 valid_split, detect_fn)
    model.eval()
    report["tuned"] = _metrics(evaluate(None, test_split, limit=config.eval_limit, detect_fn=detect_fn))
    report["timings"] = {"train_s": round(train_seconds, 2), "step_s": round(train_seconds / max(result.step, 1), 4),
                         "steps": result.step, "total_s": 0.0, "feature_cache": cache.stats() if cache else None}
    report["best_valid"] = {"step": result.best_step, "AP": result.best_value}
    report["resumed_from_step"] = result.resumed_from_step

    adapter = adapter_from_tuned_model(model, task, prompt, config, fingerprint, report)
    if config.out is not None:
        save_adapter(adapter, config.out, prompt_dtype=config.prompt_dtype)
        report["adapter"] = {"path": str(config.out), "bytes": Path(config.out).stat().st_size}
    report["timings"]["total_s"] = round(time.perf_counter() - started, 2)
    return report


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
    return TrainConfig(
        out_dir=run_dir, lr=config.lr or spec.lr, weight_decay=weight_decay, lr_multipliers=spec.lr_multipliers,
        schedule="cosine", warmup_steps=min(20, steps // 10), max_steps=steps,
        batch_size=min(config.batch_size, num_samples), grad_clip=1.0, eval_every=eval_every,
        checkpoint_every=min(eval_every, steps) if config.run_dir else steps,
        best_metric="AP" if has_valid else None, seed=config.seed, log_every=10, progress=config.progress,
        max_bad_steps=10, device=config.device, dtype=config.dtype)


def _fit(model: AdaptedGLIP, config: TuneConfig, dataset: AdaptDataset, collate: GroundingCollator, valid_split,
         detect_fn):
    """Train (or resume) in the run folder, then load the best validation checkpoint: (TrainResult, seconds)."""
    def eval_fn(wrapped) -> dict:
        return {"AP": evaluate(None, valid_split, limit=config.eval_limit, detect_fn=detect_fn)["AP"]}

    run_dir = Path(config.run_dir) if config.run_dir else Path(tempfile.mkdtemp(prefix=f"adapt-{config.strategy}-"))
    train_config = train_config_for(config, run_dir, len(dataset), valid_split is not None)
    trainer = Trainer(model, train_config, grounding_loss_fn(grounding_loss(model.glip.config)), dataset,
                      collate_fn=collate, eval_fn=eval_fn if valid_split is not None else None)
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
                             report: dict) -> Adapter:
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
        evaluation={"zero_shot": report.get("zero_shot"), "tuned": report.get("tuned")},
    )


def _metrics(metrics: dict) -> dict:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_category", "seconds_per_image")
    return {k: metrics[k] for k in keys if k in metrics}


def _check_writable(folder: Path) -> None:
    """Fail before any work when the adapter could not be written (a probe file, then removed)."""
    try:
        check_writable(folder)
    except OSError as error:
        raise PermissionError(f"cannot write the adapter into {folder} ({error.strerror or error}): "
                              "choose another --out") from error


def write_report(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1, default=str))
