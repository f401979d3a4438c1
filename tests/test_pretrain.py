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
    assert summary["steps"] == 3 and set(summary["last_metrics"]) == {"AP", "AP50"}
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "eval" for r in log)
    model = GLIP.from_pretrained(str(weights))
    assert model.config.name == "tiny"
    assert all(torch.isfinite(p).all() for p in model.parameters())
