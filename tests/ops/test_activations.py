"""flaxlm.ops.activations.gelu: values and gradients against torch's exact GELU and jax.nn.gelu."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flaxlm.ops.activations import gelu


def test_gelu_matches_torch_values_and_gradients():
    x = np.concatenate([np.linspace(-12.0, 12.0, 2001), np.random.default_rng(0).normal(size=1000) * 3])
    x = x.astype(np.float32)
    weights = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    x_t = torch.tensor(x, requires_grad=True)
    (torch.nn.functional.gelu(x_t) * torch.tensor(weights)).sum().backward()
    value, grad = jax.value_and_grad(lambda v: jnp.sum(gelu(v) * weights))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), torch.nn.functional.gelu(torch.tensor(x)).numpy(),
                               atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), x_t.grad.numpy(), atol=2e-6, rtol=1e-5)


def exact_gelu(v):
    return jax.nn.gelu(v, approximate=False)


def test_gelu_equals_jax_exact_gelu_with_second_derivative():
    x = jnp.linspace(-6.0, 6.0, 241)
    reference = exact_gelu
    np.testing.assert_allclose(gelu(x), reference(x), atol=1e-6)
    second = jax.vmap(jax.grad(jax.grad(gelu)))(x)
    np.testing.assert_allclose(second, jax.vmap(jax.grad(jax.grad(reference)))(x), atol=1e-5)
