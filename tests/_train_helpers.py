"""A tiny learnable problem for tests/test_train.py, importable and runnable as a script.

As a script (what the SIGKILL and torchrun tests launch):
    python tests/_train_helpers.py OUT_DIR '{"max_steps": 40, ...}'
The JSON holds TrainConfig overrides plus these test-only keys:
    resume       passed to Trainer.fit
    sleep        seconds each loss_fn call sleeps (to make a run slow enough to kill mid-way)
    nan_at_call  {"rank": r, "call": k}: that rank's k-th loss_fn call (0-based) returns NaN
    threads      torch threads (default 1); match the test process's for bitwise-equal results
    with_eval    pass an eval_fn returning {"bias": head.bias}
After fit, every rank writes OUT_DIR/rank{r}.json: final trainable params, the sample ids it saw, counts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapt.train import Trainer, TrainConfig  # noqa: E402

IN_DIM, HIDDEN = 4, 8


class Toy(nn.Module):
    """A frozen 'core' (linear) under a trainable LayerNorm + dropout + linear head."""

    def __init__(self, core_width: int = HIDDEN):
        super().__init__()
        self.core = nn.Linear(IN_DIM, core_width)
        self.norm = nn.LayerNorm(core_width)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(core_width, 1)
        self.core.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, IN_DIM) -> (B, 1)
        return self.head(self.drop(self.norm(self.core(x))))


def make_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


class ToyData(torch.utils.data.Dataset):
    """y = a Toy with the same frozen core and another head, so the student can fit it exactly."""

    def __init__(self, n: int = 64, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN_DIM, generator=g)
        teacher = make_model().eval()
        with torch.no_grad():
            teacher.head.weight.copy_(torch.randn(1, HIDDEN, generator=g))
            teacher.head.bias.fill_(0.5)
            self.y = teacher(self.x)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "idx": i}


def loss_fn(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    mse = nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return {"loss": mse, "mse": mse.detach()}


def make_config(out_dir: Path | str, **overrides) -> TrainConfig:
    kwargs = dict(out_dir=out_dir, lr=0.05, weight_decay=0.0, max_steps=20, batch_size=8, schedule="constant",
                  checkpoint_every=5, log_every=1, progress=False, seed=0, device="cpu")
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main(out_dir: str, options_json: str) -> None:
    options = json.loads(options_json)
    torch.set_num_threads(options.pop("threads", 1))
    resume = options.pop("resume", False)
    sleep = options.pop("sleep", 0.0)
    nan_at = options.pop("nan_at_call", None)
    seen: list[int] = []
    calls = [0]

    def slow_loss(model, batch):
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        seen.extend(int(i) for i in batch["idx"])
        out = loss_fn(model, batch)
        if nan_at and nan_at["rank"] == rank and nan_at["call"] == calls[0]:
            out["loss"] = out["loss"] * float("nan")
        calls[0] += 1
        time.sleep(sleep)
        return out

    with_eval = options.pop("with_eval", False)
    model = make_model()
    eval_fn = (lambda m: {"bias": float(m.head.bias)}) if with_eval else None
    trainer = Trainer(model, make_config(out_dir, **options), slow_loss, ToyData(), eval_fn=eval_fn)
    result = trainer.fit(resume=resume)
    report = {"rank": trainer.rank, "world_size": trainer.world_size, "step": result.step, "seen": seen,
              "skipped_nonfinite": result.skipped_nonfinite, "updates": result.updates,
              "params": {n: t.tolist() for n, t in trainable_state(model).items()}}
    Path(out_dir, f"rank{trainer.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}")
