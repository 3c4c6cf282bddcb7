"""Optimizers from config: weight-decay sign and masking for every combination, clipping, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlm.ops.losses import path_names
from flaxlm.train import OptimizerConfig, default_decay_mask, make_optimizer
from flaxlm.train.optimizers import matrices_decay_mask
from tiny_lm import make_model

LR, WD = 0.01, 0.1
DECAYED = {"hidden/kernel", "out/kernel"}
OPTIMIZERS = {
    "sgd": dict(name="sgd"),
    "momentum": dict(name="sgd", momentum=0.9),
    "nesterov": dict(name="sgd", momentum=0.9, nesterov=True),
    "adam": dict(name="adam"),
    "adamw": dict(name="adamw"),
}
COMBINATIONS = [
    (opt, mode) for opt in OPTIMIZERS for mode in ("coupled_l2", "decoupled") if (opt, mode) != ("adamw", "coupled_l2")
]


def _flat(params):
    return {"/".join(path_names(p)[:-1]): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _zero_gradient_updates(config, steps=3):
    """Parameters before and after `steps` updates with an all-zero gradient (only weight decay acts)."""
    params = nnx.state(make_model(0), nnx.Param)
    tx = make_optimizer(config)
    opt_state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = params
    for _ in range(steps):
        updates, opt_state = tx.update(zeros, opt_state, new)
        new = optax.apply_updates(new, updates)
    return _flat(params), _flat(new)


def test_default_mask_decays_kernels_only():
    mask = _flat(default_decay_mask(nnx.state(make_model(0), nnx.Param)))
    assert {name for name, decays in mask.items() if decays} == DECAYED
    assert set(mask) == DECAYED | {"embed/embedding", "norm/scale", "norm/bias", "hidden/bias", "out/bias"}


def test_matrices_mask_is_nanogpts_rule_kernels_and_embeddings():
    mask = _flat(matrices_decay_mask(nnx.state(make_model(0), nnx.Param)))
    assert {name for name, decays in mask.items() if decays} == DECAYED | {"embed/embedding"}


def test_default_mask_uses_logical_rank_for_stacked_layers():
    def layer(key):
        part = nnx.with_partitioning
        return nnx.Linear(
            4, 8, kernel_init=part(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=part(nnx.initializers.zeros, ("mlp",)), rngs=nnx.Rngs(key),
        )

    stacked = jax.vmap(layer)(jax.random.split(jax.random.key(0), 3))
    params = nnx.state(stacked, nnx.Param)
    assert params["bias"].get_value().shape == (3, 8)
    assert _flat(default_decay_mask(params)) == {"bias": False, "kernel": True}


@pytest.mark.parametrize("optimizer,mode", COMBINATIONS)
def test_weight_decay_shrinks_kernels_and_spares_masked_params(optimizer, mode):
    config = OptimizerConfig(learning_rate=LR, weight_decay=WD, weight_decay_mode=mode, **OPTIMIZERS[optimizer])
    before, after = _zero_gradient_updates(config, steps=3)
    for name, value in before.items():
        if name in DECAYED:
            # Adam with coupled L2 moves every weight by about lr per step whatever its size, so only
            # weights larger than 3 steps of that can be required to keep their sign.
            large = np.abs(value) > 3 * LR
            assert large.mean() > 0.8, name
            assert np.all(np.abs(after[name][large]) < np.abs(value[large])), name
            assert np.all(np.sign(after[name][large]) == np.sign(value[large])), name
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)


@pytest.mark.parametrize(
    "optimizer,mode", [("sgd", "coupled_l2"), ("sgd", "decoupled"), ("adam", "decoupled"), ("adamw", "decoupled")]
)
def test_weight_decay_is_exactly_multiplicative_without_gradient(optimizer, mode):
    config = OptimizerConfig(learning_rate=LR, weight_decay=WD, weight_decay_mode=mode, **OPTIMIZERS[optimizer])
    before, after = _zero_gradient_updates(config, steps=1)
    for name in DECAYED:
        np.testing.assert_allclose(after[name], before[name] * (1 - LR * WD), rtol=1e-6)


def test_coupled_l2_equals_penalty_gradient():
    """SGD with coupled L2 == plain SGD on loss + 0.5 * wd * ||kernels||^2 (PyTorch's SGD weight_decay)."""
    params = nnx.state(make_model(0), nnx.Param)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    coupled = make_optimizer(OptimizerConfig(name="sgd", momentum=0.9, learning_rate=LR, weight_decay=WD))
    plain = make_optimizer(OptimizerConfig(name="sgd", momentum=0.9, learning_rate=LR))
    mask = default_decay_mask(params)
    penalised = jax.tree.map(lambda g, p, m: g + WD * p * m, grads, params, mask)
    got, _ = coupled.update(grads, coupled.init(params), params)
    expected, _ = plain.update(penalised, plain.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)


def test_decay_mask_all_decays_everything():
    config = OptimizerConfig(name="sgd", learning_rate=LR, weight_decay=WD, decay_mask="all")
    before, after = _zero_gradient_updates(config, steps=1)
    for name, value in before.items():
        np.testing.assert_allclose(after[name], value * (1 - LR * WD), rtol=1e-6, err_msg=name)


def test_clip_by_global_norm():
    params = {"kernel": jnp.zeros((2, 2))}
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, clip_norm=0.5))
    updates, _ = tx.update({"kernel": jnp.full((2, 2), 3.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-6)
    small, _ = tx.update({"kernel": jnp.full((2, 2), 0.1)}, tx.init(params), params)
    np.testing.assert_allclose(small["kernel"], -0.1, rtol=1e-6)


def test_hyperparameters_live_in_the_state():
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=3e-4, weight_decay=0.05))
    state = tx.init({"kernel": jnp.zeros((2, 2))})
    assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(3e-4)
    assert float(optax.tree_utils.tree_get(state, "weight_decay")) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(name="adamw", weight_decay_mode="coupled_l2"), "weight_decay_mode"),
        (dict(name="rmsprop"), "name"),
        (dict(name="sgd", nesterov=True), "nesterov"),
        (dict(name="adam", momentum=0.9), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(decay_mask="kernels"), "decay_mask"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(OptimizerConfig(), **changes)
