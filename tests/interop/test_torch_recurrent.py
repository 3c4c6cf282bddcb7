"""torch nn.RNN/LSTM/GRU -> flaxlm RNN: packed-sequence parity (outputs, states, input gradients), key errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.interop.torch_recurrent import recurrent_from_torch
from flaxlm.nn.recurrent import RNN

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")

B, T, F, H = 4, 6, 3, 5
LENGTHS = [3, T, 1, 4]  # unsorted, one at full length
CASES = {  # name: (flaxlm cell, nonlinearity, torch class, torch kwargs)
    "rnn_tanh": ("rnn", "tanh", "RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": ("rnn", "relu", "RNN", {"nonlinearity": "relu"}),
    "lstm": ("lstm", "tanh", "LSTM", {}),
    "gru": ("gru", "tanh", "GRU", {}),
}


def build_pair(name, *, num_layers=2, bidirectional=True, batch_first=True, bias=True, seed=0):
    cell, nonlinearity, cls, kwargs = CASES[name]
    torch.manual_seed(seed)
    torch_rnn = getattr(torch.nn, cls)(
        F, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias, **kwargs
    )
    template = RNN(F, H, cell=cell, num_layers=num_layers, bidirectional=bidirectional, nonlinearity=nonlinearity,
                   use_bias=bias, rngs=nnx.Rngs(seed))
    return torch_rnn, recurrent_from_torch(template, torch_rnn.state_dict())


def padded_inputs(seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(B, T, F)).astype(np.float32)
    for b, n in enumerate(LENGTHS):
        xs[b, n:] = 0.0
    return xs


def torch_run(torch_rnn, xs, lengths, out_w, h_w, c_w, batch_first, h0=None):
    """Packed run; returns outputs [B,T,D*H], h, c (or None), d loss / d xs, all as numpy."""
    x = torch.tensor(xs if batch_first else xs.transpose(1, 0, 2), requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                                     enforce_sorted=False)
    out, state = torch_rnn(packed, h0)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    if not batch_first:
        out = out.transpose(0, 1)
    h, c = state if isinstance(state, tuple) else (state, None)
    loss = (out * torch.tensor(out_w)).sum() + (h * torch.tensor(h_w)).sum()
    if c is not None:
        loss = loss + (c * torch.tensor(c_w)).sum()
    loss.backward()
    grad = x.grad.numpy() if batch_first else x.grad.numpy().transpose(1, 0, 2)
    return out.detach().numpy(), h.detach().numpy(), None if c is None else c.detach().numpy(), grad


def flax_run(model, xs, lengths, out_w, h_w, c_w, initial_carry=None):
    def loss_fn(x):
        out, carry = model(x, seq_lengths=jnp.array(lengths), initial_carry=initial_carry, return_carry=True)
        h, c = carry if isinstance(carry, tuple) else (carry, None)
        loss = jnp.sum(out * out_w) + jnp.sum(h * h_w) + (0.0 if c is None else jnp.sum(c * c_w))
        return loss, (out, h, c)

    grad, (out, h, c) = jax.grad(loss_fn, has_aux=True)(jnp.asarray(xs))
    return out, h, c, grad


def loss_weights(num_layers, directions, seed=1):
    rng = np.random.default_rng(seed)
    out_w = rng.normal(size=(B, T, directions * H)).astype(np.float32)
    h_w = rng.normal(size=(num_layers * directions, B, H)).astype(np.float32)
    c_w = rng.normal(size=(num_layers * directions, B, H)).astype(np.float32)
    return out_w, h_w, c_w


def assert_parity(torch_result, flax_result):
    (t_out, t_h, t_c, t_grad), (f_out, f_h, f_c, f_grad) = torch_result, flax_result
    assert np.abs(np.asarray(f_out) - t_out).max() <= 1e-5
    assert np.abs(np.asarray(f_h) - t_h).max() <= 1e-5
    if t_c is not None:
        assert np.abs(np.asarray(f_c) - t_c).max() <= 1e-5
    assert np.abs(np.asarray(f_grad) - t_grad).max() <= 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize(
    "bidirectional,batch_first", [(True, True), (False, True), (True, False)], ids=["bi", "uni", "bi-time-major"]
)
def test_two_layer_packed_parity_with_torch(name, bidirectional, batch_first):
    torch_rnn, model = build_pair(name, bidirectional=bidirectional, batch_first=batch_first)
    xs = padded_inputs()
    weights = loss_weights(2, 2 if bidirectional else 1)
    assert_parity(torch_run(torch_rnn, xs, LENGTHS, *weights, batch_first), flax_run(model, xs, LENGTHS, *weights))


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_initial_state_and_no_bias_parity_with_torch(name):
    torch_rnn, model = build_pair(name, num_layers=1, bidirectional=True, bias=False, seed=3)
    rng = np.random.default_rng(4)
    h0 = rng.normal(size=(2, B, H)).astype(np.float32)
    c0 = rng.normal(size=(2, B, H)).astype(np.float32)
    torch_h0 = (torch.tensor(h0), torch.tensor(c0)) if name == "lstm" else torch.tensor(h0)
    flax_h0 = (jnp.asarray(h0), jnp.asarray(c0)) if name == "lstm" else jnp.asarray(h0)
    xs, weights = padded_inputs(5), loss_weights(1, 2)
    assert_parity(torch_run(torch_rnn, xs, LENGTHS, *weights, True, h0=torch_h0),
                  flax_run(model, xs, LENGTHS, *weights, initial_carry=flax_h0))


def test_unpacked_full_length_parity_and_input_module_untouched():
    torch_rnn, _ = build_pair("gru")
    template = RNN(F, H, cell="gru", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(template))
    model = recurrent_from_torch(template, torch_rnn.state_dict(), torch_module_kind="gru")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(template)), before)
    xs = np.random.default_rng(0).normal(size=(B, T, F)).astype(np.float32)
    t_out, t_h = torch_rnn(torch.tensor(xs))
    f_out, f_h = model(xs, return_carry=True)
    assert np.abs(np.asarray(f_out) - t_out.detach().numpy()).max() <= 1e-5
    assert np.abs(np.asarray(f_h) - t_h.detach().numpy()).max() <= 1e-5


def test_state_dict_errors_name_keys_and_shapes():
    torch_rnn, _ = build_pair("lstm", num_layers=2, bidirectional=True)
    sd = dict(torch_rnn.state_dict())
    model = RNN(F, H, cell="lstm", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))

    missing = {k: v for k, v in sd.items() if k != "bias_hh_l1_reverse"}
    with pytest.raises(ValueError, match="missing 'bias_hh_l1_reverse'"):
        recurrent_from_torch(model, missing)
    with pytest.raises(ValueError, match=r"does not use: \['extra'\]"):
        recurrent_from_torch(model, {**sd, "extra": torch.zeros(1)})
    one_layer = RNN(F, H, cell="lstm", num_layers=1, bidirectional=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not use: .*weight_ih_l1"):
        recurrent_from_torch(one_layer, sd)
    wider = RNN(F + 1, H, cell="lstm", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"weight_ih_l0: state_dict shape \(20, 3\), expected \(20, 4\)"):
        recurrent_from_torch(wider, sd)
    gru = RNN(F, H, cell="gru", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="torch 'lstm' module but the flaxlm RNN has cell='gru'"):
        recurrent_from_torch(gru, sd)
    with pytest.raises(ValueError, match="torch_module_kind='gru'"):
        recurrent_from_torch(model, sd, torch_module_kind="gru")
    with pytest.raises(ValueError, match="no 'weight_ih_l0'"):
        recurrent_from_torch(model, {"weight": torch.zeros(1)})
    no_bias = RNN(F, H, cell="lstm", num_layers=2, bidirectional=True, use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not use: .*bias_hh_l0"):
        recurrent_from_torch(no_bias, sd)
    with pytest.raises(TypeError, match="flaxlm.nn.recurrent.RNN"):
        recurrent_from_torch(torch_rnn, sd)


def test_converted_params_do_not_share_memory_with_the_torch_tensors():
    torch_rnn, _ = build_pair("lstm", num_layers=1, bidirectional=False)
    template = RNN(F, H, cell="lstm", num_layers=1, rngs=nnx.Rngs(0))
    state_dict = torch_rnn.state_dict()
    model = recurrent_from_torch(template, state_dict, torch_module_kind="lstm")
    before = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model))]
    with torch.no_grad():
        for value in state_dict.values():
            value.add_(1.0)
    assert all(np.array_equal(b, np.asarray(a)) for b, a in zip(before, jax.tree.leaves(nnx.state(model))))
