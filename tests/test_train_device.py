"""The training path on other devices, checked without a GPU: fake CUDA, bf16 autocast on CPU, and real-GPU tests.

Fake CUDA: under `FakeTensorMode` a CPU-only machine makes `cuda` tensors without data that raise the same
device-mismatch errors a GPU would; with a `ShapeEnv`, data-dependent sizes (ATSS positives, `nonzero`)
become symbols, so any host read of them (`int()`, `.item()`, `bool()`) fails the test too.

The backward pass cannot run under fake CUDA here: the autograd engine needs a real CUDA context for its
device thread (pytorch/pytorch#92627). It is covered instead by (1) the fake forward, which builds the whole
autograd graph on `cuda` tensors (every backward op runs on the device of the forward tensors it was
recorded from), (2) `test_no_custom_autograd_functions`, which keeps (1) sufficient: a custom
`autograd.Function` could create tensors in its backward, and (3) the `gpu` tests, on a real device.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from adapt import STRATEGY_NAMES, get_strategy
from adapt.cache import FeatureCache
from adapt.grounding import GroundingCollator, GroundingModel, grounding_loss, grounding_loss_fn
from adapt.strategies import LoRA
from adapt.train import Trainer, TrainConfig, move_to_device
from backbone.config import tiny_for_tests
from backbone.loss import GroundingLoss, GroundingTarget
from backbone.model import GLIP
from backbone.outputs import HeadOutputs
from backbone.processor import GLIPProcessor

CUDA = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]


def tiny_glip(fusion: bool = True) -> GLIP:
    torch.manual_seed(0)
    config = tiny_for_tests()
    if not fusion:  # the GLIP-T(A) layout: no fusion, no BERT layers in the head
        config = config.replace(fusion=dataclasses.replace(config.fusion, enabled=False))
    return GLIP.from_config(config)


def image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def adaptation_batch(processor: GLIPProcessor, prompt):
    """Two training views of different sizes, one without boxes, as the tune collator builds them (CPU)."""
    samples = [(image(64, 80, 0), {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [30.0, 20.0, 70.0, 60.0]]),
                                   "labels": torch.tensor([1, 0]), "key": (1, 1.0, False)}),
               (image(48, 64, 1), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                                   "key": (2, 1.0, False)})]
    return GroundingCollator(processor, task_prompt=prompt)(samples)


def pretraining_batch(processor: GLIPProcessor):
    """Two samples with their own captions of different lengths (padded prompts), as pretraining builds them."""
    samples = [(image(64, 80, 2), {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "caption": "a red fish",
                                   "spans": [[(2, 10)]]}),
               (image(48, 64, 3), {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0], [10.0, 10.0, 20.0, 20.0]]),
                                   "caption": "shark. penguin. starfish on the sand", "spans": [[(0, 5)], [(7, 14)]]})]
    return GroundingCollator(processor)(samples)


def build(strategy: str, glip: GLIP):
    processor = GLIPProcessor.from_config(glip.config)
    prompt = processor.tokenize(["fish", "shark"])[0]
    model = LoRA(glip, prompt, r=2, alpha=4) if strategy == "lora" else get_strategy(strategy).model_class()(glip, prompt)
    return model.train(), processor, prompt


def assert_on_cuda(outputs: HeadOutputs) -> None:
    for field in dataclasses.fields(outputs):
        value = getattr(outputs, field.name)
        if isinstance(value, torch.Tensor):
            assert value.device.type == "cuda", (field.name, value.device)


def fake_cuda_step(model, batch, loss_fn, steps: int = 1) -> list[dict]:
    """The Trainer's step on fake CUDA: move the model and the CPU batch, then `loss_fn(model, batch)` as the
    Trainer calls it; the forward's outputs (caught by a hook), the losses and the autograd graph are on CUDA."""
    results, forwards = [], []
    hook = model.register_forward_hook(lambda module, args, outputs: forwards.append(outputs))
    try:
        with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
            model.to(CUDA)
            for _ in range(steps):
                on_device = move_to_device(batch, CUDA)
                assert on_device.pixel_values.device.type == "cuda"
                assert all(t.boxes.device.type == "cuda" for t in on_device.targets)
                losses = loss_fn(model, on_device)
                assert len(forwards) == 1, "loss_fn must run the model's forward once"
                assert_on_cuda(forwards.pop())
                assert all(v.device.type == "cuda" for v in losses.values())
                assert losses["loss"].requires_grad and losses["loss"].grad_fn is not None
                results.append(losses)
    finally:
        hook.remove()
    return results


def training_loss_fn(model):
    """The loss_fn tune and pretrain give the Trainer: GLIP's objective with the model's box coder."""
    return grounding_loss_fn(grounding_loss(model.glip.config))


# ------------------------------------------------------------------------------------------- fake CUDA


