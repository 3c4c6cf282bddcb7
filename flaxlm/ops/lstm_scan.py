"""The LSTM recurrence over time with a hand-written backward pass, as oneDNN's LSTM kernels (PyTorch's CPU LSTM) do.

Autodiff of the LSTM step inside `jax.lax.scan` recomputes the gate nonlinearities and differentiates them op by
op: XLA:CPU then runs about a dozen small elementwise kernels and three carry copies per backward step, and a
[B, G*H] x [H, G*H] product accumulates the recurrent weight gradient at every step. Here the forward loop saves
each step's activated gates a = (i, f, g, o) [B, 4H] and its carry (h, c), and the backward loop is the
closed-form LSTM gradient (dc' = dc + dh o (1 - tanh^2 c'), dz = (dc' g i (1 - i), dc' c f (1 - f),
dc' i (1 - g^2), dh tanh(c') o (1 - o)), dh_prev = dz w_hh^T, dc_prev = dc' f). Every factor that does not
depend on the incoming gradient is computed for all steps in one elementwise pass before the loop
(`_backward_factors`): recomputed per step from column slices of the saved gates, XLA:CPU ran them at ~6 ns per
element. The loop is then a few fused multiply-adds and one matmul per step. The weight gradients come after
the loop from all steps at once:

    d w_hh = H_prev^T @ dZ     ([H, T*B] x [T*B, 4H], one product)      d b_hh = sum of dZ
    d x_proj = dZ               (x_proj enters the gates additively)

All directions of a layer (a BiLSTM's two) run in one loop over time each way (`flaxlm.ops.direction_scan`), and
both loops write their largest output over an array that is dead afterwards instead of a zero-filled one: the
forward's gates over x_proj (row t is read before it is overwritten), the backward's dZ over the saved gates
(no longer read once the factors exist).

Gate order, equations and the length mask are those of `flaxlm.ops.recurrent` (steps where `valid` is False keep
the carry and output zeros; their gradient passes the carry's gradient through unchanged).
"""

import functools

import jax
import jax.numpy as jnp

from flaxlm.ops.direction_scan import scan_directions
from flaxlm.ops.recurrent_grad import recurrent_projection, weight_gradients


