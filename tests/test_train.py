"""The training engine (adapt/train/) on a tiny learnable problem (tests/_train_helpers.py)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adapt.train import (NonFiniteLossError, ShardedSampler, Trainer, TrainConfig, build_param_groups,
                         load_trainable, lr_factor, set_seed)
from tests._train_helpers import ToyData, Toy, loss_fn, make_config, make_model, trainable_state

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "_train_helpers.py"


def records(out_dir: Path, event: str = "train") -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def count_optimizer_steps(trainer: Trainer) -> list[float]:
    """Registers a hook recording the first group's lr at every real optimizer step."""
    seen: list[float] = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    return seen


# ----------------------------------------------------------------------------------- config


def test_config_validation_names_value_reason_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"schedule='cosin'.*Did you mean 'cosine'"):
        TrainConfig(out_dir=tmp_path, max_steps=1, schedule="cosin")
    with pytest.raises(ValueError, match="set max_steps or epochs"):
        TrainConfig(out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"batch_size=0.*>= 1"):
        TrainConfig(out_dir=tmp_path, max_steps=1, batch_size=0)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=1, lr_multipliers=[["text.", 0.1]])
    assert cfg.out_dir == tmp_path and cfg.lr_multipliers == (("text.", 0.1),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    missing_help = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("help")]
    assert not missing_help  # CLI flags are generated from these


# ------------------------------------------------------------------------------ param groups


class GroupsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = nn.Module()
        self.text.emb = nn.Embedding(10, 4)
        self.text.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.log_scale = nn.Parameter(torch.tensor(0.0))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_param_groups_no_decay_exactly_biases_norms_and_1d(tmp_path):
    cfg = make_config(tmp_path, lr=1.0, weight_decay=0.05, bias_lr_factor=2.0,
                      lr_multipliers=(("text.", 0.1), ("text.proj.", 0.5)))
    groups = build_param_groups(GroupsModel(), cfg)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert by_name == {
        "text.emb.weight": (0.1, 0.05), "text.proj.weight": (0.5, 0.05), "text.proj.bias": (1.0, 0.0),
        "norm.weight": (1.0, 0.0), "norm.bias": (2.0, 0.0), "head.weight": (1.0, 0.05), "head.bias": (2.0, 0.0),
        "log_scale": (1.0, 0.0)}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert no_decay == {"text.proj.bias", "norm.weight", "norm.bias", "head.bias", "log_scale"}
    assert all(len(g["params"]) == len(g["param_names"]) for g in groups)
    # with no_decay off everything decays (GLIP-style bias exemption is part of no_decay)
    flat = build_param_groups(GroupsModel(), dataclasses.replace(cfg, no_decay=False, lr_multipliers=()))
    assert {g["weight_decay"] for g in flat} == {0.05}


def test_param_groups_reject_unknown_prefix_and_fully_frozen_model(tmp_path):
    with pytest.raises(ValueError, match=r"prefix 'txt\.' matches no trainable parameter.*text\."):
        build_param_groups(GroupsModel(), make_config(tmp_path, lr_multipliers=(("txt.", 0.1),)))
    with pytest.raises(ValueError, match="nothing to train"):
        build_param_groups(GroupsModel().requires_grad_(False), make_config(tmp_path))


# ------------------------------------------------------------------------ seeding and data


def test_set_seed_makes_torch_numpy_and_random_repeat():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    set_seed(7)
    first = draw()
    set_seed(7)
    assert draw() == first
    set_seed(8)
    assert draw() != first


def test_sharded_sampler_is_deterministic_disjoint_and_resumable():
    ranks = [ShardedSampler(20, batch_size=3, seed=5, rank=r, world_size=2) for r in range(2)]
    a, b = ranks[0].indices(0), ranks[1].indices(0)
    assert len(a) == len(b) == 10 and not set(a) & set(b) and set(a) | set(b) == set(range(20))
    assert ranks[0].indices(0) == a and ranks[0].indices(1) != a
    assert ranks[0].batches_per_epoch == 3
    assert ranks[0].batches(1, start=2) == ranks[0].batches(1)[2:]
    plain = ShardedSampler(7, batch_size=2, seed=0, shuffle=False)
    assert plain.batches(0) == [[0, 1], [2, 3], [4, 5]]


# ------------------------------------------------------------------------------- training


