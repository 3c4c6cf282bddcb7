"""Autoregressive sampling from a GPT with its KV cache: prefill the prompt in one pass, then one token per step.

The loop is a `jax.lax.scan` of fixed length inside one `jax.jit`, so generation compiles once per
(batch, prompt length, max_new_tokens) and never re-runs the model over the whole prefix.
"""

import functools

import jax
import jax.numpy as jnp


def _filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """logits [B, V] -> scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def sample(model, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """prompt [B, P] int32 -> generated tokens [B, max_new_tokens] int32.

    `temperature` 0 means greedy (argmax). `top_k` keeps the k most likely tokens, `top_p` the smallest set
    whose probability reaches p. P + max_new_tokens must not exceed the model's block_size.
    """
    batch, length = prompt.shape
    cache = model.init_cache(batch, length + max_new_tokens)
    logits, cache = model(prompt, cache=cache)

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = _filter_logits(logits, temperature, top_k, top_p)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    def step(carry, key):
        logits, cache = carry
        token = pick(logits, key)
        logits, cache = model(token[:, None], cache=cache)
        return (logits[:, -1], cache), token

    keys = jax.random.split(key, max_new_tokens)
    _, tokens = jax.lax.scan(step, (logits[:, -1], cache), keys)
    return tokens.T


def validate_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                      prompt_length: int, block_size: int) -> None:
    """Raise ValueError naming the option when a sampling setting is impossible."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if prompt_length + max_new_tokens > block_size:
        raise ValueError(f"prompt length {prompt_length} + --max-new-tokens {max_new_tokens} exceeds the model's "
                         f"block_size {block_size}")
