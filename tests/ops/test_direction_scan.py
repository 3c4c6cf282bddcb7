"""flaxlm.ops.direction_scan and the named cells' use of it: several directions in one loop equal separate scans,
outputs written over buffers equal fresh ones, a bidirectional layer compiles to one loop per pass, and the
compiled LSTM loops update their [T, B, 4H] arrays in place."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.ops.direction_scan import scan_directions
from flaxlm.ops.recurrent import STEP_FUNCTIONS, CellParams, recurrent_scan, recurrent_scan_directions

B, T, F, H = 3, 6, 4, 5


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]


def _cumulative(carry, x):
    """A toy recurrence per direction: carry <- tanh(carry + x); emits (carry, 2 x)."""
    new = tuple(jnp.tanh(c + x_d) for c, x_d in zip(carry, x))
    return new, tuple((n, 2.0 * x_d) for n, x_d in zip(new, x))


@pytest.mark.parametrize("reverses", [(False,), (True,), (False, True), (True, True, False)])
def test_each_direction_equals_its_own_lax_scan(reverses):
    xs = tuple(_arrays(len(reverses), *[(T, B)] * len(reverses)))
    carry0 = tuple(_arrays(7, *[(B,)] * len(reverses)))
    carry, ys = scan_directions(_cumulative, carry0, xs, reverses)
    for d, reverse in enumerate(reverses):
        want_carry, want_ys = jax.lax.scan(lambda c, x: (jnp.tanh(c + x), (jnp.tanh(c + x), 2.0 * x)),
                                           carry0[d], xs[d], reverse=reverse)
        np.testing.assert_allclose(carry[d], want_carry, rtol=1e-6)
        np.testing.assert_allclose(ys[d][0], want_ys[0], rtol=1e-6)
        np.testing.assert_allclose(ys[d][1], want_ys[1], rtol=1e-6)


def test_outputs_over_buffers_equal_fresh_outputs():
    """Writing into an own input (read at row t first) or into an unread array gives the same result as zeros."""
    x_f, x_b, dead = _arrays(1, (T, B), (T, B), (T, B))
    carry0 = tuple(_arrays(2, (B,), (B,)))
    fresh = jax.jit(lambda x_f, x_b: scan_directions(_cumulative, carry0, (x_f, x_b), (False, True)))(x_f, x_b)

    @jax.jit
    def reused(x_f, x_b, dead):
        return scan_directions(_cumulative, carry0, (x_f, x_b), (False, True), buffers=((None, x_f), (dead, None)))

    got = reused(x_f, x_b, dead)
    assert jax.tree.structure(got) == jax.tree.structure(fresh)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(fresh)):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_zero_steps_returns_the_initial_carry_and_empty_outputs():
    carry0 = (jnp.ones((B,)),)
    carry, ys = scan_directions(_cumulative, carry0, (jnp.zeros((0, B)),), (True,))
    assert carry is carry0 and ys[0][0].shape == (0, B) and ys[0][1].shape == (0, B)


def test_bad_buffers_and_inputs_raise():
    x_f, x_b = _arrays(1, (T, B), (T, B))
    carry0 = tuple(_arrays(2, (B,), (B,)))
    with pytest.raises(ValueError, match=r"stacked shape \(6, 3\) and dtype float32, got \(6, 4\)"):
        scan_directions(_cumulative, carry0, (x_f, x_b), (False, True), buffers=((jnp.zeros((T, 4)), None), None))
    with pytest.raises(ValueError, match="must not be an input of another direction"):
        scan_directions(_cumulative, carry0, (x_f, x_b), (False, True), buffers=((x_b, None), None))
    with pytest.raises(ValueError, match="at least one array in xs"):
        scan_directions(_cumulative, carry0, (None, None), (False, True))


GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def _params(seed, cell="lstm"):
    gates = GATES[cell]
    w_ih, w_hh, b_ih, b_hh = _arrays(seed, (F, gates * H), (H, gates * H), (gates * H,), (gates * H,))
    return CellParams(0.5 * w_ih, 0.5 * w_hh, b_ih, b_hh)


def _carries(cell):
    if cell == "lstm":
        return tuple(tuple(_arrays(seed, (B, H), (B, H))) for seed in (3, 4))
    return tuple(_arrays(seed, (B, H))[0] for seed in (3, 4))


@pytest.mark.parametrize("cell", sorted(GATES))
@pytest.mark.parametrize("lengths", [None, [6, 3, 0]])
def test_bidirectional_layer_in_one_loop_equals_two_autodiff_scans(cell, lengths):
    """Outputs, final carries and every gradient of a named cell's one-loop directions (custom VJP) against each
    direction's step function under plain autodiff of jax.lax.scan."""
    params = (_params(1, cell), _params(2, cell))
    carries = _carries(cell)
    (xs,) = _arrays(5, (B, T, F))
    lengths = None if lengths is None else jnp.array(lengths)
    out_weights = _arrays(6, (B, T, H), (B, T, H))
    step = STEP_FUNCTIONS[cell]

    def loss_one_loop(params, xs, carries):
        outs, finals = recurrent_scan_directions(cell, params, xs, carries, reverses=(False, True), lengths=lengths)
        return sum(jnp.sum(jnp.tanh(o) * w) for o, w in zip(outs, out_weights)) + sum(
            jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(finals))

    def loss_separate(params, xs, carries):
        results = [recurrent_scan(step, p, xs, c, lengths=lengths, reverse=d == 1)
                   for d, (p, c) in enumerate(zip(params, carries))]
        return sum(jnp.sum(jnp.tanh(o) * w) for (o, _), w in zip(results, out_weights)) + sum(
            jnp.sum(jnp.sin(a)) for _, final in results for a in jax.tree.leaves(final))

    got = jax.jit(jax.value_and_grad(loss_one_loop, argnums=(0, 1, 2)))(params, xs, carries)
    want = jax.jit(jax.value_and_grad(loss_separate, argnums=(0, 1, 2)))(params, xs, carries)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_gradient_compiles_to_one_loop_per_pass(cell):
    """LSTM and GRU directions share the forward loop and the backward loop: two while loops in the compiled
    gradient (as separate scans XLA:CPU runs the directions one after the other)."""
    params = (_params(1, cell), _params(2, cell))

    def loss(params, xs):
        outs, _ = recurrent_scan_directions(cell, params, xs, _carries(cell), reverses=(False, True))
        return sum(jnp.sum(o * o) for o in outs)

    hlo = jax.jit(jax.grad(loss)).lower(params, *_arrays(5, (B, T, F))).compile().as_text()
    assert len(re.findall(r"= .* while\(", hlo)) == 2


def test_compiled_bidirectional_lstm_gradient_copies_no_gate_sized_array():
    """The gates overwrite x_proj and the backward's d_z overwrites the saved gates in place: the compiled
    gradient has no copy of a [T, B, 4H] array (XLA:CPU copied such an array twice per step when a write was
    not in place)."""
    params = (_params(1), _params(2))
    carries = _carries("lstm")
    (xs,) = _arrays(5, (B, T, F))

    def loss(params, xs):
        outs, _ = recurrent_scan_directions("lstm", params, xs, carries, reverses=(False, True),
                                            lengths=jnp.array([6, 3, 0]))
        return sum(jnp.sum(o * o) for o in outs)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile().as_text()
    gate_sized = rf"f32\[{T},{B},{4 * H}\]"
    copies = [line for line in hlo.splitlines() if re.search(rf"= {gate_sized}\S* copy\(", line)]
    assert re.search(gate_sized, hlo) and copies == []
