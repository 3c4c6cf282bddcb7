"""Learning-rate schedules from a frozen config, built from Optax schedules.

A schedule maps the optimizer's update count (0 for the first update) to a learning rate:

- 'constant':      lr (after an optional linear warmup from 0 over `warmup_steps`).
- 'exponential':   lr * decay_rate ** (step / decay_steps); with `staircase` the exponent is floored
                   (after a warmup, `step` counts from its end).
- 'warmup_cosine': linear warmup 0 -> lr over `warmup_steps`, then cosine decay to `final_learning_rate`
                   at `total_steps` (warmup included), constant afterwards.
- 'inverse_sqrt':  linear warmup 0 -> lr over `warmup_steps`, then lr * sqrt(warmup_steps / step).
"""

import dataclasses

import jax.numpy as jnp
import optax

SCHEDULE_KINDS = ("constant", "exponential", "warmup_cosine", "inverse_sqrt")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Shape of the learning-rate schedule; the base rate lives in `OptimizerConfig.learning_rate`."""

    kind: str = "constant"
    warmup_steps: int = 0
    decay_rate: float = 0.1
    decay_steps: int = 1000
    staircase: bool = False
    total_steps: int = 10000
    final_learning_rate: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"ScheduleConfig.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"ScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "exponential":
            if self.decay_steps <= 0:
                raise ValueError(f"ScheduleConfig.decay_steps must be > 0, got {self.decay_steps}")
            if self.decay_rate <= 0:
                raise ValueError(f"ScheduleConfig.decay_rate must be > 0, got {self.decay_rate}")
        if self.kind == "warmup_cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"ScheduleConfig.total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps})"
            )
        if self.kind == "inverse_sqrt" and self.warmup_steps < 1:
            raise ValueError(f"ScheduleConfig.warmup_steps must be >= 1 for 'inverse_sqrt', got {self.warmup_steps}")


def make_schedule(config: ScheduleConfig, learning_rate: float) -> optax.Schedule:
    """The schedule `step -> learning rate` described by `config`, peaking at `learning_rate`."""
    warmup = optax.linear_schedule(0.0, learning_rate, max(config.warmup_steps, 1))
    if config.kind == "constant":
        if config.warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules([warmup, optax.constant_schedule(learning_rate)], [config.warmup_steps])
    if config.kind == "exponential":
        decay = optax.exponential_decay(
            learning_rate, config.decay_steps, config.decay_rate, staircase=config.staircase
        )
        if config.warmup_steps == 0:
            return decay
        return optax.join_schedules([warmup, decay], [config.warmup_steps])
    if config.kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, config.warmup_steps, config.total_steps, config.final_learning_rate
        )
    warmup_steps = config.warmup_steps

    def inverse_sqrt(steps_after_warmup):
        step = jnp.maximum(jnp.asarray(steps_after_warmup, jnp.float32) + warmup_steps, 1.0)
        return learning_rate * jnp.sqrt(warmup_steps / step)

    return optax.join_schedules([warmup, inverse_sqrt], [warmup_steps])