@pytest.mark.parametrize("fusion", [False, True], ids=["no-fusion", "fusion"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_each_strategy_step_runs_on_fake_cuda(strategy, fusion):
    model, processor, prompt = build(strategy, tiny_glip(fusion))
    fake_cuda_step(model, adaptation_batch(processor, prompt), training_loss_fn(model))


def test_cached_features_live_on_the_model_device_and_hit_on_fake_cuda():
    model, processor, prompt = build("prompt-tune", tiny_glip(fusion=False))
    cache = FeatureCache()
    model.use_feature_cache(cache)
    fake_cuda_step(model, adaptation_batch(processor, prompt), training_loss_fn(model), steps=2)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 2
    assert all(level.device.type == "cuda" for levels in cache.memory.values() for level in levels)


@pytest.mark.parametrize("fusion", [False, True], ids=["no-fusion", "fusion"])
def test_pretraining_step_runs_on_fake_cuda(fusion):
    glip = tiny_glip(fusion)
    batch = pretraining_batch(GLIPProcessor.from_config(glip.config))
    assert batch.attention_mask.shape[0] == 2 and not bool(batch.attention_mask.all())  # real padding
    model = GroundingModel(glip).train()
    fake_cuda_step(model, batch, training_loss_fn(model))


def test_grounding_loss_runs_on_fake_cuda_with_symbolic_positives():
    """ATSS, token targets, GIoU and centerness on fake CUDA, with an image without boxes."""
    from backbone.anchors import grid_anchors

    shapes, num_tokens = [(5, 5), (3, 3)], 4
    num_anchors = sum(h * w for h, w in shapes)
    targets = [GroundingTarget(torch.tensor([[4.0, 4.0, 30.0, 26.0]]), torch.tensor([[True, True, False, False]])),
               GroundingTarget.empty(num_tokens)]
    with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
        def leaf(*shape):
            return torch.randn(*shape, device=CUDA, requires_grad=True)

        outputs = HeadOutputs(
            box_deltas=leaf(2, num_anchors, 4), centerness=leaf(2, num_anchors),
            alignment_logits=leaf(2, num_anchors, num_tokens),
            anchors=grid_anchors(shapes, (8, 16), 2, device=CUDA), level_shapes=shapes,
            image_sizes=[(40, 40), (40, 40)], text_mask=torch.ones(2, num_tokens, dtype=torch.long, device=CUDA),
            fused_text=leaf(2, num_tokens, 8), fused_visual=[])
        losses = GroundingLoss()(outputs, move_to_device(targets, CUDA))
        assert {v.device.type for v in losses.values()} == {"cuda"}
        assert all(v.grad_fn is not None for v in losses.values())


def test_no_custom_autograd_functions():
    """Backward runs only ops recorded in the forward (see the module docstring), as long as none is custom."""
    offenders = [str(p.relative_to(REPO)) for folder in ("adapt", "backbone") for p in (REPO / folder).rglob("*.py")
                 if "autograd.Function" in p.read_text()]
    assert offenders == []


# ------------------------------------------------------------------------------------------- bf16 on CPU


def test_bf16_autocast_training_on_cpu_runs_in_bf16_and_reduces_the_loss(tmp_path):
    glip = tiny_glip()
    model, processor, prompt = build("linear-probe", glip)
    batch = adaptation_batch(processor, prompt)
    samples = [(image(64, 80, 0), {"boxes": batch.targets[0].boxes.clone(), "labels": torch.tensor([1, 0]),
                                   "key": (1, 1.0, False)})] * 2
    seen = []
    glip.head.dot_product_projection_text.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    config = TrainConfig(out_dir=tmp_path, lr=1e-2, weight_decay=0.0, max_steps=30, batch_size=2, schedule="constant",
                         log_every=1, progress=False, device="cpu", dtype="bfloat16", checkpoint_every=30)
    result = Trainer(model, config, grounding_loss_fn(), samples,
                     collate_fn=GroundingCollator(processor, task_prompt=prompt)).fit()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert result.updates == 30 and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_float16_and_unknown_dtypes_are_refused_on_cpu(tmp_path):
    from adapt.tune import TuneConfig

    with pytest.raises(ValueError, match="float16 runs on CUDA only; on CPU use bfloat16"):
        Trainer(build("prompt-tune", tiny_glip())[0],
                TrainConfig(out_dir=tmp_path, max_steps=1, device="cpu", dtype="float16"), grounding_loss_fn(), [0])
    with pytest.raises(ValueError, match="dtype 'half' is not one of float32, bfloat16, float16"):
        TuneConfig(strategy="prompt-tune", task="x", dtype="half")


# ------------------------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_each_strategy_trains_a_step_on_cuda(tmp_path, strategy, dtype):
    model, processor, prompt = build(strategy, tiny_glip())
    model.use_feature_cache(FeatureCache() if model.frozen_visual else None)
    batch = adaptation_batch(processor, prompt)
    samples = [(image(64, 80, 0), {"boxes": batch.targets[0].boxes.clone(), "labels": torch.tensor([1, 0]),
                                   "key": (1, 1.0, False)})] * 2
    config = TrainConfig(out_dir=tmp_path, max_steps=2, batch_size=2, progress=False, device="cuda", dtype=dtype)
    result = Trainer(model, config, grounding_loss_fn(), samples,
                     collate_fn=GroundingCollator(processor, task_prompt=prompt)).fit()
    assert result.updates == 2 and all(np.isfinite(v) for v in result.last_losses.values())
    assert next(p for p in model.parameters() if p.requires_grad).device.type == "cuda"


@pytest.mark.gpu
def test_tune_adapter_predict_on_cuda(tmp_path):
    from adapt.predict import AdapterDetector
    from adapt.tune import TuneConfig, tune
    from backbone.checkpoints import save_model
    from tasks.icons.suite import generate_icon_task, task_dir

    save_model(tiny_glip(), tmp_path / "tiny.safetensors")
    generate_icon_task("icons-aquarium", task_dir(tmp_path / "data", "icons-aquarium"),
                       sizes={"train": 10, "valid": 4, "test": 4})
    report = tune(TuneConfig(strategy="prompt-tune", task="icons-aquarium", base=str(tmp_path / "tiny.safetensors"),
                             shots=1, steps=4, eval_every=4, data_root=tmp_path / "data", progress=False,
                             out=tmp_path / "a.safetensors", device="cuda", dtype="bfloat16"))
    assert report.device.startswith("cuda")
    detector = AdapterDetector.load(tmp_path / "a.safetensors")
    detector.model.to("cuda")
    [dets] = detector.detect(next((tmp_path / "data").rglob("*.png")))
    assert dets.boxes.shape[-1] == 4
