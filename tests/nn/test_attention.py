"""MultiHeadAttention: parity with torch nn.MultiheadAttention (values, weights, input gradients), KV cache decoding,
validation and parameter metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.interop.torch_transformer import mha_from_torch
from flaxlm.nn.attention import KVCache, MultiHeadAttention
from flaxlm.ops.masks import causal_mask, padding_mask

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")

B, T, S, E, H = 2, 5, 4, 8, 2


def _pair(fused, kdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    tmod = torch.nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim, bias=bias)
    template = MultiHeadAttention(H, E, kv_features=kdim, fused_qkv=fused, use_bias=bias, rngs=nnx.Rngs(0))
    return tmod, mha_from_torch(template, tmod.state_dict())


def _inputs(seed, kdim=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, E), dtype=np.float32)
    mem = rng.standard_normal((B, S, kdim or E), dtype=np.float32)
    return x, mem


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_torch_with_padding_and_causal_masks(fused, bias):
    tmod, mod = _pair(fused, bias=bias)
    x, _ = _inputs(1)
    valid = padding_mask(jnp.array([5, 3]), T)
    mask = valid[:, None, None, :] & causal_mask(T)
    out, weights = mod(jnp.asarray(x), mask=mask, return_weights=True)
    tx = torch.tensor(x)
    ref, ref_w = tmod(
        tx, tx, tx, key_padding_mask=torch.tensor(~np.asarray(valid)),
        attn_mask=torch.tensor(~np.asarray(causal_mask(T))), average_attn_weights=False,
    )
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(weights, ref_w.detach().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused, kdim", [(True, None), (False, None), (False, 6)])
def test_cross_attention_matches_torch_with_gradients(fused, kdim):
    tmod, mod = _pair(fused, kdim=kdim, seed=2)
    x, mem = _inputs(3, kdim)
    kv_valid = padding_mask(jnp.array([2, 4]), S)
    cot = np.random.default_rng(4).standard_normal((B, T, E), dtype=np.float32)

    def loss(x, mem):
        out, weights = mod(x, mem, mask=kv_valid[:, None, None, :], return_weights=True)
        return jnp.sum(out * cot), (out, weights)

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, (out, weights)), grads = grad_fn(jnp.asarray(x), jnp.asarray(mem))
    tx, tmem = torch.tensor(x, requires_grad=True), torch.tensor(mem, requires_grad=True)
    ref, ref_w = tmod(tx, tmem, tmem, key_padding_mask=torch.tensor(~np.asarray(kv_valid)),
                      average_attn_weights=False)
    (ref * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(weights, ref_w.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(grads[0], tx.grad.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(grads[1], tmem.grad.numpy(), atol=1e-4, rtol=0)


def test_self_attention_input_gradient_matches_torch():
    tmod, mod = _pair(True, seed=5)
    x, _ = _inputs(6)
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(mod(x, is_causal=True))))(jnp.asarray(x))
    tx = torch.tensor(x, requires_grad=True)
    ref, _ = tmod(tx, tx, tx, attn_mask=torch.tensor(~np.asarray(causal_mask(T))), need_weights=False)
    torch.sin(ref).sum().backward()
    np.testing.assert_allclose(grad, tx.grad.numpy(), atol=1e-4, rtol=0)


@jax.jit
def _step(mod, x_t, cache, mask):
    return mod(x_t, cache=cache, mask=mask)


def _decode_one_by_one(mod, x, cache, mask=None):
    outs = []
    for t in range(x.shape[1]):
        out, cache = _step(mod, x[:, t:t + 1], cache, mask)
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "kwargs",
    [dict(fused_qkv=True), dict(num_kv_heads=1, qkv_features=16), dict(rope=True), dict(use_bias=False)],
    ids=["fused", "gqa", "rope", "nobias"],
)
def test_kv_cache_decoding_equals_full_causal_forward(kwargs):
    mod = MultiHeadAttention(4, E, rngs=nnx.Rngs(7), **kwargs)
    x = jax.random.normal(jax.random.key(8), (B, T, E))
    full = mod(x, is_causal=True)
    decoded, cache = _decode_one_by_one(mod, x, mod.init_cache(B, T + 3))
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)
    assert int(cache.index) == T
    assert np.all(np.asarray(cache.k[:, T:]) == 0)


def test_kv_cache_prefill_then_jitted_steps():
    mod = MultiHeadAttention(H, E, rope=True, rngs=nnx.Rngs(9))
    x = jax.random.normal(jax.random.key(10), (B, T, E))
    full = mod(x, is_causal=True)
    prefix, cache = mod(x[:, :3], cache=mod.init_cache(B, 8))
    step = jax.jit(lambda m, xt, c: m(xt, cache=c))
    outs = [prefix]
    for t in range(3, T):
        out, cache = step(mod, x[:, t:t + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


def test_kv_cache_with_left_padding_mask_matches_masked_forward():
    mod = MultiHeadAttention(H, E, rngs=nnx.Rngs(11))
    x = jax.random.normal(jax.random.key(12), (B, T, E))
    key_valid = jnp.array([[True] * T, [False, False] + [True] * (T - 2)])
    full = mod(x, mask=key_valid[:, None, None, :], is_causal=True)
    cache_valid = jnp.pad(key_valid, ((0, 0), (0, 2)))
    decoded, _ = _decode_one_by_one(mod, x, mod.init_cache(B, T + 2), mask=cache_valid[:, None, None, :])
    np.testing.assert_allclose(decoded[:, 2:], full[:, 2:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(decoded[0], full[0], atol=1e-5, rtol=0)


def test_cache_is_a_pytree_and_checks_overflow_and_shape():
    mod = MultiHeadAttention(H, E, rngs=nnx.Rngs(13))
    cache = mod.init_cache(B, 2)
    assert isinstance(cache, KVCache) and cache.k.shape == (B, 2, H, E // H) and cache.index.dtype == jnp.int32
    assert len(jax.tree.leaves(cache)) == 3
    x = jnp.ones((B, 3, E))
    with pytest.raises(ValueError, match="overflow"):
        mod(x, cache=cache)
    with pytest.raises(ValueError, match=r"cache.k.*\(2, 2, 2, 4\)"):
        mod(x[:1], cache=cache)
    with pytest.raises(ValueError, match="cross-attention"):
        mod(x, x, cache=mod.init_cache(B, 4))


def test_construction_errors():
    with pytest.raises(ValueError, match="num_heads=3 must divide qkv_features=8"):
        MultiHeadAttention(3, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        MultiHeadAttention(4, 8, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fused_qkv"):
        MultiHeadAttention(4, 8, num_kv_heads=2, fused_qkv=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout_rate"):
        MultiHeadAttention(4, 8, dropout_rate=1.0, rngs=nnx.Rngs(0))


def test_call_shape_errors():
    mod = MultiHeadAttention(H, E, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x_q must have shape \[B, T, 8\], got \(2, 5, 6\)"):
        mod(jnp.ones((B, T, 6)))
    with pytest.raises(ValueError, match=r"batch sizes differ: \(2, 5, 8\) vs \(3, 4, 8\)"):
        mod(jnp.ones((B, T, E)), jnp.ones((3, S, E)))
    with pytest.raises(ValueError, match=r"mask.*rank"):
        mod(jnp.ones((B, T, E)), mask=jnp.ones((T,), bool))


def test_attention_dropout_uses_the_key():
    mod = MultiHeadAttention(H, E, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, T, E))
    a = mod(x, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(a, mod(x, dropout_key=jax.random.key(2)))
    assert not np.allclose(a, mod(x, dropout_key=jax.random.key(3)))
    np.testing.assert_array_equal(mod(x), mod(x))


def test_bfloat16_compute_dtype():
    mod = MultiHeadAttention(H, E, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, T, E))
    out = mod(x, is_causal=True)
    assert out.dtype == jnp.bfloat16 and mod.q_kernel.dtype == jnp.float32
    ref = nnx.clone(mod)
    ref.dtype = jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), ref(x, is_causal=True), atol=5e-2)


def test_parameter_logical_axes():
    sep = MultiHeadAttention(4, E, qkv_features=16, num_kv_heads=2, rngs=nnx.Rngs(0))
    assert sep.q_kernel.shape == (E, 4, 4) and sep.k_kernel.shape == (E, 2, 4)
    assert sep.q_kernel.out_sharding == ("embed", "heads", "kv")
    assert sep.q_bias.out_sharding == ("heads", "kv")
    assert sep.out_kernel.shape == (4, 4, E) and sep.out_kernel.out_sharding == ("heads", "kv", "embed")
    fused = MultiHeadAttention(H, E, fused_qkv=True, rngs=nnx.Rngs(0))
    assert fused.qkv_kernel.shape == (E, 3, H, E // H)
    assert fused.qkv_kernel.out_sharding == ("embed", None, "heads", "kv")
