"""Train N independent models at once: one `jax.vmap` over init keys and optimizer hyperparameters.

Because the model, optimizer state and step are one pytree (TrainState), N runs are just a TrainState
whose leaves have a leading axis N, and the ordinary train step vmapped over that axis trains them all
in one compiled program:

    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-3))   # constant lr: a state value
    states = create_ablation(make_model, tx, jax.random.split(key, 4),
                             learning_rate=jnp.array([1e-4, 3e-4, 1e-3, 3e-3]))
    step = make_ablation_step(loss_fn)
    states, metrics = step(states, batch)          # metrics["loss"] has shape [4]
    run_2 = jax.tree.map(lambda x: x[2], states)   # one run's TrainState

Hyperparameters are overridden by name in the optimizer state, which works for every value that
`optax.inject_hyperparams` keeps there: with `make_optimizer`, `learning_rate` (when the schedule is
'constant' with no warmup; a schedule recomputes it each step) and `weight_decay`. Each run i is exactly
the run `TrainState.create(make_model(model_key_i), tx_i, rng_i)` with
`model_key_i, rng_i = jax.random.split(keys[i])` and tx_i the optimizer with run i's hyperparameters.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlm.train.dot_backend import compiler_options
from flaxlm.train.state import TrainState
from flaxlm.train.step import make_train_step


def create_ablation(
    make_model: Callable[[jax.Array], nnx.Module],
    tx: optax.GradientTransformation,
    keys: jax.Array,
    **hyperparams: jax.Array,
) -> TrainState:
    """N stacked TrainStates: run i has model `make_model(model_key_i)` and hyperparameters `[i]`.

    The initialisation is one jitted, vmapped program (`make_model` must be traceable: take a key).

    keys: [N] PRNG keys; each hyperparameter is an array [N] naming a value in the optimizer state.
    Raises KeyError for a name the optimizer state does not hold, ValueError for a length mismatch.
    """
    num_runs = len(keys)
    for name, values in hyperparams.items():
        if jnp.shape(values) != (num_runs,):
            raise ValueError(
                f"hyperparameter {name!r} must have shape ({num_runs},) like keys, got {jnp.shape(values)}"
            )

    def one(key, values):
        model_key, rng = jax.random.split(key)
        state = TrainState.create(make_model(model_key), tx, rng)
        current = {name: optax.tree_utils.tree_get(state.opt_state, name) for name in values}
        missing = [name for name, value in current.items() if value is None]
        if missing:
            raise KeyError(f"optimizer state holds no hyperparameter named {missing}; see optax.inject_hyperparams")
        cast = {name: jnp.asarray(values[name], jnp.asarray(current[name]).dtype) for name in values}
        return state.replace(opt_state=optax.tree_utils.tree_set(state.opt_state, **cast))

    return jax.jit(jax.vmap(one))(keys, {name: jnp.asarray(values) for name, values in hyperparams.items()})


def make_ablation_step(loss_fn, *, shared_batch: bool = True, donate: bool = True, **step_options):
    """`step(states, batch) -> (states, metrics)` training every run of a stacked TrainState at once.

    With `shared_batch` all runs see the same batch; otherwise the batch has a leading axis N too.
    `step_options` go to `make_train_step` (grad_accum_steps, compute_dtype, nonfinite='skip'|'ignore'), except
    `dot_backend`, which goes to the jit of the vmapped step; metrics gain a leading axis N.
    """
    if step_options.get("nonfinite") == "raise":
        raise ValueError("make_ablation_step: nonfinite='raise' is per run on the host; use 'skip' and read metrics")
    if "mesh" in step_options or "axis_name" in step_options:
        raise ValueError("make_ablation_step runs on one device; mesh and axis_name are not supported")
    options = compiler_options(step_options.pop("dot_backend", "xla"))
    train_step = make_train_step(loss_fn, donate=False, **step_options)
    vmapped = jax.vmap(train_step, in_axes=(0, None if shared_batch else 0))
    return jax.jit(vmapped, donate_argnums=(0,) if donate else (), compiler_options=options)
