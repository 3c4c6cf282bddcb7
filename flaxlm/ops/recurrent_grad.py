"""A recurrent scan whose backward pass computes the recurrent weight gradient with one matmul after the loop.

Autodiff of `jax.lax.scan` accumulates the recurrent weight gradient inside the backward loop: at every step a
small [H, B] x [B, G*H] product and an add into a [H, G*H] accumulator (4 MiB for an LSTM of width 512). Here
the backward loop only emits each step's gradient with respect to the recurrent projection `rec_t = h_{t-1} @
w_hh + b_hh`, and afterwards

    d w_hh = H_prev^T @ d REC     ([H, T*B] x [T*B, G*H], one product)
    d b_hh = sum over t and b of d REC

as oneDNN's RNN kernels (which PyTorch's CPU LSTM runs) do. The cell's elementwise part is recomputed in the
backward loop from the saved carries and projections, so the forward loop saves carries and `rec_t` only.

A cell is given as `core(h, x_proj_t, rec_t) -> (h', out_t)` (no matmul inside) whose carry is the hidden state h
[B, H] itself (RNN, GRU; the LSTM has its own closed-form version in `flaxlm.ops.lstm_scan`). Several directions
(a bidirectional layer's) run in one forward and one backward loop over time (`flaxlm.ops.direction_scan`).
"""

import functools

import jax
import jax.numpy as jnp

from flaxlm.ops.direction_scan import scan_directions


def recurrent_projection(h: jax.Array, w_hh: jax.Array, b_hh: jax.Array | None) -> jax.Array:
    """h [B, H] -> h @ w_hh + b_hh [B, G*H]."""
    rec = h @ w_hh
    return rec if b_hh is None else rec + b_hh


def weight_gradients(h_prev: jax.Array, d_rec: jax.Array, b_hh: jax.Array | None):
    """Gradients of w_hh and b_hh from every step at once: h_prev [T, B, H] (the hidden state each step
    multiplied by w_hh) and d_rec [T, B, G*H] (each step's gradient of rec_t) -> (d w_hh [H, G*H], d b_hh or None)."""
    rows = h_prev.shape[0] * h_prev.shape[1]
    d_w_hh = h_prev.reshape(rows, h_prev.shape[2]).T @ d_rec.reshape(rows, d_rec.shape[2])
    return d_w_hh, None if b_hh is None else d_rec.sum(axis=(0, 1))


def masked_core(core, carry, x_t, rec_t, valid_t):
    """core(carry, x_t, rec_t), keeping the old carry and emitting zeros where valid_t [B] is False (valid_t
    None: every row valid)."""
    new_carry, out = core(carry, x_t, rec_t)
    if valid_t is None:
        return new_carry, out
    keep = valid_t[:, None]
    new_carry = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_carry, carry)
    return new_carry, jnp.where(keep, out, jnp.zeros_like(out))


def _forward(core, reverses, w_hh, b_hh, x_proj, valid, carry0, save: bool):
    def body(carry, inputs):
        results = []
        for carry_d, w_d, b_d, (x_t, valid_t) in zip(carry, w_hh, b_hh, inputs):
            rec = recurrent_projection(carry_d, w_d, b_d)
            new_carry, out = masked_core(core, carry_d, x_t, rec, valid_t)
            results.append((new_carry, (out, carry_d, rec) if save else out))
        return tuple(c for c, _ in results), tuple(y for _, y in results)

    return scan_directions(body, carry0, tuple((x, valid) for x in x_proj), reverses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def hoisted_scan(core, reverses: tuple[bool, ...], w_hh, b_hh, x_proj, valid, carry0):
    """Scan `core` over time-major inputs for D directions in one loop (`flaxlm.ops.direction_scan`), whose
    independent per-direction kernels XLA:CPU runs side by side. Returns (final carries, outputs [T, B, H]), tuples.

    Per direction d (tuples): w_hh[d] [H, G*H], b_hh[d] [G*H] or None, x_proj[d] [T, B, G*H], carry0[d] [B, H];
    reverses[d]: that direction runs from t = T - 1 down. valid [T, B] bool or None (every step valid), shared: where
    False the carry is kept and the output is zero. Gradients flow to w_hh, b_hh, x_proj and carry0 (see the module
    docstring for how).
    """
    return _forward(core, reverses, w_hh, b_hh, x_proj, valid, carry0, save=False)


def _hoisted_fwd(core, reverses, w_hh, b_hh, x_proj, valid, carry0):
    carry, saved = _forward(core, reverses, w_hh, b_hh, x_proj, valid, carry0, save=True)
    outs, carries, recs = zip(*saved)
    return (carry, outs), (w_hh, b_hh, x_proj, valid, carries, recs)


def _hoisted_bwd(core, reverses, residuals, cotangents):
    w_hh, b_hh, x_proj, valid, carries, recs = residuals
    d_carry, d_outs = cotangents

    def body(d_next, inputs):
        results = []
        for d_next_d, w_d, (carry_t, x_t, rec_t, valid_t, d_out_t) in zip(d_next, w_hh, inputs):
            _, step_vjp = jax.vjp(lambda c, x, r, v=valid_t: masked_core(core, c, x, r, v), carry_t, x_t, rec_t)
            d_prev, d_x, d_rec = step_vjp((d_next_d, d_out_t))
            results.append((d_prev + d_rec @ w_d.T, (d_x, d_rec)))
        return tuple(d for d, _ in results), tuple(y for _, y in results)

    xs = tuple(zip(carries, x_proj, recs, (valid,) * len(reverses), d_outs))
    d_carry0, grads = scan_directions(body, d_carry, xs, tuple(not r for r in reverses))
    d_x_proj, d_recs = zip(*grads)
    d_w_hh, d_b_hh = zip(*(weight_gradients(c, r, b) for c, r, b in zip(carries, d_recs, b_hh)))
    return d_w_hh, d_b_hh, d_x_proj, None, d_carry0


hoisted_scan.defvjp(_hoisted_fwd, _hoisted_bwd)
