"""The training engine: `Trainer` over a `TrainConfig`, shared by every adaptation strategy and pretraining.

    config.py       TrainConfig (device, dtype, schedule, ...), TrainResult, NonFiniteLossError
    optim.py        AdamW parameter groups by name (GLIP solver/build.py), the lr schedule
    data.py         ShardedSampler (deterministic, shardable, resumable order), move_to_device
    distributed.py  torchrun process groups, the device of each process
    state.py        checkpoints, best weights, the metrics log, RNG states, seeding, load_trainable
    tracking.py     TensorBoard, MLflow and W&B behind one small interface (report_to)
    trainer.py      Trainer: the loop
"""
from adapt.train.config import NonFiniteLossError, TrainConfig, TrainResult
from adapt.train.data import ShardedSampler, move_to_device
from adapt.train.distributed import init_distributed
from adapt.train.optim import build_param_groups, lr_factor, unwrap_model
from adapt.train.state import BEST_NAME, CHECKPOINT_NAME, CONFIG_NAME, LOG_NAME, load_trainable, set_seed
from adapt.train.trainer import EvalFn, LossFn, Trainer

__all__ = [
    "TrainConfig", "TrainResult", "Trainer", "NonFiniteLossError", "ShardedSampler",
    "build_param_groups", "lr_factor", "set_seed", "load_trainable", "init_distributed",
    "unwrap_model", "move_to_device", "LossFn", "EvalFn",
    "CHECKPOINT_NAME", "BEST_NAME", "LOG_NAME", "CONFIG_NAME",
]
