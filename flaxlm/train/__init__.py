"""flaxlm.train: TrainState, optimizers and schedules, jitted train/eval steps, sharding, ablations."""

from flaxlm.train.ablation import create_ablation, make_ablation_step
from flaxlm.train.optimizers import OptimizerConfig, default_decay_mask, make_optimizer
from flaxlm.train.schedules import ScheduleConfig, make_schedule
from flaxlm.train.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    batch_sharding,
    create_sharded,
    local_batch_slice,
    logical_to_spec,
    make_mesh,
    shard_batch,
    shard_state,
    state_shardings,
)
from flaxlm.train.state import TrainState
from flaxlm.train.step import make_eval_step, make_train_step

__all__ = [
    "DEFAULT_RULES",
    "MeshConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainState",
    "batch_sharding",
    "create_ablation",
    "create_sharded",
    "default_decay_mask",
    "local_batch_slice",
    "logical_to_spec",
    "make_ablation_step",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "shard_batch",
    "shard_state",
    "state_shardings",
]
