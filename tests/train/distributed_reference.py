"""Shared settings of the 2-process test and its single-process reference."""

import jax
import jax.numpy as jnp

from flaxlm.train import OptimizerConfig

CONFIG = OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.1)
GLOBAL_BATCH = 8
STEPS = 3


def batch_seeds():
    return range(200, 200 + STEPS)


def param_checksum(state) -> float:
    """Sum of |w| over every parameter (a jitted reduction, so it runs on global arrays too)."""
    total = jax.jit(lambda params: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(params)))(state.params)
    return float(total)