def _gate_scale(four_h: int) -> jax.Array:
    """[4H] constant: 1 on the g block, 0.5 on the sigmoid blocks i, f, o."""
    col = jnp.arange(four_h)
    return jnp.where((col >= four_h // 2) & (col < 3 * four_h // 4), 1.0, 0.5).astype(jnp.float32)


def lstm_gates(z: jax.Array) -> jax.Array:
    """Pre-activations z [B, 4H] (i, f, g, o) -> activated gates (sigmoid i, f, o; tanh g), same layout.

    One elementwise expression over all 4H columns, s tanh(s z) + 1 - s with s = 0.5 (sigmoid) or 1 (tanh), so
    XLA emits one loop for the four gates."""
    s = _gate_scale(z.shape[-1]).astype(z.dtype)
    return s * jnp.tanh(s * z) + (1.0 - s)


def lstm_update(gates: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Activated gates [B, 4H] and cell state c [B, H] -> (h', c')."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = f * c + i * g
    return o * jnp.tanh(c), c


def _keep(valid_t, new, old):
    return new if valid_t is None else jnp.where(valid_t[:, None], new, old)


def _forward(reverses, w_hh, b_hh, x_proj, valid, carry0, save: bool):
    """The loop over time for every direction; emits each step's carry (h, c) after the step, and with `save`
    its activated gates too."""
    def body(carries, inputs):
        outs, new_carries = [], []
        for (h, c), (x_t, valid_t), w, b in zip(carries, inputs, w_hh, b_hh):
            gates = lstm_gates(x_t + recurrent_projection(h, w, b))
            h_new, c_new = lstm_update(gates, c)
            carry = (_keep(valid_t, h_new, h), _keep(valid_t, c_new, c))
            new_carries.append(carry)
            outs.append((carry, gates) if save else carry[0])
        return tuple(new_carries), tuple(outs)

    buffers = tuple(((None, None), x) for x in x_proj) if save else None  # the gates overwrite x_proj
    return scan_directions(body, carry0, tuple((x, valid) for x in x_proj), reverses, buffers)


def _outputs(hs: jax.Array, valid) -> jax.Array:
    """Carried hidden states [T, B, H] -> outputs: zero at the steps where valid [T, B] is False."""
    return hs if valid is None else jnp.where(valid[:, :, None], hs, 0.0)


def _previous(states: jax.Array, first: jax.Array, reverse: bool) -> jax.Array:
    """The state before each step: [first, states[:-1]] in scan order (reversed when `reverse`)."""
    if reverse:
        return jnp.concatenate([states[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], states[:-1]], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lstm_scan(reverses: tuple[bool, ...], w_hh, b_hh, x_proj, valid, carry0):
    """LSTMs over time-major inputs, one per direction, all in one loop over time (`scan_directions`).

    Per direction d (every argument but `valid` is a tuple over directions): x_proj[d] [T, B, 4H] (= x @ w_ih;
    `recurrent_scan` passes b_ih + b_hh as b_hh), carry0[d] = (h0, c0), each [B, H], w_hh[d] [H, 4H], b_hh[d] [4H]
    or None (added to h @ w_hh at every step); reverses[d]: scan from
    t = T - 1 down. valid [T, B] bool or None (every step valid), shared by all directions. Returns (final carries
    ((h, c) per direction), outputs ([T, B, H] per direction)); gradients flow to w_hh, b_hh, x_proj and carry0.
    """
    carries, hs = _forward(reverses, w_hh, b_hh, x_proj, valid, carry0, save=False)
    return carries, tuple(_outputs(h, valid) for h in hs)


def _lstm_fwd(reverses, w_hh, b_hh, x_proj, valid, carry0):
    carries, saved = _forward(reverses, w_hh, b_hh, x_proj, valid, carry0, save=True)
    outputs = tuple(_outputs(hs, valid) for (hs, _), _ in saved)
    return (carries, outputs), (w_hh, b_hh, valid, saved, carry0)


def _backward_factors(gates, cs, c_prev):
    """Everything the backward loop multiplies by, from all steps at once (one elementwise pass over [T, ...]).

    gates [T, B, 4H] activated (i, f, g, o), cs the carried cell states after each step and c_prev those before,
    [T, B, H] (at a masked step cs is the kept carry, not f c + i g; the loop zeroes that step's dz anyway).
    Returns (m [T, B, 4H] = (g, c_prev, i, tanh c) * (i (1 - i), f (1 - f), 1 - g^2, o (1 - o)),
    o (1 - tanh^2 c) [T, B, H], f [T, B, H]), so that a step's gradient is dz = (dc', dc', dc', dh) * m."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    tanh_c = jnp.tanh(cs)
    m = jnp.concatenate([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - g * g), tanh_c * o * (1.0 - o)],
                        axis=-1)
    return m, o * (1.0 - tanh_c * tanh_c), f


def _lstm_bwd(reverses, residuals, cotangents):
    w_hh, b_hh, valid, saved, carry0 = residuals
    d_finals, d_outs = cotangents
    factors = tuple(_backward_factors(gates, cs, _previous(cs, c0, reverse))
                    for reverse, ((_, cs), gates), (_, c0) in zip(reverses, saved, carry0))
    w_hh_t = tuple(w.T for w in w_hh)

    def body(d_carries, inputs):
        new_carries, d_zs = [], []
        for (d_h, d_c), ((m_t, o_dtanh_t, f_t), valid_t, d_out_t), w_t in zip(d_carries, inputs, w_hh_t):
            d_h_new = d_h + d_out_t
            d_c_new = d_c + d_h_new * o_dtanh_t
            d_z = _keep(valid_t, jnp.concatenate([d_c_new, d_c_new, d_c_new, d_h_new], axis=-1) * m_t, 0.0)
            d_h_prev = d_z @ w_t
            if valid_t is not None:
                d_h_prev = d_h_prev + jnp.where(valid_t[:, None], 0.0, d_h)
            new_carries.append((d_h_prev, _keep(valid_t, d_c_new * f_t, d_c)))
            d_zs.append(d_z)
        return tuple(new_carries), tuple(d_zs)

    d_carry0, d_z = scan_directions(body, d_finals, tuple((fs, valid, d) for fs, d in zip(factors, d_outs)),
                                    tuple(not r for r in reverses), buffers=tuple(gates for _, gates in saved))
    grads = tuple(weight_gradients(_previous(hs, h0, reverse), dz, b)
                  for reverse, ((hs, _), _), (h0, _), dz, b in zip(reverses, saved, carry0, d_z, b_hh))
    return tuple(g[0] for g in grads), tuple(g[1] for g in grads), d_z, None, d_carry0


lstm_scan.defvjp(_lstm_fwd, _lstm_bwd)
