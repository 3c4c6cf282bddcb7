"""load_nanogpt: a checkpoint written from a PyTorch nanoGPT-architecture model gives the same logits and gradients."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.interop.nanogpt import gpt_from_nanogpt_state_dict, load_nanogpt

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")


def _import_reference():
    """tests/interop/nanogpt_reference.py by path (pytest runs with --import-mode=importlib)."""
    path = pathlib.Path(__file__).with_name("nanogpt_reference.py")
    spec = importlib.util.spec_from_file_location("nanogpt_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_reference = _import_reference()
ReferenceArgs, ReferenceGPT = _reference.ReferenceArgs, _reference.ReferenceGPT


def reference_model(bias: bool, seed: int = 0) -> ReferenceGPT:
    """A tiny reference GPT with O(1) random weights (nanoGPT's 0.02 init would make every logit tiny)."""
    torch.manual_seed(seed)
    ref = ReferenceGPT(ReferenceArgs(block_size=12, vocab_size=29, n_layer=2, n_head=2, n_embd=16, bias=bias))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            norm_scale = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if norm_scale else 0.0))
    return ref.eval()


def save_checkpoint(ref: ReferenceGPT, path, prefix: str = "") -> None:
    args = ref.args
    model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      bias=args.bias, vocab_size=args.vocab_size, dropout=args.dropout)
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    torch.save({"model": state, "model_args": model_args, "iter_num": 7}, path)


def tokens(batch: int = 3, length: int = 12, vocab: int = 29) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("bias", [True, False])
def test_logits_and_gradients_match_torch(tmp_path, bias):
    ref = reference_model(bias)
    save_checkpoint(ref, tmp_path / "ckpt.pt")
    model, cfg = load_nanogpt(tmp_path / "ckpt.pt")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias, cfg.tie_embeddings) == (2, 2, 16, bias, True)

    idx = tokens()
    weights = np.random.default_rng(1).normal(size=(3, 12, 29)).astype(np.float32)
    ref_logits = ref(torch.from_numpy(idx).long())
    (ref_logits * torch.from_numpy(weights)).sum().backward()

    logits = jax.jit(lambda m, t: m(t))(model, idx)
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), atol=1e-5, rtol=0)

    grads = jax.grad(lambda m: jnp.sum(m(idx) * weights))(model)
    torch_grads = {name: p.grad.numpy() for name, p in ref.named_parameters()}
    layers = grads.blocks.layers
    c = cfg.n_embd
    pairs = {
        "transformer.wte.weight": grads.wte.embedding[...],
        "transformer.wpe.weight": grads.wpe.embedding[...],
        "transformer.h.0.attn.c_attn.weight": layers.self_attn.qkv_kernel[...][0].reshape(c, 3 * c).T,
        "transformer.h.1.attn.c_proj.weight": layers.self_attn.out_kernel[...][1].reshape(c, c).T,
        "transformer.h.0.mlp.c_fc.weight": layers.ffn.up.kernel[...][0].T,
        "transformer.h.1.ln_2.weight": layers.ffn_norm.scale[...][1],
        "transformer.ln_f.weight": grads.blocks.final_norm.scale[...],
    }
    if bias:
        pairs["transformer.h.1.mlp.c_proj.bias"] = layers.ffn.down.bias[...][1]
    for name, grad in pairs.items():
        np.testing.assert_allclose(grad, torch_grads[name], atol=1e-4, rtol=0, err_msg=name)


def test_compiled_prefix_and_untied_head(tmp_path):
    ref = reference_model(bias=True, seed=1)
    with torch.no_grad():
        ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.transformer.wte.weight))
    save_checkpoint(ref, tmp_path / "ckpt.pt", prefix="_orig_mod.")
    model, cfg = load_nanogpt(str(tmp_path / "ckpt.pt"))
    assert not cfg.tie_embeddings
    idx = tokens()
    with torch.no_grad():
        expected = ref(torch.from_numpy(idx).long()).numpy()
    np.testing.assert_allclose(model(idx), expected, atol=1e-5, rtol=0)


def test_causal_mask_buffers_are_skipped():
    ref = reference_model(bias=False)
    state = dict(ref.state_dict())
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(12, 12)).view(1, 1, 12, 12)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, bias=False, vocab_size=29)
    model, _ = gpt_from_nanogpt_state_dict(state, args)
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens()).long()).numpy()
    np.testing.assert_allclose(model(tokens()), expected, atol=1e-5, rtol=0)


ARGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, bias=True, vocab_size=29, dropout=0.0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(48, 15)}),
         r"'transformer.h.0.attn.c_attn.weight' has shape \(48, 15\), expected \(48, 16\)"),
        (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"),
         "missing nanoGPT state_dict key 'transformer.h.1.mlp.c_fc.bias'"),
        (lambda s: s.update({"transformer.h.2.ln_1.weight": torch.ones(16)}),
         "unknown nanoGPT state_dict key 'transformer.h.2.ln_1.weight'"),
    ],
)
def test_bad_state_dict_names_the_key(edit, message):
    state = dict(reference_model(bias=True).state_dict())
    edit(state)
    with pytest.raises(ValueError, match=message):
        gpt_from_nanogpt_state_dict(state, ARGS)


def test_missing_model_args_and_file(tmp_path):
    state = reference_model(bias=True).state_dict()
    with pytest.raises(ValueError, match="model_args is missing \\['n_head'\\]"):
        gpt_from_nanogpt_state_dict(state, {k: v for k, v in ARGS.items() if k != "n_head"})
    with pytest.raises(FileNotFoundError, match="nowhere/ckpt.pt"):
        load_nanogpt(tmp_path / "nowhere" / "ckpt.pt")
    torch.save({"model": state}, tmp_path / "no_args.pt")
    with pytest.raises(ValueError, match="no 'model_args' entry"):
        load_nanogpt(tmp_path / "no_args.pt")


def test_loaded_model_is_a_pytree_of_arrays(tmp_path):
    save_checkpoint(reference_model(bias=False), tmp_path / "ckpt.pt")
    model, _ = load_nanogpt(tmp_path / "ckpt.pt")
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32 for leaf in leaves)


def test_loaded_params_do_not_share_memory_with_the_torch_tensors():
    """Changing the PyTorch weights in place after conversion must not change the flaxlm model (a copy, not a view)."""
    ref = reference_model(bias=True)
    args = ref.args
    model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      bias=True, vocab_size=args.vocab_size, dropout=0.0)
    state_dict = ref.state_dict()
    model, _ = gpt_from_nanogpt_state_dict(state_dict, model_args)
    before = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model))]
    with torch.no_grad():
        for value in state_dict.values():
            value.add_(1.0)
    after = jax.tree.leaves(nnx.state(model))
    assert all(np.array_equal(b, np.asarray(a)) for b, a in zip(before, after))