def test_loss_decreases_on_a_learnable_problem(tmp_path):
    model = make_model()
    result = Trainer(model, make_config(tmp_path, max_steps=120, lr=0.03, log_every=1), loss_fn, ToyData()).fit()
    losses = [r["loss"] for r in records(tmp_path)]
    assert len(losses) == 120 and result.step == 120 and result.updates == 120
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])
    assert result.epoch == pytest.approx(120 / 8) and result.last_losses["loss"] == losses[-1]
    assert result.skipped_nonfinite == result.skipped_no_grad == 0
    assert result.wall_time_s >= result.train_time_s > 0 and result.checkpoint_time_s > 0


def test_run_length_from_epochs_and_max_steps(tmp_path):
    by_epochs = Trainer(make_model(), make_config(tmp_path / "a", max_steps=None, epochs=2), loss_fn, ToyData())
    assert by_epochs.total_steps == 2 * 64 // 8
    result = by_epochs.fit()
    assert result.step == 16 and result.epoch == pytest.approx(2.0)
    both = Trainer(make_model(), make_config(tmp_path / "b", max_steps=5, epochs=2), loss_fn, ToyData())
    assert both.total_steps == 5
    with pytest.raises(ValueError, match=r"epochs=1 gives no optimizer step.*8 batches.*grad_accumulation=16"):
        Trainer(make_model(), make_config(tmp_path / "c", max_steps=None, epochs=1, grad_accumulation=16),
                loss_fn, ToyData())


@pytest.mark.parametrize("schedule, extra, expected", [
    ("cosine", dict(warmup_steps=3), [0.25, 0.5, 0.75] + [0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(7)]),
    ("step", dict(milestones=(4, 7), gamma=0.1), [1.0] * 4 + [0.1] * 3 + [0.01] * 3),
    ("constant", dict(warmup_steps=1), [0.5] + [1.0] * 9),
])
def test_schedule_lr_at_each_step(tmp_path, schedule, extra, expected):
    cfg = make_config(tmp_path, lr=2.0, max_steps=10, schedule=schedule, **extra)
    assert [lr_factor(s, cfg, 10) for s in range(10)] == pytest.approx(expected)
    trainer = Trainer(make_model(), cfg, loss_fn, ToyData())
    used = count_optimizer_steps(trainer)
    trainer.fit()
    assert used == pytest.approx([2.0 * f for f in expected])  # what the optimizer really used
    assert [r["lr"] for r in records(tmp_path)] == pytest.approx([2.0 * f for f in expected])


def test_grad_accumulation_equals_a_larger_batch(tmp_path):
    finals = []
    for name, bs, accum in (("big", 8, 1), ("accum", 4, 2)):
        model = make_model()
        model.drop.p = 0.0  # dropout masks would be drawn differently for 4+4 rows than for 8
        cfg = make_config(tmp_path / name, batch_size=bs, grad_accumulation=accum, max_steps=12, schedule="cosine")
        result = Trainer(model, cfg, loss_fn, ToyData()).fit()
        assert result.step == 12 and result.epoch == pytest.approx(12 * 8 / 64)
        finals.append(trainable_state(model))
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [1.0, None])
def test_grad_clipping_bounds_the_applied_gradient(tmp_path, clip):
    data = ToyData()
    data.y = data.y * 100.0  # large targets -> large gradients
    model = make_model()
    trainer = Trainer(model, make_config(tmp_path, max_steps=5, grad_clip=clip), loss_fn, data)
    applied = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: applied.append(
        float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))))
    trainer.fit()
    logged = [r["grad_norm"] for r in records(tmp_path)]
    assert min(logged) > 10.0
    if clip:
        assert max(applied) == pytest.approx(1.0, rel=1e-4)
    else:
        assert applied == pytest.approx(logged, rel=1e-5)


def test_bf16_autocast_on_cpu_and_fp16_refused(tmp_path):
    dtypes = []

    def bf16_loss(model, batch):
        pred = model(batch["x"])
        dtypes.append(pred.dtype)
        return {"loss": nn.functional.mse_loss(pred.float(), batch["y"])}

    result = Trainer(make_model(), make_config(tmp_path / "a", dtype="bfloat16", max_steps=60), bf16_loss,
                     ToyData()).fit()
    losses = [r["loss"] for r in records(tmp_path / "a")]
    assert set(dtypes) == {torch.bfloat16} and result.updates == 60
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    with pytest.raises(ValueError, match=r"float16 runs on CUDA only; on CPU use bfloat16"):
        Trainer(make_model(), make_config(tmp_path / "b", dtype="float16", device="cpu"), loss_fn, ToyData())
    with pytest.raises(ValueError, match=r"TrainConfig.amp='bf16': was replaced by dtype. Fix: pass dtype='bfloat16'"):
        make_config(tmp_path / "c", amp="bf16")


