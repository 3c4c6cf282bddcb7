"""Transformer layers and stacks: torch parity (values and input gradients), scan == unroll, flat compile size,
KV-cache decoding, vmapped model construction, and padding/causality properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxlm.interop.torch_transformer import decoder_layer_from_torch, encoder_layer_from_torch
from flaxlm.nn.feedforward import FeedForward
from flaxlm.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from flaxlm.ops.masks import causal_mask, padding_mask

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")

B, T, S, E, H, FF = 2, 5, 4, 8, 2, 16


def _randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _encoder_layer(rngs, **kwargs):
    return TransformerEncoderLayer(E, H, FF, **kwargs, rngs=rngs)


def _gpt_layer(rngs, **kwargs):
    return TransformerDecoderLayer(E, H, FF, cross_attention=False, dropout_rate=0.1, **kwargs, rngs=rngs)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch.manual_seed(0)
    tlayer = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, activation=activation, norm_first=norm_first,
                                              batch_first=True).eval()
    template = TransformerEncoderLayer(E, H, FF, activation=activation, norm_first=norm_first, rngs=nnx.Rngs(0))
    layer = encoder_layer_from_torch(template, tlayer.state_dict())
    x, cot = _randn(1, B, T, E), _randn(2, B, T, E)
    valid = padding_mask(jnp.array([5, 3]), T)

    def loss(x):
        out = layer(x, mask=valid[:, None, None, :])
        return jnp.sum(out * cot), out

    (_, out), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(x))
    tx = torch.tensor(x, requires_grad=True)
    ref = tlayer(tx, src_key_padding_mask=torch.tensor(~np.asarray(valid)))
    (ref * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(grad, tx.grad.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first, activation):
    torch.manual_seed(1)
    tlayer = torch.nn.TransformerDecoderLayer(E, H, FF, dropout=0.1, activation=activation, norm_first=norm_first,
                                              batch_first=True).eval()
    template = TransformerDecoderLayer(E, H, FF, activation=activation, norm_first=norm_first, rngs=nnx.Rngs(0))
    layer = decoder_layer_from_torch(template, tlayer.state_dict())
    x, mem, cot = _randn(3, B, T, E), _randn(4, B, S, E), _randn(5, B, T, E)
    tgt_valid = padding_mask(jnp.array([5, 4]), T)
    mem_valid = padding_mask(jnp.array([2, 4]), S)

    def loss(x, mem):
        out = layer(x, mem, mask=tgt_valid[:, None, None, :], memory_mask=mem_valid[:, None, None, :], is_causal=True)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), jnp.asarray(mem))
    tx, tmem = torch.tensor(x, requires_grad=True), torch.tensor(mem, requires_grad=True)
    ref = tlayer(tx, tmem, tgt_mask=torch.tensor(~np.asarray(causal_mask(T))),
                 tgt_key_padding_mask=torch.tensor(~np.asarray(tgt_valid)),
                 memory_key_padding_mask=torch.tensor(~np.asarray(mem_valid)))
    (ref * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(grads[0], tx.grad.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(grads[1], tmem.grad.numpy(), atol=1e-4, rtol=0)


def test_layers_without_bias_match_torch():
    torch.manual_seed(2)
    tlayer = torch.nn.TransformerEncoderLayer(E, H, FF, norm_first=True, bias=False, batch_first=True).eval()
    template = TransformerEncoderLayer(E, H, FF, norm_first=True, use_bias=False, rngs=nnx.Rngs(0))
    assert template.self_attn_norm.bias is None and template.ffn.up.bias is None
    layer = encoder_layer_from_torch(template, tlayer.state_dict())
    x = _randn(6, B, T, E)
    ref = tlayer(torch.tensor(x, requires_grad=True))
    np.testing.assert_allclose(layer(jnp.asarray(x)), ref.detach().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation, torch_act", [
    ("relu", torch.nn.ReLU()), ("gelu", torch.nn.GELU()), ("gelu_tanh", torch.nn.GELU(approximate="tanh")),
])
def test_feedforward_matches_torch(activation, torch_act):
    torch.manual_seed(3)
    up, down = torch.nn.Linear(E, FF), torch.nn.Linear(FF, E)
    ffn = FeedForward(E, FF, activation=activation, rngs=nnx.Rngs(0))
    ffn.up.kernel[...] = jnp.asarray(up.weight.detach().numpy().T)
    ffn.up.bias[...] = jnp.asarray(up.bias.detach().numpy())
    ffn.down.kernel[...] = jnp.asarray(down.weight.detach().numpy().T)
    ffn.down.bias[...] = jnp.asarray(down.bias.detach().numpy())
    x = _randn(7, B, T, E)
    ref = down(torch_act(up(torch.tensor(x)))).detach().numpy()
    np.testing.assert_allclose(ffn(jnp.asarray(x)), ref, atol=1e-5, rtol=0)
    assert ffn.up.kernel.out_sharding == ("embed", "mlp") and ffn.down.kernel.out_sharding == ("mlp", "embed")


def test_encoder_stack_matches_torch_encoder_built_from_converted_layers():
    torch.manual_seed(4)
    tlayer = torch.nn.TransformerEncoderLayer(E, H, FF, norm_first=True, batch_first=True)
    tenc = torch.nn.TransformerEncoder(tlayer, 2, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False).eval()
    with torch.no_grad():
        tenc.norm.weight.uniform_(0.5, 1.5)
    enc = TransformerEncoder(2, lambda r: _encoder_layer(r, norm_first=True), final_norm=True, rngs=nnx.Rngs(0))
    sd = tenc.state_dict()
    converted = [
        encoder_layer_from_torch(
            _layer_template(enc, i), {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        )
        for i in range(2)
    ]
    enc.layers = jax.tree.map(lambda *a: jnp.stack(a), *converted)
    enc.final_norm.scale[...] = jnp.asarray(sd["norm.weight"].numpy())
    enc.final_norm.bias[...] = jnp.asarray(sd["norm.bias"].numpy())
    x = _randn(8, B, T, E)
    valid = padding_mask(jnp.array([5, 2]), T)
    ref = tenc(torch.tensor(x, requires_grad=True), src_key_padding_mask=torch.tensor(~np.asarray(valid)))
    np.testing.assert_allclose(enc(jnp.asarray(x), mask=valid[:, None, None, :]), ref.detach().numpy(), atol=1e-5)


def _layer_template(stack, i):
    return jax.tree.map(lambda a: a[i], stack.layers)


def test_encoder_scan_equals_unroll_with_dropout():
    enc = TransformerEncoder(2, lambda r: _encoder_layer(r, dropout_rate=0.2), final_norm=True, rngs=nnx.Rngs(0))
    unrolled = nnx.clone(enc)
    unrolled.unroll = True
    x = jax.random.normal(jax.random.key(1), (B, T, E))
    mask = padding_mask(jnp.array([5, 3]), T)[:, None, None, :]
    forward = jax.jit(lambda m, key: m(x, mask=mask, dropout_key=key))
    scanned = forward(enc, jax.random.key(2))
    np.testing.assert_allclose(scanned, forward(unrolled, jax.random.key(2)), atol=1e-6)
    assert not np.allclose(scanned, forward(enc, jax.random.key(3)))


def test_stack_trace_and_compile_size_do_not_grow_with_depth():
    x = jnp.ones((B, T, E))
    counts = []
    for depth in (2, 12):
        enc = TransformerEncoder(depth, _encoder_layer, rngs=nnx.Rngs(0))
        forward = jax.jit(lambda m, x: m(x, is_causal=True))
        jaxpr = str(jax.make_jaxpr(forward)(enc, x))
        lowered = forward.lower(enc, x)
        lowered.compile()
        counts.append((jaxpr.count("dot_general"), lowered.as_text().count("stablehlo.dot_general")))
    assert counts[0] == counts[1]
    assert counts[0][0] > 0
    unrolled = TransformerEncoder(12, _encoder_layer, unroll=True, remat="none", rngs=nnx.Rngs(0))
    assert str(jax.make_jaxpr(lambda m, x: m(x))(unrolled, x)).count("dot_general") == 12 * counts[0][0]


def test_vmap_over_init_keys_builds_a_stack_of_models():
    keys = jax.random.split(jax.random.key(0), 2)

    def build(key):
        return TransformerEncoder(2, _encoder_layer, final_norm=True, rngs=nnx.Rngs(key))

    models = jax.vmap(build)(keys)
    assert models.layers.self_attn.q_kernel.shape == (2, 2, E, H, E // H)
    x = jax.random.normal(jax.random.key(1), (B, T, E))
    outs = jax.vmap(lambda m: m(x))(models)
    assert outs.shape == (2, B, T, E)
    np.testing.assert_allclose(outs[1], build(keys[1])(x), atol=1e-5)
    assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize("cross", [False, True], ids=["gpt", "seq2seq"])
def test_decoder_stack_kv_cache_equals_full_forward(cross):
    factory = (lambda r: TransformerDecoderLayer(E, H, FF, norm_first=True, rngs=r)) if cross else _gpt_layer
    dec = TransformerDecoder(2, factory, final_norm=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, T, E))
    mem = jax.random.normal(jax.random.key(2), (B, S, E)) if cross else None
    mem_mask = padding_mask(jnp.array([4, 2]), S)[:, None, None, :] if cross else None
    full = dec(x, mem, memory_mask=mem_mask, is_causal=True)
    cache = dec.init_cache(B, T + 1)
    assert cache.k.shape == (2, B, T + 1, H, E // H) and cache.index.shape == (2,)
    step = jax.jit(lambda m, xt, c: m(xt, mem, memory_mask=mem_mask, cache=c))
    outs = []
    for t in range(T):
        out, cache = step(dec, x[:, t:t + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.index, [T, T])
    unrolled = nnx.clone(dec)
    unrolled.unroll = True
    out_u, cache_u = unrolled(x[:, :3], mem, memory_mask=mem_mask, cache=dec.init_cache(B, T + 1))
    out_s, cache_s = dec(x[:, :3], mem, memory_mask=mem_mask, cache=dec.init_cache(B, T + 1))
    np.testing.assert_allclose(out_u, out_s, atol=1e-6)
    np.testing.assert_allclose(cache_u.k, cache_s.k, atol=1e-6)


def test_decoder_errors():
    layer = TransformerDecoderLayer(E, H, FF, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="memory"):
        layer(jnp.ones((B, T, E)))
    gpt = _gpt_layer(nnx.Rngs(0))
    with pytest.raises(ValueError, match="cross_attention=False"):
        gpt(jnp.ones((B, T, E)), jnp.ones((B, S, E)))
    dec = TransformerDecoder(2, _gpt_layer, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stacked"):
        dec(jnp.ones((B, 1, E)), cache=gpt.init_cache(B, 4))
    with pytest.raises(ValueError, match="overflow"):
        dec(jnp.ones((B, 5, E)), cache=dec.init_cache(B, 4))
    with pytest.raises(ValueError, match="num_layers"):
        TransformerDecoder(0, _gpt_layer, rngs=nnx.Rngs(0))


@functools.cache
def _encode():
    layer = _encoder_layer(nnx.Rngs(5), norm_first=True)
    return jax.jit(lambda x, valid: layer(x, mask=valid[:, None, None, :]))


@settings(max_examples=15, deadline=None)
@given(lengths=st.tuples(st.integers(1, T), st.integers(1, T)), seed=st.integers(0, 2**16))
def test_encoder_layer_padding_never_changes_unpadded_outputs(lengths, seed):
    valid = np.asarray(padding_mask(jnp.array(lengths), T))
    x = _randn(seed, B, T, E)
    noisy = np.where(valid[..., None], x, 50 * _randn(seed + 1, B, T, E))
    out, out_noisy = _encode()(x, valid), _encode()(noisy, valid)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(out_noisy)[valid], atol=1e-5, rtol=0)


@functools.cache
def _gpt_forward():
    gpt = TransformerDecoder(2, _gpt_layer, final_norm=True, rngs=nnx.Rngs(6))
    return jax.jit(lambda x: gpt(x, is_causal=True))


@settings(max_examples=15, deadline=None)
@given(t=st.integers(0, T - 1), seed=st.integers(0, 2**16))
def test_causal_decoder_output_ignores_the_future(t, seed):
    x = _randn(seed, B, T, E)
    changed = x.copy()
    changed[:, t + 1:] = _randn(seed + 1, B, T - t - 1, E)
    forward = _gpt_forward()
    np.testing.assert_allclose(forward(x)[:, : t + 1], forward(changed)[:, : t + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("remat", ["none", "dots", "dots_all", "full"])
def test_remat_policies_give_the_same_values_and_gradients(remat):
    """Recomputing in the backward pass changes what is stored, never the result (dropout keys are explicit)."""
    x = jax.random.normal(jax.random.key(1), (B, T, E))
    reference = TransformerEncoder(2, lambda r: _encoder_layer(r, dropout_rate=0.2), remat="none", rngs=nnx.Rngs(0))
    model = nnx.clone(reference)
    model.remat = remat

    def loss(m):
        return (m(x, is_causal=True, dropout_key=jax.random.key(2)) ** 2).sum()

    want_value, want_grads = jax.jit(jax.value_and_grad(loss))(reference)
    value, grads = jax.jit(jax.value_and_grad(loss))(model)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unknown_remat_policy_is_an_error():
    with pytest.raises(ValueError, match="remat must be one of"):
        TransformerEncoder(2, _encoder_layer, remat="some", rngs=nnx.Rngs(0))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fused attention kernel is for XLA:CPU")
@pytest.mark.parametrize("remat, forward_kernels", [("none", 1), ("dots", 1), ("dots_all", 1), ("full", 2)])
def test_remat_keeps_the_cpu_kernels_residuals(remat, forward_kernels):
    """With the fused CPU attention (GPT blocks: packed qkv, head_dim 8, no dropout), 'dots' and 'dots_all' keep
    its output and log-sum-exp, so the compiled gradient runs the forward kernel once; 'full' runs it again."""
    x = jax.random.normal(jax.random.key(3), (B, T, 16))
    layer = lambda r: TransformerDecoderLayer(16, 2, 32, cross_attention=False, dropout_rate=0.0, fused_qkv=True,
                                              rngs=r)
    reference = TransformerDecoder(2, layer, remat="none", rngs=nnx.Rngs(0))
    model = nnx.clone(reference)
    model.remat = remat
    grad = jax.jit(jax.value_and_grad(lambda m: (m(x, is_causal=True) ** 2).sum()))
    hlo = grad.lower(model).compile().as_text()
    assert hlo.count('custom_call_target="flaxlm_cpu_attention_forward_packed"') == forward_kernels
    assert hlo.count('custom_call_target="flaxlm_cpu_attention_backward_packed"') == 1
    (value, grads), (want_value, want_grads) = grad(model), grad(reference)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
