"""torch -> flaxlm attention/Transformer converters: layouts, copies, and errors that name the key and shapes.

Numerical parity of the converted modules is checked in tests/nn/test_attention.py and tests/nn/test_transformer.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.interop.torch_transformer import decoder_layer_from_torch, encoder_layer_from_torch, mha_from_torch
from flaxlm.nn.attention import MultiHeadAttention
from flaxlm.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")

E, H = 8, 2


def _mha(**kwargs):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(E, H, batch_first=True, **kwargs)


def _torch_out(tmod, x, mem):
    return tmod(torch.tensor(x), torch.tensor(mem), torch.tensor(mem), need_weights=False)[0].detach().numpy()


def test_returns_new_module_and_leaves_template_untouched():
    template = MultiHeadAttention(H, E, fused_qkv=True, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, template)
    sd = _mha().state_dict()
    new = mha_from_torch(template, sd)
    assert new is not template
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, template), before)
    np.testing.assert_allclose(new.qkv_kernel[...].reshape(E, 3 * E), sd["in_proj_weight"].numpy().T)
    np.testing.assert_allclose(new.out_kernel[...].reshape(E, E), sd["out_proj.weight"].numpy().T)


def test_separate_torch_weights_load_into_a_fused_template():
    tmod = _mha()
    sd = tmod.state_dict()
    w = sd.pop("in_proj_weight")
    sd.update(q_proj_weight=w[:E], k_proj_weight=w[E:2 * E], v_proj_weight=w[2 * E:])
    fused = mha_from_torch(MultiHeadAttention(H, E, fused_qkv=True, rngs=nnx.Rngs(0)), sd)
    x, mem = np.random.default_rng(0).standard_normal((2, 2, 3, E), dtype=np.float32)
    np.testing.assert_allclose(fused(jnp.asarray(x), jnp.asarray(mem)), _torch_out(tmod, x, mem), atol=1e-5)


def test_kdim_vdim_torch_layout_loads_into_separate_projections():
    tmod = _mha(kdim=5, vdim=5, bias=False)
    assert "q_proj_weight" in tmod.state_dict()
    mod = mha_from_torch(MultiHeadAttention(H, E, kv_features=5, use_bias=False, rngs=nnx.Rngs(0)), tmod.state_dict())
    rng = np.random.default_rng(1)
    x, mem = rng.standard_normal((2, 3, E), dtype=np.float32), rng.standard_normal((2, 4, 5), dtype=np.float32)
    np.testing.assert_allclose(mod(jnp.asarray(x), jnp.asarray(mem)), _torch_out(tmod, x, mem), atol=1e-5)


def test_unknown_key_is_named():
    sd = _mha(add_bias_kv=True).state_dict()
    with pytest.raises(ValueError, match="unknown key 'bias_k'"):
        mha_from_torch(MultiHeadAttention(H, E, rngs=nnx.Rngs(0)), sd)


def test_missing_key_is_named():
    sd = _mha(bias=False).state_dict()
    with pytest.raises(ValueError, match="missing key 'in_proj_bias'"):
        mha_from_torch(MultiHeadAttention(H, E, rngs=nnx.Rngs(0)), sd)


def test_shape_mismatch_names_key_and_both_shapes():
    sd = _mha().state_dict()
    template = MultiHeadAttention(H, E, qkv_features=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'in_proj_weight'.*\(24, 8\).*\(12, 8\)"):
        mha_from_torch(template, sd)
    with pytest.raises(ValueError, match="kv_features=5"):
        mha_from_torch(MultiHeadAttention(H, E, kv_features=5, rngs=nnx.Rngs(0)), sd)


def test_layer_converters_map_every_torch_key():
    tenc = torch.nn.TransformerEncoderLayer(E, H, 16, batch_first=True)
    enc = encoder_layer_from_torch(TransformerEncoderLayer(E, H, 16, rngs=nnx.Rngs(0)), tenc.state_dict())
    np.testing.assert_array_equal(enc.ffn.up.kernel[...], tenc.linear1.weight.detach().numpy().T)
    np.testing.assert_array_equal(enc.ffn_norm.bias[...], tenc.norm2.bias.detach().numpy())
    tdec = torch.nn.TransformerDecoderLayer(E, H, 16, batch_first=True)
    dec = decoder_layer_from_torch(TransformerDecoderLayer(E, H, 16, rngs=nnx.Rngs(0)), tdec.state_dict())
    np.testing.assert_array_equal(dec.cross_attn_norm.scale[...], tdec.norm2.weight.detach().numpy())
    np.testing.assert_array_equal(dec.cross_attn.out_kernel[...].reshape(E, E),
                                  tdec.multihead_attn.out_proj.weight.detach().numpy().T)
    with pytest.raises(ValueError, match="unknown key 'multihead_attn"):
        encoder_layer_from_torch(TransformerEncoderLayer(E, H, 16, rngs=nnx.Rngs(0)), tdec.state_dict())
    with pytest.raises(ValueError, match=r"'linear1.weight'.*\(16, 8\).*\(32, 8\)"):
        encoder_layer_from_torch(TransformerEncoderLayer(E, H, 32, rngs=nnx.Rngs(0)), tenc.state_dict())
    with pytest.raises(ValueError, match="cross_attention=False"):
        decoder_layer_from_torch(TransformerDecoderLayer(E, H, 16, cross_attention=False, rngs=nnx.Rngs(0)),
                                 tdec.state_dict())
    with pytest.raises(ValueError, match="TransformerEncoderLayer template"):
        encoder_layer_from_torch(MultiHeadAttention(H, E, rngs=nnx.Rngs(0)), tenc.state_dict())