@pytest.mark.gpu
def test_fp16_with_grad_scaler_on_cuda(tmp_path):
    model = make_model()
    result = Trainer(model, make_config(tmp_path, dtype="float16", device="cuda", max_steps=60), loss_fn, ToyData()).fit()
    losses = [r["loss"] for r in records(tmp_path)]
    assert result.updates + result.skipped_overflow == 60 and result.updates > 50
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert next(model.parameters()).device.type == "cuda"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0


# -------------------------------------------------------------------------------- bad input


def test_nonfinite_losses_and_gradients_skip_the_update_and_are_counted(tmp_path):
    snapshots, calls = [], [0]

    def flaky(model, batch):
        snapshots.append(trainable_state(model))
        out = loss_fn(model, batch)
        k, calls[0] = calls[0], calls[0] + 1
        if k == 2:
            out["loss"] = out["loss"] * float("nan")
        if k == 5:
            out["loss"] = out["loss"] * float("inf")
        if k == 7:  # finite loss, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
            w = model.head.weight.sum()
            out["loss"] = out["loss"] + 0.0 * torch.sqrt(w - w.detach())
        return out

    trainer = Trainer(make_model(), make_config(tmp_path, max_steps=10, max_bad_steps=2), flaky, ToyData())
    real_steps = count_optimizer_steps(trainer)
    result = trainer.fit()
    assert result.step == 10 and result.skipped_nonfinite == 3 and result.updates == 7 and len(real_steps) == 7
    for k in (2, 5, 7):  # the parameters after a skipped step are those before it
        for name, value in snapshots[k].items():
            assert torch.equal(snapshots[k + 1][name], value)
    assert [r["step"] for r in records(tmp_path, "skip")] == [3, 6, 8]
    assert records(tmp_path, "skip")[0]["loss"] == "nan"  # valid JSON for non-finite values


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_error(tmp_path):
    model = make_model()
    before = trainable_state(model)

    def always_nan(model, batch):
        return {"loss": loss_fn(model, batch)["loss"] * float("nan")}

    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row .*non-finite.*Fix: lower lr"):
        Trainer(model, make_config(tmp_path, max_steps=10, max_bad_steps=3), always_nan, ToyData()).fit()
    assert all(torch.equal(before[n], p) for n, p in trainable_state(model).items())
    assert records(tmp_path, "stop")[0]["step"] == 3


def test_loss_without_grad_path_is_a_counted_skip_not_an_error(tmp_path):
    calls = [0]

    def sometimes_empty(model, batch):
        k, calls[0] = calls[0], calls[0] + 1
        if k in (1, 2, 4):  # e.g. a batch with zero annotations whose loss is a constant
            return {"loss": torch.zeros(()), "num_boxes": 0}
        return loss_fn(model, batch)

    trainer = Trainer(make_model(), make_config(tmp_path, max_steps=8, max_bad_steps=1), sometimes_empty, ToyData())
    result = trainer.fit()
    assert result.step == 8 and result.skipped_no_grad == 3 and result.updates == 5 and result.skipped_nonfinite == 0


def test_unwritable_out_dir_fails_before_training_and_names_the_folder(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out_dir = tmp_path / "a_file" / "run"
    called = []
    with pytest.raises(OSError, match=re.escape(str(out_dir)) + ".*training did not start"):
        Trainer(make_model(), make_config(out_dir), lambda m, b: called.append(1), ToyData())
    assert not called


def test_empty_or_too_small_or_unsized_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 samples\)"):
        Trainer(make_model(), make_config(tmp_path), loss_fn, ToyData(n=0))
    with pytest.raises(ValueError, match=r"has 5 samples, fewer than one batch: batch_size=8.*at most 5"):
        Trainer(make_model(), make_config(tmp_path), loss_fn, ToyData(n=5))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(TypeError, match="map-style"):
        Trainer(make_model(), make_config(tmp_path), loss_fn, Stream())


