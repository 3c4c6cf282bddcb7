"""train_step / eval_step on one device: metrics, gradient accumulation, non-finite policy, compilations.

Steps are built once per module where possible so that tests share compilations (the suite must stay
fast on 2 cores); tests that count compilations build their own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.train import (
    OptimizerConfig,
    ScheduleConfig,
    TrainState,
    make_eval_step,
    make_mesh,
    make_optimizer,
    make_schedule,
    make_train_step,
    shard_batch,
    shard_state,
)
from tiny_lm import lm_loss, make_batch, make_model

SGD = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0))
ADAMW = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.1))
STEP = make_train_step(lm_loss)


def _state(tx=SGD, dropout_rate=0.0):
    return TrainState.create(make_model(0, dropout_rate=dropout_rate), tx, 1)


def _params(module):
    return nnx.state(module, nnx.Param)


def _host(tree):
    return jax.tree.map(np.array, tree)


def _assert_trees_close(actual, expected, atol):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol), _host(actual), _host(expected))


@jax.jit
def _mean_loss_and_grads(model, batch):
    def mean_loss(m):
        loss_sum, aux = lm_loss(m, batch, None)
        return loss_sum / aux["weight"], aux

    return jax.value_and_grad(mean_loss, has_aux=True)(model)


def test_metrics_and_update_match_the_mean_gradient():
    state = _state()
    batch = make_batch(0, pad_rows=(0, 3, 5))
    (loss, aux), grads = _mean_loss_and_grads(state.model, batch)
    expected_params = jax.tree.map(lambda p, g: p - g, _host(state.params), _host(_params(grads)))
    new_state, metrics = STEP(state, batch)
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "lr", "tokens", "nonfinite", "skipped"}
    assert all(value.dtype == jnp.float32 and value.shape == () for value in metrics.values())
    assert float(metrics["tokens"]) == batch["mask"].sum() == float(aux["weight"])
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], aux["correct"] / aux["weight"], rtol=1e-6)
    grad_norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(_host(grads))))
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)
    assert float(metrics["lr"]) == 1.0 and float(metrics["nonfinite"]) == 0.0
    _assert_trees_close(new_state.params, expected_params, atol=1e-6)  # SGD, lr 1: p - mean gradient
    assert int(new_state.step) == 1


@pytest.mark.parametrize("sharded", [False, True])
def test_grad_accumulation_equals_one_big_step(sharded):
    batch = make_batch(2, batch=16, pad_rows=(0, 1, 2, 5, 9, 13))  # uneven padding across micro-batches
    full_state, full = STEP(_state(), batch)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1]) if sharded else None
    accum_state, accum = make_train_step(lm_loss, mesh=mesh, grad_accum_steps=4)(_state(), batch)
    for name in ("loss", "accuracy", "grad_norm", "tokens"):
        np.testing.assert_allclose(accum[name], full[name], rtol=1e-5, err_msg=name)
    _assert_trees_close(accum_state.params, full_state.params, atol=1e-5)


def test_grad_accumulation_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="inputs.*not divisible by grad_accum_steps=3"):
        make_train_step(lm_loss, grad_accum_steps=3)(_state(), make_batch(0))


def _poison(kind):
    batch = make_batch(3)
    if kind == "nan_mask":
        batch["mask"][0, 0] = np.nan  # NaN loss and NaN gradients
    else:
        batch["targets"][1, 2] = 10_000  # out-of-range label on a real token: NaN loss
    return batch


@pytest.mark.parametrize("kind", ["nan_mask", "bad_label"])
def test_nonfinite_skip_leaves_state_bit_equal(kind):
    state, _ = STEP(_state(ADAMW), make_batch(4))
    before = _host((state.params, state.opt_state))
    state, metrics = STEP(state, _poison(kind))
    assert float(metrics["nonfinite"]) == 1.0 and float(metrics["skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, _host((state.params, state.opt_state)), before)
    assert int(state.step) == 2 and int(state.skipped) == 1  # the step counter still advances
    state, metrics = STEP(state, make_batch(5))
    assert float(metrics["nonfinite"]) == 0.0 and float(metrics["skipped"]) == 1.0


def test_skipped_step_does_not_disturb_the_run():
    clean, _ = STEP(STEP(_state(ADAMW), make_batch(6))[0], make_batch(7))
    poisoned, _ = STEP(STEP(STEP(_state(ADAMW), make_batch(6))[0], _poison("nan_mask"))[0], make_batch(7))
    jax.tree.map(np.testing.assert_array_equal, _host(poisoned.params), _host(clean.params))


def test_nonfinite_raise_names_the_step():
    step = make_train_step(lm_loss, nonfinite="raise")
    state = _state()
    for seed in range(2):
        state, _ = step(state, make_batch(seed))
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 2"):
        step(state, _poison("nan_mask"))


def test_nonfinite_ignore_applies_the_update():
    state, metrics = make_train_step(lm_loss, nonfinite="ignore")(_state(), _poison("nan_mask"))
    assert float(metrics["nonfinite"]) == 1.0 and float(metrics["skipped"]) == 0.0
    assert np.isnan(np.asarray(state.params["hidden"]["kernel"].get_value())).all()


def test_lr_metric_follows_the_schedule():
    schedule = ScheduleConfig(kind="exponential", decay_rate=0.5, decay_steps=2)
    state = _state(make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, schedule=schedule)))
    lrs = []
    for seed in range(4):
        state, metrics = STEP(state, make_batch(seed))
        lrs.append(float(metrics["lr"]))
    np.testing.assert_allclose(lrs, [make_schedule(schedule, 0.1)(t) for t in range(4)], rtol=1e-6)
    np.testing.assert_allclose(lrs, 0.1 * 0.5 ** (np.arange(4) / 2), rtol=1e-6)


def test_dropout_key_is_split_every_step():
    step = make_train_step(lm_loss, donate=False)
    state = _state(dropout_rate=0.5)
    batch = make_batch(8)
    first, m1 = step(state, batch)
    _, m2 = step(state, batch)
    assert float(m1["loss"]) == float(m2["loss"])  # same state, same key: same step
    _, m3 = step(first.replace(model=state.model, opt_state=state.opt_state), batch)
    assert float(m3["loss"]) != float(m1["loss"])  # the next key draws a new dropout mask


def test_bfloat16_compute_keeps_float32_master_weights():
    batch = make_batch(9)
    state, metrics = make_train_step(lm_loss, compute_dtype=jnp.bfloat16)(_state(), batch)
    _, reference = STEP(_state(), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=2e-2)
    assert float(metrics["loss"]) != float(reference["loss"])


def test_axis_name_body_under_pmap_equals_jit_path():
    batch = make_batch(10, pad_rows=(1, 2))
    expected, expected_metrics = STEP(_state(ADAMW), batch)
    body = make_train_step(lm_loss, axis_name="batch", donate=False)
    per_device = jax.tree.map(lambda x: x[None], batch)
    state, metrics = jax.pmap(body, axis_name="batch", in_axes=(None, 0), out_axes=None)(_state(ADAMW), per_device)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-6)
    _assert_trees_close(state.params, expected.params, atol=1e-6)


@pytest.mark.parametrize("sharded", [False, True])
def test_eval_step_sums_add_up_over_batches(sharded):
    model = make_model(0)
    eval_step = make_eval_step(lm_loss, mesh=make_mesh((1, 1, 1), devices=jax.devices()[:1]) if sharded else None)
    batches = [make_batch(s, pad_rows=(s,)) for s in range(3)]
    parts = [eval_step(model, b) for b in batches]
    whole = eval_step(model, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    total_loss = sum(float(p["loss_sum"]) for p in parts) / sum(float(p["tokens"]) for p in parts)
    np.testing.assert_allclose(total_loss, whole["loss"], rtol=1e-6)
    np.testing.assert_allclose(sum(float(p["correct"]) for p in parts), whole["correct"])


def test_loss_fn_contract_is_checked():
    with pytest.raises(TypeError, match="'weight'"):
        make_train_step(lambda m, b, k: (jnp.zeros(()), {}))(_state(), make_batch(0))
    with pytest.raises(ValueError, match="scalar loss SUM"):
        make_train_step(lambda m, b, k: (jnp.zeros(3), {"weight": 1.0}))(_state(), make_batch(0))


def _count_compiles(fn):
    """(number of XLA compilations while running fn(), its result)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events), result


