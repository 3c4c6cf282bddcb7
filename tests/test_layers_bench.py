"""benchmarks/layers.py: the attention row times the same computation in both frameworks (no timings asserted)."""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import layers  # noqa: E402


def test_attention_row_computes_the_same_gradient_in_both_frameworks():
    qkv = np.random.default_rng(0).standard_normal((3, 2, 40, 3, 8)).astype(np.float32)
    flax_grad = np.asarray(layers._jax_attention(jnp.asarray(qkv))())
    torch_grad = layers._torch_attention(torch.from_numpy(qkv))().numpy()
    assert flax_grad.shape == qkv.shape
    np.testing.assert_allclose(flax_grad, torch_grad, rtol=1e-4, atol=1e-5)
