"""decode.sample: KV-cached greedy decoding equals re-running the full model on the growing prefix; top-k/top-p
filtering keeps exactly the intended tokens; impossible sampling options name the option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.decode import _filter_logits, sample, validate_sampling
from flaxlm.models.gpt import GPT, GPTConfig

VOCAB, BLOCK, NEW = 23, 16, 9


@pytest.fixture(scope="module")
def model():
    """A tiny GPT whose weights are scaled up so next-token logits are well separated (no argmax near-ties)."""
    gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32), rngs=nnx.Rngs(0))
    return jax.tree.map(lambda x: x * 3.0, gpt)


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(1), (2, 5), 0, VOCAB, jnp.int32)


@jax.jit
def last_logits(model, tokens, t):
    """Logits [B, V] at position t of a full (uncached) forward pass over tokens [B, T]."""
    return model(tokens)[:, t]


def full_rerun_greedy(model, prompt, steps):
    """Greedy decoding the slow way: the whole prefix through the model for every new token.

    The prefix is zero-padded to a fixed length (one compilation): causal attention makes position t
    independent of the padding after it."""
    batch, length = prompt.shape
    tokens = jnp.zeros((batch, length + steps), jnp.int32).at[:, :length].set(prompt)
    logits = []
    for t in range(length - 1, length - 1 + steps):
        logits.append(last_logits(model, tokens, t))
        tokens = tokens.at[:, t + 1].set(jnp.argmax(logits[-1], -1).astype(jnp.int32))
    return np.asarray(tokens[:, length:]), np.stack(logits, axis=1)


def test_greedy_with_kv_cache_equals_full_rerun(model, prompt):
    want_tokens, want_logits = full_rerun_greedy(model, prompt, NEW)
    top2 = np.sort(want_logits, axis=-1)[..., -2:]
    assert np.min(top2[..., 1] - top2[..., 0]) > 1e-3, "argmax near-tie: the comparison would be fragile"

    got = sample(model, prompt, jax.random.key(0), max_new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(got), want_tokens)

    # The same cache path by hand, keeping the logits: prefill in one call, then one token per call.
    cached_call = jax.jit(lambda model, tokens, cache: model(tokens, cache=cache))
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + NEW)
    logits, cache = cached_call(model, prompt, cache)
    cached = [logits[:, -1]]
    for t in range(NEW - 1):
        logits, cache = cached_call(model, jnp.asarray(want_tokens[:, t:t + 1]), cache)
        cached.append(logits[:, -1])
    np.testing.assert_allclose(np.stack(cached, axis=1), want_logits, atol=1e-5, rtol=0)


def test_top_k_1_equals_greedy(model, prompt):
    greedy = sample(model, prompt, jax.random.key(0), max_new_tokens=NEW, temperature=0.0)
    for seed in (1, 2):
        top1 = sample(model, prompt, jax.random.key(seed), max_new_tokens=NEW, temperature=1.0, top_k=1)
        np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_sampling_is_reproducible_and_seeded(model, prompt):
    def draw(seed):
        return np.asarray(sample(model, prompt, jax.random.key(seed), max_new_tokens=NEW, temperature=2.0))

    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))


def test_filter_logits_top_p_keeps_the_nucleus():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))

    def kept(**options):
        out = _filter_logits(logits, 1.0, options.get("top_k"), options.get("top_p"))
        return set(np.flatnonzero(np.isfinite(np.asarray(out[0]))))

    assert kept(top_p=0.5) == {1}  # the top token alone reaches p
    assert kept(top_p=0.51) == {1, 3}  # 0.5 < p: the next most likely token joins
    assert kept(top_p=0.79) == {1, 3}
    assert kept(top_p=0.81) == {1, 3, 2}
    assert kept(top_p=1.0) == {0, 1, 2, 3}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3, top_p=0.6) == {1, 3}
    # top-p applies to the temperature-scaled distribution: at T=0.5 the probabilities become
    # [0.007, 0.685, 0.062, 0.247], so p=0.9 keeps tokens 1 and 3 only.
    out = _filter_logits(logits, 0.5, None, 0.9)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out[0])), [False, True, False, True])
    np.testing.assert_allclose(np.asarray(out[0])[[1, 3]], np.asarray(logits[0])[[1, 3]] / 0.5, rtol=1e-6)


def test_filter_logits_top_p_is_per_row():
    logits = jnp.asarray([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    out = np.asarray(_filter_logits(logits, 1.0, None, 0.5))
    np.testing.assert_array_equal(np.isfinite(out), [[True, False, False], [False, False, True]])


@pytest.mark.parametrize("kwargs, option", [
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(temperature=-0.1), "--temperature"),
    (dict(top_k=0), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(max_new_tokens=12, prompt_length=5), "block_size"),
])
def test_validate_sampling_names_the_option(kwargs, option):
    args = dict(max_new_tokens=4, temperature=1.0, top_k=None, top_p=None, prompt_length=5, block_size=BLOCK)
    with pytest.raises(ValueError, match=option):
        validate_sampling(**{**args, **kwargs})
    validate_sampling(**args)
