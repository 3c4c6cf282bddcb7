"""flaxlm.ops.recurrent: hoisted scan vs a naive step loop, length handling, reverse consistency, validation."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxlm.ops.recurrent import (
    CellParams,
    gru_step,
    lstm_step,
    recurrent_scan,
    rnn_step,
)

B, T, F, H = 3, 6, 4, 5
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
STEPS = {"rnn_tanh": rnn_step, "rnn_relu": partial(rnn_step, nonlinearity="relu"), "lstm": lstm_step, "gru": gru_step}
PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def reverse_within_lengths(xs, lengths):
    """Reverse each sequence of xs [B, T, ...] inside t < lengths[b]; padding stays in place (the reference)."""
    t = jnp.arange(xs.shape[1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return jnp.take_along_axis(xs, index.reshape(index.shape + (1,) * (xs.ndim - 2)), axis=1)


def make_params(kind, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    g = GATES[kind]

    def arr(*shape):
        return jnp.asarray(rng.uniform(-0.5, 0.5, shape), jnp.float32)

    return CellParams(arr(F, g * H), arr(H, g * H), arr(g * H) if bias else None, arr(g * H) if bias else None)


def make_carry(kind, seed=1):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
    return (h, jnp.asarray(rng.normal(size=(B, H)), jnp.float32)) if kind == "lstm" else h


def make_xs(seed=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, F)), jnp.float32)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y), initial=0.0)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kind", sorted(GATES))
@pytest.mark.parametrize("bias", [True, False])
def test_hoisted_scan_equals_naive_step_loop(kind, bias):
    params, carry, xs = make_params(kind, bias=bias), make_carry(kind), make_xs()
    outs = []
    for t in range(T):
        x_proj = xs[:, t] @ params.w_ih + (0 if params.b_ih is None else params.b_ih)
        carry, out = STEPS[kind](params, carry, x_proj)
        outs.append(out)
    got_outs, got_carry = recurrent_scan(kind, params, xs, make_carry(kind))
    assert max_diff(got_outs, jnp.stack(outs, axis=1)) <= 1e-6
    assert max_diff(got_carry, carry) <= 1e-6


@pytest.mark.parametrize("kind", sorted(GATES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [6, 3, 0]])
def test_named_cell_gradients_equal_autodiff_of_the_step_loop(kind, bias, reverse, lengths):
    """A named cell runs under recurrent_grad.hoisted_scan (custom VJP); its step function runs under plain
    autodiff of jax.lax.scan. Gradients of every input must agree."""
    params, carry0, xs = make_params(kind, bias=bias), make_carry(kind), make_xs()
    lengths = None if lengths is None else jnp.array(lengths)
    rng = np.random.default_rng(3)
    out_weights = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    carry_weights = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), carry0)

    def loss(cell, p, x, c):
        outs, carry = recurrent_scan(cell, p, x, c, lengths=lengths, reverse=reverse)
        carry_term = sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(carry), jax.tree.leaves(carry_weights)))
        return jnp.sum(jnp.tanh(outs) * out_weights) + carry_term

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    got, want = grad(kind, params, xs, carry0), grad(STEPS[kind], params, xs, carry0)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert max_diff(got, want) <= 1e-5


def test_reverse_without_lengths_equals_scanning_flipped_input():
    params, xs = make_params("gru"), make_xs()
    outs, carry = recurrent_scan("gru", params, xs, make_carry("gru"), reverse=True)
    ref_outs, ref_carry = recurrent_scan("gru", params, xs[:, ::-1], make_carry("gru"))
    assert max_diff(outs, ref_outs[:, ::-1]) <= 1e-6
    assert max_diff(carry, ref_carry) <= 1e-6


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_final_carry_is_state_at_last_valid_step(kind):
    params, xs = make_params(kind), make_xs()
    lengths = jnp.array([T, 2, 0])
    outs, carry = recurrent_scan(kind, params, xs, make_carry(kind), lengths=lengths)
    for b, n in enumerate([T, 2, 0]):
        row = partial(jax.tree.map, lambda a: a[b : b + 1])
        ref_outs, ref_carry = recurrent_scan(kind, params, xs[b : b + 1, :n], row(make_carry(kind)))
        assert max_diff(row(carry), ref_carry) <= 1e-6
        assert max_diff(outs[b, :n], ref_outs[0]) <= 1e-6
        assert float(jnp.abs(outs[b, n:]).max(initial=0.0)) == 0.0
    # length 0 keeps the initial carry (not the state after the padded steps).
    assert max_diff(jax.tree.map(lambda a: a[2], carry), jax.tree.map(lambda a: a[2], make_carry(kind))) == 0.0


def test_custom_step_function_and_jit_with_traced_lengths():
    params, xs, lengths = make_params("rnn_tanh"), make_xs(), jnp.array([6, 3, 1])
    step = partial(rnn_step, nonlinearity="tanh")
    run = jax.jit(lambda p, x, n: recurrent_scan(step, p, x, make_carry("rnn_tanh"), lengths=n, reverse=True))
    ref = recurrent_scan("rnn", params, xs, make_carry("rnn_tanh"), lengths=lengths, reverse=True)
    assert max_diff(run(params, xs, lengths), ref) <= 1e-6


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [6, 3, 0]])
def test_time_major_equals_batch_major(reverse, lengths):
    params, xs = make_params("lstm"), make_xs()
    lengths = None if lengths is None else jnp.array(lengths)
    outs, carry = recurrent_scan("lstm", params, xs, make_carry("lstm"), lengths=lengths, reverse=reverse)
    outs_tm, carry_tm = recurrent_scan(
        "lstm", params, xs.swapaxes(0, 1), make_carry("lstm"), lengths=lengths, reverse=reverse, time_major=True
    )
    assert outs_tm.shape == (T, B, H)
    assert max_diff(outs_tm.swapaxes(0, 1), outs) == 0.0
    assert max_diff(carry_tm, carry) == 0.0


def test_reverse_within_lengths_is_an_involution_that_keeps_padding():
    xs = jnp.arange(2 * 4).reshape(2, 4)
    got = reverse_within_lengths(xs, jnp.array([3, 0]))
    np.testing.assert_array_equal(got, [[2, 1, 0, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(reverse_within_lengths(got, jnp.array([3, 0])), xs)


lengths_strategy = st.lists(st.integers(0, T), min_size=B, max_size=B)


@jax.jit
def _scan_all(xs, lengths):
    return {
        (kind, reverse): recurrent_scan(kind, make_params(kind), xs, make_carry(kind), lengths=lengths, reverse=reverse)
        for kind in GATES
        for reverse in (False, True)
    }


@PROPERTY_SETTINGS
@given(lengths=lengths_strategy, seed=st.integers(0, 2**16))
def test_padding_values_never_change_valid_outputs_or_final_carry(lengths, seed):
    lengths = jnp.array(lengths)
    xs = make_xs(seed)
    noise = jnp.asarray(np.random.default_rng(seed + 1).normal(size=xs.shape) * 100, jnp.float32)
    padded = jnp.where(jnp.arange(T)[None, :, None] >= lengths[:, None, None], noise, xs)
    clean, dirty = _scan_all(xs, lengths), _scan_all(padded, lengths)
    for key in clean:
        assert max_diff(clean[key], dirty[key]) == 0.0, key


@PROPERTY_SETTINGS
@given(lengths=lengths_strategy, seed=st.integers(0, 2**16))
def test_reversing_within_lengths_then_forward_equals_reverse_scan(lengths, seed):
    lengths = jnp.array(lengths)
    xs = make_xs(seed)
    forward_of_reversed = _scan_all(reverse_within_lengths(xs, lengths), lengths)
    backward = _scan_all(xs, lengths)
    for kind in GATES:
        outs_f, carry_f = forward_of_reversed[(kind, False)]
        outs_b, carry_b = backward[(kind, True)]
        assert max_diff(reverse_within_lengths(outs_f, lengths), outs_b) <= 1e-6, kind
        assert max_diff(carry_f, carry_b) <= 1e-6, kind


def test_bad_inputs_raise_with_shapes():
    params, carry, xs = make_params("gru"), make_carry("gru"), make_xs()
    with pytest.raises(ValueError, match=r"\[B, T, F\].*\(3, 4\)"):
        recurrent_scan("gru", params, xs[:, 0], carry)
    with pytest.raises(ValueError, match=r"3 features.*w_ih has shape \(4, 15\)"):
        recurrent_scan("gru", params, xs[..., :3], carry)
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \(3,\).*\(2,\)"):
        recurrent_scan("gru", params, xs, carry, lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, T=6\].*7"):
        recurrent_scan("gru", params, xs, carry, lengths=jnp.array([1, 7, 2]))
    with pytest.raises(ValueError, match=r"\[0, T=6\].*-1"):
        recurrent_scan("gru", params, xs, carry, lengths=jnp.array([1, -1, 2]))
    with pytest.raises(ValueError, match="integers"):
        recurrent_scan("gru", params, xs, carry, lengths=jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="cell must be one of"):
        recurrent_scan("conv", params, xs, carry)
    with pytest.raises(ValueError, match="nonlinearity"):
        rnn_step(make_params("rnn_tanh"), make_carry("rnn_tanh"), xs[:, 0, :1].repeat(5, -1), nonlinearity="gelu")
