"""dot_product_attention: parity with torch SDPA (values and gradients), masks, GQA, dtypes, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxlm.ops.attention import QUERY_BLOCK, dot_product_attention
from flaxlm.ops.masks import attention_mask, causal_mask, padding_mask

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")

B, T, S, H, D = 2, 5, 6, 4, 8


def _qkv(seed=0, t=T, s=S, h=H, kv_heads=H, d=D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, h, d), dtype=np.float32)
    k = rng.standard_normal((B, s, kv_heads, d), dtype=np.float32)
    v = rng.standard_normal((B, s, kv_heads, d), dtype=np.float32)
    return q, k, v


def _torch_sdpa(q, k, v, mask=None, is_causal=False, requires_grad=False):
    """torch SDPA on JAX-layout numpy inputs; returns (out [B,T,H,D] tensor, (q, k, v) leaf tensors)."""
    leaves = [torch.tensor(a, requires_grad=requires_grad) for a in (q, k, v)]
    tq, tk, tv = (a.transpose(1, 2) for a in leaves)
    tmask = None if mask is None else torch.tensor(np.asarray(mask))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, is_causal=is_causal)
    return out.transpose(1, 2), leaves


def _lengths_mask(q_lengths, kv_lengths, causal=False):
    return attention_mask(padding_mask(jnp.array(q_lengths), T), padding_mask(jnp.array(kv_lengths), S), causal=causal)


def _key_padding(kv_lengths):
    return padding_mask(jnp.array(kv_lengths), S)[:, None, None, :]


CASES = {
    "none": dict(mask=None, is_causal=False),
    "key_padding": dict(mask=_key_padding([6, 3]), is_causal=False),
    "is_causal": dict(mask=None, is_causal=True),
    "explicit_causal": dict(mask=causal_mask(T, S), is_causal=False),
    "padding_and_causal_flag": dict(mask=_key_padding([6, 4]), is_causal=True),
    "padding_and_causal_mask": dict(mask=_key_padding([6, 4]) & causal_mask(T, S), is_causal=False),
}


def _torch_mask(case):
    """torch wants one combined mask: fold is_causal into the bool mask when both are given."""
    mask, is_causal = case["mask"], case["is_causal"]
    if mask is not None and is_causal:
        return np.asarray(mask & causal_mask(T, S)), False
    return (None if mask is None else np.asarray(mask)), is_causal


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_sdpa(name):
    q, k, v = _qkv()
    case = CASES[name]
    out = dot_product_attention(q, k, v, **case)
    tmask, tcausal = _torch_mask(case)
    ref, _ = _torch_sdpa(q, k, v, tmask, tcausal)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["key_padding", "padding_and_causal_flag"])
def test_gradients_match_torch(name):
    q, k, v = _qkv(1)
    case = CASES[name]
    cot = np.random.default_rng(2).standard_normal((B, T, H, D), dtype=np.float32)
    grads = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, **case) * cot), argnums=(0, 1, 2))(
        q, k, v
    )
    tmask, tcausal = _torch_mask(case)
    ref, leaves = _torch_sdpa(q, k, v, tmask, tcausal, requires_grad=True)
    (ref * torch.tensor(cot)).sum().backward()
    for g, leaf in zip(grads, leaves):
        np.testing.assert_allclose(g, leaf.grad.numpy(), atol=1e-4, rtol=0)


def test_weights_are_built_only_when_asked_for():
    """XLA path, several causal query blocks: the padded, joined [B, H, T, S] weights exist only with return_weights."""
    t = 2 * QUERY_BLOCK + 5
    q, k, v = _qkv(3, t=t, s=t, h=2, kv_heads=2)

    def program(return_weights) -> str:
        return str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(
            q, k, v, is_causal=True, return_weights=return_weights, implementation="xla"))(q, k, v))

    assert "pad[" in program(True) and "pad[" not in program(False)
    assert program(True).count("concatenate[") == 2 and program(False).count("concatenate[") == 1  # outputs
    out = dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, is_causal=True, return_weights=True)[0])


@pytest.mark.parametrize("s_extra", [0, 7, -40])
def test_causal_query_blocks_match_torch(s_extra):
    """T spans several query blocks (the last one partial); keys S = T + s_extra; GQA, key padding, bias, grads."""
    t = 2 * QUERY_BLOCK + 37
    s = t + s_extra
    q, k, v = _qkv(7, t=t, s=s, h=4, kv_heads=2)
    kv_valid = jnp.arange(s)[None, :] < jnp.array([s, s - 50])[:, None]
    mask = kv_valid[:, None, None, :]
    bias = np.random.default_rng(8).standard_normal((1, 4, t, s), dtype=np.float32)
    cot = np.random.default_rng(9).standard_normal((B, t, 4, D), dtype=np.float32)

    def loss(q, k, v):
        out, weights = dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=True, return_weights=True)
        return jnp.sum(out * cot), (out, weights)

    grads, (out, weights) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    full = np.asarray(mask & causal_mask(t, s))
    leaves = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    tq, tk, tv = (a.transpose(1, 2) for a in leaves)
    tk, tv = (x.repeat_interleave(2, dim=1) for x in (tk, tv))
    logits = tq @ tk.transpose(-1, -2) / np.sqrt(D) + torch.tensor(bias)
    ref_weights = torch.softmax(logits.masked_fill(~torch.tensor(full), float("-inf")), dim=-1)
    ref = (ref_weights @ tv).transpose(1, 2)
    (ref * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(weights, ref_weights.detach().numpy(), atol=1e-6, rtol=0)
    for g, leaf in zip(grads, leaves):
        np.testing.assert_allclose(g, leaf.grad.numpy(), atol=1e-4, rtol=0)


def test_bias_matches_torch_float_mask():
    q, k, v = _qkv(3)
    bias = np.random.default_rng(4).standard_normal((1, H, T, S), dtype=np.float32)
    out = dot_product_attention(q, k, v, bias=bias)
    ref, _ = _torch_sdpa(q, k, v, bias)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=0)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = _qkv(5)
    mask = _lengths_mask([3, 5], [0, 4])  # batch 0: no keys at all; query padding rows are masked too
    out, weights = dot_product_attention(q, k, v, mask=mask, return_weights=True)
    assert np.all(np.asarray(out[0]) == 0.0)
    assert np.all(np.asarray(out[1, 5:]) == 0.0)
    assert np.all(np.asarray(weights[0]) == 0.0)
    np.testing.assert_allclose(np.asarray(weights[1, :, :5]).sum(-1), 1.0, atol=1e-6)
    grads = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask=mask) ** 2), argnums=(0, 1, 2))(
        q, k, v
    )
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0][0]) == 0.0)


def test_bfloat16_softmax_in_float32():
    q, k, v = _qkv(6)
    mask = _key_padding([6, 2])
    q16, k16, v16 = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    out = dot_product_attention(q16, k16, v16, mask=mask, is_causal=True)
    assert out.dtype == jnp.bfloat16
    ref = dot_product_attention(*(a.astype(jnp.float32) for a in (q16, k16, v16)), mask=mask, is_causal=True)
    # only the bf16 rounding of the weights before the weights @ v product and of the output remain
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=0)
    _, weights = dot_product_attention(q16, k16, v16, mask=mask, is_causal=True, return_weights=True)
    np.testing.assert_allclose(np.asarray(weights, np.float32).sum(-1)[1, :, 1:], 1.0, atol=1e-2)


def test_grouped_query_attention_equals_repeated_heads():
    q, k, v = _qkv(7, kv_heads=2)
    mask = _key_padding([4, 6])
    out = dot_product_attention(q, k, v, mask=mask, is_causal=True)
    rep = dot_product_attention(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), mask=mask, is_causal=True)
    np.testing.assert_allclose(out, rep, atol=1e-6, rtol=0)
    tmask = np.asarray(mask & causal_mask(T, S))
    tq, tk, tv = (torch.tensor(a).transpose(1, 2) for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(tmask), enable_gqa=True)
    np.testing.assert_allclose(out, ref.transpose(1, 2).numpy(), atol=1e-5, rtol=0)


def test_mask_ranks_two_to_four_broadcast():
    q, k, v = _qkv(8)
    causal = causal_mask(T, S)
    full = dot_product_attention(q, k, v, mask=jnp.broadcast_to(causal, (B, H, T, S)))
    for mask in (causal, causal[None], causal[None, None]):
        np.testing.assert_allclose(dot_product_attention(q, k, v, mask=mask), full, atol=0, rtol=0)


def test_return_weights_and_dropout():
    q, k, v = _qkv(9)
    out, weights = dot_product_attention(q, k, v, return_weights=True)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
    key = jax.random.key(0)
    out_d, w_d = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=key, return_weights=True)
    kept = np.asarray(w_d) != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(np.asarray(w_d)[kept], 2 * np.asarray(weights)[kept], rtol=1e-6)
    np.testing.assert_allclose(out_d, jnp.einsum("bhts,bshd->bthd", w_d, v), atol=1e-5)
    again = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=key)
    np.testing.assert_array_equal(out_d, again)
    no_key = dot_product_attention(q, k, v, dropout_rate=0.5)  # no key, no dropout: on CPU the fused kernel
    np.testing.assert_allclose(no_key, out, atol=1e-6, rtol=0)


def test_jit_matches_eager_and_cpu_default_is_xla():
    q, k, v = _qkv(10)
    mask = _key_padding([3, 6])
    eager = dot_product_attention(q, k, v, mask=mask, implementation="xla")
    jitted = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, mask=m))(q, k, v, mask)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_xla_on_gpu():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(11, t=8, s=8, d=64))
    mask = padding_mask(jnp.array([8, 5]), 8)[:, None, None, :]
    cudnn = dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
    xla = dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(cudnn, np.float32), np.asarray(xla, np.float32), atol=2e-2)


def test_cudnn_rejects_unsupported_requests():
    q, k, v = _qkv(12)
    with pytest.raises(ValueError, match="cudnn"):
        dot_product_attention(q, k, v, implementation="cudnn")  # float32
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize(
    "mask_shape",
    [(S,), (B, 1, 1, 1, S), (B, 1, T, 3), (3, 1, 1, S)],
)
def test_bad_mask_shapes_raise_naming_shapes(mask_shape):
    q, k, v = _qkv(13)
    with pytest.raises(ValueError, match=r"mask.*\(") as info:
        dot_product_attention(q, k, v, mask=np.ones(mask_shape, bool))
    assert str(mask_shape[-1]) in str(info.value)


def test_bad_qkv_shapes_raise():
    q, k, v = _qkv(14)
    with pytest.raises(ValueError, match="batch"):
        dot_product_attention(q[:1], k, v)
    with pytest.raises(ValueError, match="k and v"):
        dot_product_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="head_dim"):
        dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="multiple"):
        dot_product_attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="boolean"):
        dot_product_attention(q, k, v, mask=np.ones((T, S), np.float32))


_padded_attention = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, mask=m))


@settings(max_examples=20, deadline=None)
@given(lengths=st.tuples(st.integers(1, S), st.integers(1, S)), seed=st.integers(0, 2**16))
def test_padded_keys_never_change_outputs(lengths, seed):
    q, k, v = _qkv(seed)
    mask = _key_padding(list(lengths))
    noise = np.random.default_rng(seed + 1).standard_normal(k.shape).astype(np.float32) * 100
    pad = ~np.asarray(padding_mask(jnp.array(lengths), S))[:, :, None, None]
    out = _padded_attention(q, k, v, mask)
    out_noisy = _padded_attention(q, np.where(pad, noise, k), np.where(pad, noise, v), mask)
    np.testing.assert_allclose(out, out_noisy, atol=1e-5, rtol=0)


_causal_attention = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True))


@settings(max_examples=20, deadline=None)
@given(t=st.integers(0, T - 1), seed=st.integers(0, 2**16))
def test_causal_output_ignores_the_future(t, seed):
    q, k, v = _qkv(seed, s=T)
    rng = np.random.default_rng(seed + 1)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, t + 1:] = rng.standard_normal(a[:, t + 1:].shape)
    out = _causal_attention(q, k, v)
    out2 = _causal_attention(q2, k2, v2)
    np.testing.assert_allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-6, rtol=0)
