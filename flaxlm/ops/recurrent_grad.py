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
[B, H] itself (RNN, GRU; the LSTM has its own closed-form version in `flaxlm.ops.lstm_scan`).
"""

import functools

import jax
import jax.numpy as jnp


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


def _forward(core, reverse, w_hh, b_hh, x_proj, valid, carry0, save: bool):
    def body(carry, inputs):
        x_t, valid_t = inputs
        rec = recurrent_projection(carry, w_hh, b_hh)
        new_carry, out = masked_core(core, carry, x_t, rec, valid_t)
        return new_carry, ((out, carry, rec) if save else out)

    return jax.lax.scan(body, carry0, (x_proj, valid), reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def hoisted_scan(core, reverse: bool, w_hh, b_hh, x_proj, valid, carry0):
    """Scan `core` over time-major x_proj [T, B, G*H] from carry0; returns (final carry, outputs [T, B, H]).

    w_hh [H, G*H], b_hh [G*H] or None; valid [T, B] bool or None (every step valid): where False the carry is
    kept and the output is zero. reverse: scan from t = T - 1 down. Gradients flow to w_hh, b_hh, x_proj and
    carry0 (see the module docstring for how).
    """
    return _forward(core, reverse, w_hh, b_hh, x_proj, valid, carry0, save=False)


def _hoisted_fwd(core, reverse, w_hh, b_hh, x_proj, valid, carry0):
    carry, (outs, carries, recs) = _forward(core, reverse, w_hh, b_hh, x_proj, valid, carry0, save=True)
    return (carry, outs), (w_hh, b_hh, x_proj, valid, carries, recs)


def _hoisted_bwd(core, reverse, residuals, cotangents):
    w_hh, b_hh, x_proj, valid, carries, recs = residuals
    d_carry, d_outs = cotangents

    def body(d_next, inputs):
        carry_t, x_t, rec_t, valid_t, d_out_t = inputs
        _, step_vjp = jax.vjp(lambda c, x, r: masked_core(core, c, x, r, valid_t), carry_t, x_t, rec_t)
        d_prev, d_x, d_rec = step_vjp((d_next, d_out_t))
        return d_prev + d_rec @ w_hh.T, (d_x, d_rec)

    d_carry0, (d_x_proj, d_recs) = jax.lax.scan(
        body, d_carry, (carries, x_proj, recs, valid, d_outs), reverse=not reverse)
    d_w_hh, d_b_hh = weight_gradients(carries, d_recs, b_hh)
    return d_w_hh, d_b_hh, d_x_proj, None, d_carry0


hoisted_scan.defvjp(_hoisted_fwd, _hoisted_bwd)