def test_images_of_different_sizes_in_one_batch(tmp_path):
    """Images of different sizes reach loss_fn as the dataset gave them (no padding, no resizing, each with its own
    boxes), and each step's gradient is the mean of every image's own gradient, computed here image by image."""
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            image = torch.rand(3, 8 + 4 * i, 12 - i, generator=torch.Generator().manual_seed(i))
            return {"image": image, "boxes": torch.zeros(i % 2, 4), "idx": i}

    model = nn.Conv2d(3, 1, 3)
    calls, grads = [], []  # per loss_fn call: (indices, images, boxes, parameters); per backward: name -> grad
    for name, param in model.named_parameters():
        param.register_hook(lambda grad, name=name: grads.append((name, grad.clone())))

    def per_image_loss(model, batch):
        calls.append((batch["idx"], [img.clone() for img in batch["images"]], batch["boxes"],
                      {n: p.detach().clone() for n, p in model.named_parameters()}))
        return {"loss": torch.stack([model(img[None]).mean() ** 2 for img in batch["images"]]).mean()}

    def collate(items):  # lists, not stacked tensors: the sizes differ
        return {"images": [it["image"] for it in items], "boxes": [it["boxes"] for it in items],
                "idx": [it["idx"] for it in items]}

    result = Trainer(model, make_config(tmp_path, batch_size=3, max_steps=4), per_image_loss, Images(),
                     collate_fn=collate).fit()
    assert result.updates == 4 and len(calls) == 4 and len(grads) == 8
    data = Images()
    for step, (indices, images, boxes, params) in enumerate(calls):
        assert len({tuple(img.shape) for img in images}) == len(images) == 3  # three sizes in one batch
        for index, img, box in zip(indices, images, boxes):
            assert torch.equal(img, data[index]["image"]) and box.shape == (index % 2, 4)
        single = nn.Conv2d(3, 1, 3)
        single.load_state_dict(params)
        for img in images:  # the mean over the batch, one image at a time
            (single(img[None]).mean() ** 2 / len(images)).backward()
        step_grads = dict(grads[2 * step: 2 * step + 2])
        for name, param in single.named_parameters():
            torch.testing.assert_close(step_grads[name], param.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------- eval, logs, progress


@pytest.mark.parametrize("mode, best_step", [("max", 6), ("min", 10)])
def test_eval_every_and_best_checkpoint_keeping(tmp_path, mode, best_step):
    values = iter([0.5, 0.4, 0.9, 0.3, 0.2])
    at_eval = {}

    def eval_fn(model):
        assert not model.training
        at_eval[len(at_eval) * 2 + 2] = trainable_state(model)
        return {"AP": next(values), "AP50": 1.0}

    model = make_model()
    cfg = make_config(tmp_path, max_steps=10, eval_every=2, best_metric="AP", best_mode=mode)
    result = Trainer(model, cfg, loss_fn, ToyData(), eval_fn=eval_fn).fit()
    assert model.training
    assert (result.best_metric, result.best_step) == ("AP", best_step) and result.last_metrics["AP"] == 0.2
    evals = records(tmp_path, "eval")
    assert [e["step"] for e in evals] == [2, 4, 6, 8, 10]
    assert [e["is_best"] for e in evals] == ([True, False, True, False, False] if mode == "max" else
                                             [True, True, False, True, True])
    with safe_open(str(result.best_path), "pt") as f:
        assert f.metadata()["step"] == str(best_step)
        for name, expected in at_eval[best_step].items():
            assert torch.equal(f.get_tensor(name), expected)


def test_best_metric_must_exist_and_needs_eval_fn(tmp_path):
    with pytest.raises(ValueError, match="needs an eval_fn"):
        Trainer(make_model(), make_config(tmp_path / "a", best_metric="AP"), loss_fn, ToyData())
    trainer = Trainer(make_model(), make_config(tmp_path / "b", best_metric="AP5O", max_steps=2), loss_fn, ToyData(),
                      eval_fn=lambda m: {"AP50": 1.0})
    with pytest.raises(KeyError, match="did you mean 'AP50'"):
        trainer.fit()


def test_jsonl_log_is_flushed_per_line(tmp_path):
    seen_lines = []

    def peeking_loss(model, batch):
        seen_lines.append(len(records(tmp_path)))
        return loss_fn(model, batch)

    Trainer(make_model(), make_config(tmp_path, max_steps=6, log_every=2), peeking_loss, ToyData()).fit()
    assert seen_lines == [0, 0, 1, 1, 2, 2]  # each record is on disk before the next step
    rec = records(tmp_path)[0]
    assert {"step", "epoch", "loss", "mse", "lr", "grad_norm", "samples_per_s"} <= set(rec)
    assert rec["step"] == 2 and rec["samples_per_s"] > 0
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 6


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_shows_loss_and_throughput_or_nothing(tmp_path, capsys, progress):
    Trainer(make_model(), make_config(tmp_path, max_steps=3, progress=progress), loss_fn, ToyData()).fit()
    err = capsys.readouterr().err
    if progress:
        assert "3/3" in err and "loss=" in err and "samples_s=" in err
    else:
        assert err == ""


# ------------------------------------------------------------------ checkpoints and resume


def test_checkpoint_holds_only_trainable_tensors_of_a_big_frozen_core(tmp_path):
    class PromptOnBigCore(nn.Module):
        def __init__(self):
            super().__init__()
            self.core = nn.Linear(768, 768).requires_grad_(False)  # ~590k frozen numbers
            self.delta = nn.Parameter(torch.zeros(768))  # 768 trainable numbers

        def forward(self, x):
            return self.core(x + self.delta)

    class Vectors(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((768,), float(i))

    model = PromptOnBigCore()
    trainer = Trainer(model, make_config(tmp_path, batch_size=4, max_steps=2),
                      lambda m, x: {"loss": m(x).pow(2).mean()}, Vectors())
    trainer.fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert list(state["trainable"]) == ["delta"]
    assert (tmp_path / "checkpoint.pt").stat().st_size < 100_000  # the core alone would be 2.4 MB
    assert [p.shape for g in trainer.optimizer.param_groups for p in g["params"]] == [torch.Size([768])]


def test_load_trainable_round_trip_and_strict_differences(tmp_path):
    model = make_model()
    result = Trainer(model, make_config(tmp_path, max_steps=3, eval_every=3, best_metric="m"), loss_fn, ToyData(),
                     eval_fn=lambda m: {"m": 1.0}).fit()
    for path in (result.best_path, result.checkpoint_path):
        fresh = scrambled_model()
        assert load_trainable(fresh, path) == sorted(trainable_state(model))
        assert all(torch.equal(trainable_state(fresh)[n], t) for n, t in trainable_state(model).items())
    with pytest.raises(ValueError, match=r"shape mismatch.*norm.weight: file \(8,\) vs model \(6,\)"):
        load_trainable(Toy(core_width=6), result.best_path)
    bad = tmp_path / "bad.safetensors"
    save_file({"head.weight": torch.zeros(1, 8), "bogus": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match=r"not in the model: \['bogus'\].*missing from the file: "
                                         r"\['head.bias', 'norm.bias', 'norm.weight'\]"):
        load_trainable(make_model(), bad)
    with pytest.raises(FileNotFoundError):
        load_trainable(make_model(), tmp_path / "nope.safetensors")


def test_existing_run_needs_resume_and_a_finished_run_resumes_to_itself(tmp_path):
    Trainer(make_model(), make_config(tmp_path, max_steps=4), loss_fn, ToyData()).fit()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(make_model(), make_config(tmp_path, max_steps=4), loss_fn, ToyData()).fit()
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        Trainer(make_model(), make_config(tmp_path, max_steps=4), loss_fn, ToyData()).fit(resume=tmp_path / "x.pt")
    again = Trainer(make_model(), make_config(tmp_path, max_steps=4), loss_fn, ToyData()).fit(resume=True)
    assert again.step == 4 and again.resumed_from_step == 4 and len(records(tmp_path)) == 4
    with pytest.warns(UserWarning, match=r"changed config .*'max_steps': \(6, 4\)"):
        longer = Trainer(make_model(), make_config(tmp_path, max_steps=6), loss_fn, ToyData()).fit(resume=True)
    assert longer.step == 6 and [r["step"] for r in records(tmp_path)] == list(range(1, 7))
    fresh = Trainer(make_model(), make_config(tmp_path / "new", max_steps=2), loss_fn, ToyData()).fit(resume=True)
    assert fresh.step == 2 and fresh.resumed_from_step is None


class Crash(Exception):
    pass


def scrambled_model() -> Toy:
    """The same frozen core with other trainable values: a resume must restore them all."""
    model = make_model()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    return model


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    """Cosine + warm-up + accumulation + dropout: schedule, optimizer, data order and RNG all resume."""
    cfg = dict(max_steps=12, checkpoint_every=3, grad_accumulation=2, schedule="cosine", warmup_steps=2, eval_every=4,
               best_metric="m")
    metric = lambda model: {"m": float(model.head.bias)}  # noqa: E731
    ref_model = make_model()
    reference = Trainer(ref_model, make_config(tmp_path / "ref", **cfg), loss_fn, ToyData(), eval_fn=metric).fit()

    calls = [0]

    def crashing(model, batch):
        calls[0] += 1
        if calls[0] == 2 * 8 + 1:  # first micro-batch of step 9: last checkpoint is step 6
            raise Crash
        return loss_fn(model, batch)

    with pytest.raises(Crash):
        Trainer(make_model(), make_config(tmp_path / "run", **cfg), crashing, ToyData(), eval_fn=metric).fit()
    model = scrambled_model()
    result = Trainer(model, make_config(tmp_path / "run", **cfg), loss_fn, ToyData(), eval_fn=metric).fit(resume=True)
    assert result.resumed_from_step == 6 and result.step == 12
    for name, value in trainable_state(ref_model).items():
        assert torch.equal(trainable_state(model)[name], value), name
    assert (result.best_step, result.best_value) == (reference.best_step, reference.best_value)
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 13))
    assert [r["loss"] for r in records(tmp_path / "run")] == [r["loss"] for r in records(tmp_path / "ref")]


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    options = {"max_steps": 40, "checkpoint_every": 1}
    slow = {**options, "sleep": 0.05, "threads": torch.get_num_threads()}
    proc = subprocess.Popen([sys.executable, str(HELPER), str(out), json.dumps(slow)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and len(records(out)) >= 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    logged = max(r["step"] for r in records(out))
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 8 <= logged < 40 and logged - 1 <= saved <= logged  # checkpoint_every=1: at most one step lost
    assert not (out / "rank0.json").exists()

    model = scrambled_model()
    result = Trainer(model, make_config(out, **options), loss_fn, ToyData()).fit(resume=True)
    assert result.resumed_from_step == saved and result.step == 40 and result.updates == 40
    assert [r["step"] for r in records(out)] == list(range(1, 41))  # nothing lost, nothing twice

    ref_model = make_model()
    Trainer(ref_model, make_config(tmp_path / "ref", **options), loss_fn, ToyData()).fit()
    for name, value in trainable_state(ref_model).items():
        assert torch.equal(trainable_state(model)[name], value), name  # bitwise


# -------------------------------------------------------------------------------- torchrun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    options = {"max_steps": 6, "checkpoint_every": 3, "nan_at_call": {"rank": 1, "call": 2}, "with_eval": True,
               "eval_every": 3, "best_metric": "bias"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HELPER), str(out), json.dumps(options)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [6, 6]
    # rank 1's NaN made both ranks skip that step (no hang, same counts)
    assert [r["skipped_nonfinite"] for r in ranks] == [1, 1] and [r["updates"] for r in ranks] == [5, 5]
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas identical
    # each rank saw its own half of every epoch: 6 steps x 8 = 48 of 32 per rank -> epoch 0 fully + half of 1
    assert not set(ranks[0]["seen"][:32]) & set(ranks[1]["seen"][:32])
    assert set(ranks[0]["seen"][:32]) | set(ranks[1]["seen"][:32]) == set(range(64))
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]  # only rank 0 logs
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 2
    assert [r["step"] for r in records(out, "eval")] == [3, 6] and (out / "best.safetensors").exists()
    initial = trainable_state(make_model())
    assert any(not torch.equal(torch.tensor(ranks[0]["params"][n]), t) for n, t in initial.items())


def test_checkpoint_write_is_atomic_and_stale_temp_files_are_cleared(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, max_steps=8, checkpoint_every=2)
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        if obj["step"] == 6:  # dies half-way through writing step 6's checkpoint
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise Crash
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Crash):
        Trainer(make_model(), cfg, loss_fn, ToyData()).fit()
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4  # the previous one, intact
    stale = tmp_path / ".checkpoint.pt.tmp-99999"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"junk")
    result = Trainer(make_model(), cfg, loss_fn, ToyData()).fit(resume=True)
    assert result.resumed_from_step == 4 and result.step == 8 and not stale.exists()
