"""Pretraining end to end on the tiny preset: a few steps, evaluation, weights that load back."""
import json
from pathlib import Path

import torch

from adapt.pretrain import PretrainConfig, pretrain
from backbone.model import GLIP


def test_pretraining_runs_evaluates_and_writes_loadable_weights(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    summary = pretrain(PretrainConfig(preset="tiny", steps=3, batch_size=2, warmup_steps=1, eval_every=3,
                                      eval_images=4, checkpoint_every=2, out_dir=tmp_path / "run",
                                      weights_out=weights, data_root=tmp_path / "data", resume=False))
    assert summary.steps == 3 and set(summary.last_metrics) == {
        "AP", "AP50", "hit_rate", "naming_rate", "name_blind_floor_AP50"}
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "eval" for r in log)
    model = GLIP.from_pretrained(str(weights))
    assert model.config.name == "tiny"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pretraining_with_bf16_autocast_on_cpu(tmp_path):
    summary = pretrain(PretrainConfig(preset="tiny", steps=2, batch_size=2, warmup_steps=0, eval_every=2,
                                      eval_images=2, checkpoint_every=2, out_dir=tmp_path / "run", device="cpu",
                                      dtype="bfloat16", data_root=tmp_path / "data", resume=False))
    assert summary.steps == 2 and summary.dtype == "bfloat16" and summary.device == "cpu"
    assert summary.skipped_nonfinite == 0
