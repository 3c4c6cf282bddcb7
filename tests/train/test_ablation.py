"""Acceptance 6: four learning rates trained at once with jax.vmap equal four separate runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlm.train import (
    OptimizerConfig,
    TrainState,
    create_ablation,
    make_ablation_step,
    make_optimizer,
    make_train_step,
)
from tiny_lm import lm_loss, make_batch, make_model

LEARNING_RATES = [1e-3, 3e-3, 1e-2, 3e-2]
STEPS = 3


def _config(lr):
    return OptimizerConfig(name="adamw", learning_rate=lr, weight_decay=0.1)


def test_vmapped_runs_equal_separate_runs():
    keys = jax.random.split(jax.random.key(0), len(LEARNING_RATES))
    states = create_ablation(make_model, make_optimizer(_config(1.0)), keys, learning_rate=jnp.array(LEARNING_RATES))
    step = make_ablation_step(lm_loss)
    batches = [make_batch(seed, pad_rows=(2, 5)) for seed in range(STEPS)]
    losses = []
    for batch in batches:
        states, metrics = step(states, batch)
        losses.append(np.asarray(metrics["loss"]))
        np.testing.assert_allclose(metrics["lr"], LEARNING_RATES, rtol=1e-6)
    losses = np.stack(losses, axis=1)

    # Separate runs share one optimizer built for the first rate (one compilation); the others set their
    # rate in the optimizer state. Run 0 is therefore a plain run with its own make_optimizer config.
    single_step, tx = make_train_step(lm_loss), make_optimizer(_config(LEARNING_RATES[0]))
    for i, lr in enumerate(LEARNING_RATES):
        model_key, rng = jax.random.split(keys[i])
        state = TrainState.create(make_model(model_key), tx, rng)
        if i:
            state = state.replace(opt_state=optax.tree_utils.tree_set(state.opt_state, learning_rate=jnp.float32(lr)))
        run_losses = []
        for batch in batches:
            state, metrics = single_step(state, batch)
            run_losses.append(float(metrics["loss"]))
        np.testing.assert_allclose(losses[i], run_losses, rtol=1e-5)
        run_i = jax.tree.map(lambda x: x[i], states.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), run_i, state.params)
    assert len({round(float(l), 4) for l in losses[:, -1]}) == len(LEARNING_RATES)  # the runs really differ


def test_ablation_errors():
    keys = jax.random.split(jax.random.key(0), 2)
    tx = make_optimizer(_config(1e-3))
    with pytest.raises(ValueError, match=r"'learning_rate' must have shape \(2,\)"):
        create_ablation(make_model, tx, keys, learning_rate=jnp.ones(3))
    with pytest.raises(KeyError, match="momentum"):
        create_ablation(make_model, tx, keys, momentum=jnp.ones(2))
    with pytest.raises(ValueError, match="raise"):
        make_ablation_step(lm_loss, nonfinite="raise")