def _run(step, state, batches):
    for batch in batches:
        state, metrics = step(state, batch)
    return state, float(metrics["loss"])


@pytest.mark.parametrize("sharded", [False, True])
def test_no_recompilation_after_first_step(sharded):
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1]) if sharded else None
    step = make_train_step(lm_loss, mesh=mesh)
    schedule = ScheduleConfig(kind="warmup_cosine", warmup_steps=2, total_steps=10)
    state = _state(make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-3, schedule=schedule)))
    batches = [make_batch(s) for s in range(4)]
    if sharded:
        state, batches = shard_state(state, mesh), [shard_batch(b, mesh) for b in batches]
    first, (state, _) = _count_compiles(lambda: _run(step, state, batches[:1]))
    later, _ = _count_compiles(lambda: _run(step, state, batches[1:]))
    assert first >= 1 and later == 0


def test_variable_lengths_compile_once_per_bucket():
    step = make_train_step(lm_loss)
    lengths = [8, 16, 8, 16, 16, 8]
    batches = [make_batch(i, length=length) for i, length in enumerate(lengths)]
    compiles, _ = _count_compiles(lambda: _run(step, _state(), batches))
    assert compiles == len(set(lengths))


def test_one_step_function_serves_states_of_different_structures():
    """The step is jitted over the state's leaves, one compilation per state structure (here two optimizers):
    each result has its input's structure and the values of a step function used for that structure alone."""
    step, batch = make_train_step(lm_loss), make_batch(0)
    states = _state(SGD), _state(ADAMW)
    compiles, (sgd, adamw) = _count_compiles(lambda: tuple(step(state, batch)[0] for state in states))
    assert compiles == 2
    for out, tx in ((sgd, SGD), (adamw, ADAMW)):
        expected, _ = make_train_step(lm_loss)(_state(tx), batch)
        assert isinstance(out, TrainState)
        assert jax.tree.structure(out) == jax.tree.structure(expected)
        _assert_trees_close((_params(out.model), out.opt_state, out.step),
                            (_params(expected.model), expected.opt_state, expected.step), atol=0)
    assert "dot_general" in step.lower(_state(SGD), batch).as_text()
