"""Optimizers from a frozen config, all Optax: SGD (momentum, Nesterov), Adam, AdamW, L2 decay, clipping.

The transform applied to the gradient g of parameters p, in order:

1. `clip_norm`: g <- g * min(1, clip_norm / ||g||) (global norm over all parameters).
2. weight_decay_mode 'coupled_l2' (classic SGD/Adam + L2, PyTorch's `weight_decay` for SGD and Adam):
   g <- g + wd * p BEFORE the optimizer direction, exactly the gradient of 0.5 * wd * ||p||^2.
3. direction: identity (sgd), momentum/Nesterov trace (sgd with momentum), Adam moments (adam, adamw).
4. weight_decay_mode 'decoupled' (AdamW, SGDW): u <- u + wd * p AFTER the direction, before the rate.
5. update = -lr * u.

Both modes shrink the decayed weights toward zero (the sign Flax's sst2 example got wrong by chaining
`add_decayed_weights` after `sgd`). 'adamw' is Adam with 'decoupled' decay; `weight_decay_mode=None`
picks each optimizer's classic meaning ('decoupled' for adamw, 'coupled_l2' otherwise).

The whole transform is wrapped in `optax.inject_hyperparams`, so `learning_rate` (the current value,
read by the train step for its metrics) and `weight_decay` live in the optimizer state:
`optax.tree_utils.tree_get(opt_state, "learning_rate")`. A constant learning rate and the weight decay
are plain state values and can be set per model in a vmapped ablation (flaxlm.train.ablation).
"""

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import nnx

from flaxlm.ops.losses import path_names
from flaxlm.train.schedules import ScheduleConfig, make_schedule

OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
WEIGHT_DECAY_MODES = ("coupled_l2", "decoupled")
DECAY_MASKS = ("default", "matrices", "all")
_EXCLUDED_NAMES = ("bias", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, weight decay and clipping; `schedule` shapes `learning_rate` over steps."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    momentum: float = 0.0
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: str | None = None
    decay_mask: str = "default"
    clip_norm: float | None = None

    def __post_init__(self):
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"OptimizerConfig.name must be one of {OPTIMIZER_NAMES}, got {self.name!r}")
        if self.learning_rate < 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be >= 0, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"OptimizerConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.momentum and self.name != "sgd":
            raise ValueError(f"OptimizerConfig.momentum applies to name='sgd' only, got name={self.name!r}")
        if self.nesterov and not self.momentum:
            raise ValueError("OptimizerConfig.nesterov needs momentum > 0")
        for field in ("b1", "b2"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"OptimizerConfig.{field} must be in [0, 1), got {getattr(self, field)}")
        if self.eps <= 0:
            raise ValueError(f"OptimizerConfig.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.weight_decay_mode is not None and self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"OptimizerConfig.weight_decay_mode must be one of {WEIGHT_DECAY_MODES} or None, "
                f"got {self.weight_decay_mode!r}"
            )
        if self.name == "adamw" and self.weight_decay_mode == "coupled_l2":
            raise ValueError(
                "OptimizerConfig.weight_decay_mode='coupled_l2' contradicts name='adamw' (decoupled by definition); "
                "use name='adam' for Adam with coupled L2"
            )
        if self.decay_mask not in DECAY_MASKS:
            raise ValueError(f"OptimizerConfig.decay_mask must be one of {DECAY_MASKS}, got {self.decay_mask!r}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"OptimizerConfig.clip_norm must be > 0 or None, got {self.clip_norm}")

    @property
    def resolved_weight_decay_mode(self) -> str:
        """'decoupled' or 'coupled_l2': the explicit mode, else the optimizer's classic one."""
        if self.weight_decay_mode is not None:
            return self.weight_decay_mode
        return "decoupled" if self.name == "adamw" else "coupled_l2"


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _decays(names: tuple[str, ...], rank: int) -> bool:
    lowered = [name.lower() for name in names]
    if rank < 2 or (lowered and lowered[-1].endswith(_EXCLUDED_NAMES)):
        return False
    return not any("embed" in name or "norm" in name for name in lowered)


def _own_ranks(params, decide):
    """Map `decide(names, own_rank)` over params; the own rank counts logical axis names when present."""

    def one(path, leaf):
        names = path_names(path)
        if _is_variable(leaf):
            logical = leaf.get_metadata().get("out_sharding")
            rank = len(logical) if logical else leaf.get_value().ndim
            return jax.tree.map(lambda _: decide(names, rank), leaf)
        return decide(tuple(n for n in names if n != "value"), leaf.ndim)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)


def default_decay_mask(params):
    """Bool tree (same structure as `params`): True where weight decay applies.

    Rule: a parameter is decayed iff (1) its own rank is >= 2, where the own rank is the number of
    logical axis names in its `out_sharding` metadata when it has them (so a bias stacked over layers by
    jax.vmap still counts as rank 1), else its ndim; (2) its name does not end in 'bias' or 'scale'
    (`bias`, `qkv_bias`, `out_bias`, norm `scale`); and (3) no
    name on its path contains 'embed' or 'norm' (case-insensitive): embedding tables (nnx.Embed's
    'embedding', position embeddings) and every parameter inside a norm module are excluded. In short:
    weight matrices (kernels) decay; biases, norm scales and embeddings do not.
    """
    return _own_ranks(params, _decays)


def matrices_decay_mask(params):
    """nanoGPT's rule: every parameter of own rank >= 2 decays (kernels AND embedding tables)."""
    return _own_ranks(params, lambda names, rank: rank >= 2)


def _direction(config: OptimizerConfig) -> optax.GradientTransformation:
    if config.name == "sgd":
        if config.momentum:
            return optax.trace(decay=config.momentum, nesterov=config.nesterov)
        return optax.identity()
    return optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)


def make_optimizer(
    config: OptimizerConfig, *, decay_mask: Callable | None = None
) -> optax.GradientTransformation:
    """The Optax transform described by `config` (see the module docstring for the order of steps).

    `decay_mask(params) -> bool tree` overrides `config.decay_mask` ('default': `default_decay_mask`,
    'matrices': `matrices_decay_mask` (nanoGPT's), 'all': every parameter decays).
    """
    if decay_mask is None:
        decay_mask = {"default": default_decay_mask, "matrices": matrices_decay_mask}.get(config.decay_mask)
    mode = config.resolved_weight_decay_mode
    schedule = config.schedule
    constant = schedule.kind == "constant" and schedule.warmup_steps == 0
    learning_rate = config.learning_rate if constant else make_schedule(schedule, config.learning_rate)

    def transform(learning_rate, weight_decay):
        decay = optax.add_decayed_weights(weight_decay, decay_mask)
        parts = []
        if config.clip_norm is not None:
            parts.append(optax.clip_by_global_norm(config.clip_norm))
        if mode == "coupled_l2":
            parts.append(decay)
        parts.append(_direction(config))
        if mode == "decoupled":
            parts.append(decay)
        parts.append(optax.scale_by_learning_rate(learning_rate))
        return optax.chain(*parts)

    return optax.inject_hyperparams(transform)(learning_rate=learning_rate, weight_decay=config.weight_decay)
