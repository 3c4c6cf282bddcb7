"""flaxlm.nn.recurrent: cells vs torch cells, RNN vs a step loop, dropout, validation, and plain JAX transforms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.nn.recurrent import RNN, GRUCell, LSTMCell, RNNCell

B, T, F, H = 3, 5, 4, 6


def xs_and_lengths(seed=0):
    xs = jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, F)), jnp.float32)
    return xs, jnp.array([T, 2, 0])


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y), initial=0.0)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


CELLS = {
    "rnn_tanh": (lambda **kw: RNNCell(F, H, nonlinearity="tanh", **kw), "RNNCell", {"nonlinearity": "tanh"}),
    "rnn_relu": (lambda **kw: RNNCell(F, H, nonlinearity="relu", **kw), "RNNCell", {"nonlinearity": "relu"}),
    "lstm": (lambda **kw: LSTMCell(F, H, **kw), "LSTMCell", {}),
    "gru": (lambda **kw: GRUCell(F, H, **kw), "GRUCell", {}),
}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_step_matches_torch_cell(name):
    torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")
    make, torch_cls, kwargs = CELLS[name]
    cell = make(rngs=nnx.Rngs(0))
    torch_cell = getattr(torch.nn, torch_cls)(F, H, **kwargs)
    with torch.no_grad():
        torch_cell.weight_ih.copy_(torch.tensor(np.asarray(cell.w_ih[...]).T))
        torch_cell.weight_hh.copy_(torch.tensor(np.asarray(cell.w_hh[...]).T))
        torch_cell.bias_ih.copy_(torch.tensor(np.asarray(cell.b_ih[...])))
        torch_cell.bias_hh.copy_(torch.tensor(np.asarray(cell.b_hh[...])))
    rng = np.random.default_rng(1)
    x, h, c = (rng.normal(size=shape).astype(np.float32) for shape in [(B, F), (B, H), (B, H)])
    if name == "lstm":
        (new_h, new_c), out = cell((jnp.asarray(h), jnp.asarray(c)), jnp.asarray(x))
        ref_h, ref_c = torch_cell(torch.tensor(x), (torch.tensor(h), torch.tensor(c)))
        assert np.abs(np.asarray(new_c) - ref_c.detach().numpy()).max() <= 1e-5
    else:
        new_h, out = cell(jnp.asarray(h), jnp.asarray(x))
        ref_h = torch_cell(torch.tensor(x), torch.tensor(h))
    assert np.abs(np.asarray(new_h) - ref_h.detach().numpy()).max() <= 1e-5
    np.testing.assert_array_equal(out, new_h)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_init_is_torch_uniform_with_logical_axes(name):
    cell = CELLS[name][0](rngs=nnx.Rngs(0))
    bound = 1.0 / math.sqrt(H)
    for param, axes in [(cell.w_ih, (None, "hidden")), (cell.w_hh, (None, "hidden")), (cell.b_ih, ("hidden",))]:
        values = np.asarray(param[...])
        assert values.min() >= -bound and values.max() <= bound and values.std() > bound / 3
        assert param.get_metadata()["out_sharding"] == axes
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[name]
    assert cell.w_ih.shape == (F, gates * H) and cell.w_hh.shape == (H, gates * H)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_single_layer_rnn_equals_step_loop_over_its_cell(cell):
    model = RNN(F, H, cell=cell, rngs=nnx.Rngs(0))
    xs, _ = xs_and_lengths()
    carry, outs = model.cells[0].initial_carry(B), []
    for t in range(T):
        carry, out = model.cells[0](carry, xs[:, t])
        outs.append(out)
    got_outs, got_carry = model(xs, return_carry=True)
    assert max_diff(got_outs, jnp.stack(outs, axis=1)) <= 1e-6
    assert max_diff(got_carry, jax.tree.map(lambda a: a[None], carry)) <= 1e-6


def test_padded_outputs_zero_and_return_modes():
    model = RNN(F, H, cell="lstm", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    xs, lengths = xs_and_lengths()
    outs, (h, c) = model(xs, seq_lengths=lengths, return_carry=True)
    assert outs.shape == (B, T, 2 * H) and h.shape == c.shape == (4, B, H)
    assert float(jnp.abs(outs[1, 2:]).max()) == 0.0 and float(jnp.abs(outs[2]).max()) == 0.0
    np.testing.assert_array_equal(h[:, 2], 0.0)  # length 0 keeps the zero initial state
    carry_only = model(xs, seq_lengths=lengths, return_sequences=False, return_carry=True)
    assert max_diff(carry_only, (h, c)) == 0.0
    assert max_diff(model(xs, seq_lengths=lengths), outs) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        model(xs, return_sequences=False)


def test_dropout_only_between_layers_and_keyed():
    xs, lengths = xs_and_lengths()
    deep = RNN(F, H, cell="gru", num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    key = jax.random.key(7)
    eval_out = deep(xs, seq_lengths=lengths)
    train_out = deep(xs, seq_lengths=lengths, dropout_key=key)
    assert max_diff(train_out, eval_out) > 1e-3
    assert max_diff(train_out, deep(xs, seq_lengths=lengths, dropout_key=key)) == 0.0
    assert float(jnp.abs(train_out[1, 2:]).max()) == 0.0
    shallow = RNN(F, H, cell="gru", num_layers=1, dropout_rate=0.5, rngs=nnx.Rngs(0))
    assert max_diff(shallow(xs, dropout_key=key), shallow(xs)) == 0.0


def test_bad_inputs_raise_with_shapes():
    model = RNN(F, H, cell="lstm", num_layers=2, rngs=nnx.Rngs(0))
    xs, lengths = xs_and_lengths()
    with pytest.raises(ValueError, match=r"\[B, T, F\].*\(3, 4\)"):
        model(xs[:, 0])
    with pytest.raises(ValueError, match=r"3 features \(shape \(3, 5, 3\)\), expected F=4"):
        model(xs[..., :3])
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \[B\] = \(3,\).*\(3, 1\)"):
        model(xs, seq_lengths=lengths[:, None])
    with pytest.raises(ValueError, match=r"\[0, T=5\].*6"):
        model(xs, seq_lengths=jnp.array([6, 1, 1]))
    with pytest.raises(ValueError, match=r"\[L\*D, B, H\] = \(2, 3, 6\), got \(1, 3, 6\)"):
        model(xs, initial_carry=(jnp.zeros((1, B, H)), jnp.zeros((1, B, H))))
    with pytest.raises(ValueError, match=r"tuple \(h0, c0\)"):
        model(xs, initial_carry=jnp.zeros((2, B, H)))
    with pytest.raises(ValueError, match=r"x must have shape \[B, F=4\]"):
        model.cells[0](model.cells[0].initial_carry(B), xs)
    with pytest.raises(ValueError, match="cell must be one of"):
        RNN(F, H, cell="transformer", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_layers"):
        RNN(F, H, num_layers=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="nonlinearity"):
        RNNCell(F, H, nonlinearity="gelu", rngs=nnx.Rngs(0))


def test_jit_grad_and_vmap_over_init_keys():
    xs, lengths = xs_and_lengths()
    model = RNN(F, H, cell="lstm", num_layers=2, bidirectional=True, dropout_rate=0.1, rngs=nnx.Rngs(0))

    def loss(m, x, n, key):
        return jnp.sum(m(x, seq_lengths=n, dropout_key=key) ** 2)

    eager = loss(model, xs, lengths, jax.random.key(1))
    jitted = jax.jit(loss)(model, xs, lengths, jax.random.key(1))
    assert abs(float(eager) - float(jitted)) <= 1e-4
    grads = jax.jit(jax.grad(loss))(model, xs, lengths, jax.random.key(1))
    assert isinstance(grads, RNN) and grads.cells[3].w_hh.shape == model.cells[3].w_hh.shape
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads.cells[0].w_ih[...]).sum()) > 0.0

    keys = jax.random.split(jax.random.key(0), 3)
    stack = jax.vmap(lambda k: RNN(F, H, cell="gru", rngs=nnx.Rngs(k)))(keys)
    assert stack.cells[0].w_ih.shape == (3, F, 3 * H)
    outs = jax.vmap(lambda m: m(xs, seq_lengths=lengths))(stack)
    second = RNN(F, H, cell="gru", rngs=nnx.Rngs(keys[1]))
    assert max_diff(outs[1], second(xs, seq_lengths=lengths)) <= 1e-6


def test_compute_dtype_bfloat16():
    model = RNN(F, H, cell="gru", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    xs, lengths = xs_and_lengths()
    outs, h = model(xs, seq_lengths=lengths, return_carry=True)
    assert outs.dtype == h.dtype == jnp.bfloat16
    assert model.cells[0].w_ih[...].dtype == jnp.float32
    reference = RNN(F, H, cell="gru", rngs=nnx.Rngs(0))(xs, seq_lengths=lengths)
    assert max_diff(outs.astype(jnp.float32), reference) <= 5e-2
