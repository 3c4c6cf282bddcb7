"""decode.sample: KV-cached greedy decoding equals re-running the full model on the growing prefix; top-k/top-p
filtering keeps exactly the intended tokens; impossible sampling options name the option.

greedy_decode / beam_search on Seq2Seq and Transformer: beam 1 is greedy, cached decoding equals re-running the
full model, beam search on a trained model scores at least as well as greedy and its scores are the model's,
EOS ends a hypothesis, rows decode independently of their batch and padding, a wide beam is exhaustive search.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlm.beam_search import run_beam_search
from flaxlm.decode import _filter_logits, beam_search, greedy_decode, sample, validate_sampling
from flaxlm.models.gpt import GPT, GPTConfig
from flaxlm.models.seq2seq import Seq2Seq, Seq2SeqConfig
from flaxlm.models.transformer import Transformer, TransformerConfig

VOCAB, BLOCK, NEW = 23, 16, 9


@pytest.fixture(scope="module")
def model():
    """A tiny GPT whose weights are scaled up so next-token logits are well separated (no argmax near-ties)."""
    cfg = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    return jax.jit(lambda: jax.tree.map(lambda x: x * 3.0, GPT(cfg, rngs=nnx.Rngs(0))),
                   compiler_options={"xla_backend_optimization_level": 0})()


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


# Translation: a copy task. Tokens 3..10, PAD 0 after each source; targets are the source then EOS.
T_VOCAB, PAD, BOS, EOS, SRC_LEN = 11, 0, 1, 2, 6
MAX = SRC_LEN + 2  # room for the longest target (SRC_LEN tokens + EOS) and one step more
KINDS = ("seq2seq-none", "seq2seq-bahdanau", "seq2seq-luong", "transformer")
TRAINED = ("seq2seq-luong", "transformer")


def copy_batch(key, n: int):
    """-> src [n, SRC_LEN] (lengths 1..SRC_LEN, PAD after), lengths [n], tgt_in [n, SRC_LEN + 1] (BOS + tgt[:-1]),
    tgt [n, SRC_LEN + 1] (the source, EOS, PAD)."""
    length_key, token_key = jax.random.split(key)
    lengths = jax.random.randint(length_key, (n,), 1, SRC_LEN + 1)
    tokens = jax.random.randint(token_key, (n, SRC_LEN), 3, T_VOCAB)
    src = jnp.where(jnp.arange(SRC_LEN) < lengths[:, None], tokens, PAD)
    position = jnp.arange(SRC_LEN + 1)
    tgt = jnp.where(position == lengths[:, None], EOS, jnp.pad(src, ((0, 0), (0, 1))))
    tgt_in = jnp.concatenate([jnp.full((n, 1), BOS), tgt[:, :-1]], axis=1)
    return src.astype(jnp.int32), lengths.astype(jnp.int32), tgt_in.astype(jnp.int32), tgt.astype(jnp.int32)


# Compiling without LLVM optimisations makes model construction (its truncated-normal inits) and the training
# scan several times cheaper to compile; they run once, so their speed does not matter.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def train(model, steps: int = 150):
    """Adam on the copy task (lr 1e-2, batches of 32), the steps as one lax.scan; call it under jax.jit."""
    tx = optax.adam(1e-2)

    def loss(model, src, lengths, tgt_in, tgt):
        log_probs = jax.nn.log_softmax(model(src, lengths, tgt_in), axis=-1)
        nll = -jnp.take_along_axis(log_probs, tgt[..., None], axis=-1)[..., 0]
        real = jnp.arange(tgt.shape[1]) <= lengths[:, None]
        return jnp.sum(nll * real) / jnp.sum(real)

    def step(carry, key):
        model, opt_state = carry
        grads = jax.grad(loss)(model, *copy_batch(key, 32))
        updates, opt_state = tx.update(grads, opt_state, model)
        return (optax.apply_updates(model, updates), opt_state), None

    keys = jax.random.split(jax.random.key(0), steps)
    return jax.lax.scan(step, (model, tx.init(model)), keys)[0][0]


@functools.cache
def build(kind: str):
    """The tiny translation model of each kind: luong and the Transformer (2 decoder layers) trained on the copy task,
    the others random with weights scaled up (well separated logits, so argmax comparisons are not near-ties)."""
    if kind == "transformer":
        cfg = TransformerConfig(T_VOCAB, T_VOCAB, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=2,
                                mlp_dim=32, dropout=0.0, max_length=16)
        return jax.jit(lambda: train(Transformer(cfg, rngs=nnx.Rngs(0))), compiler_options=FAST_COMPILE)()
    attention = kind.removeprefix("seq2seq-")
    cfg = Seq2SeqConfig(T_VOCAB, T_VOCAB, src_embed_dim=8, tgt_embed_dim=8, hidden_size=16,
                        num_layers=1, attention=attention)
    if kind in TRAINED:
        return jax.jit(lambda: train(Seq2Seq(cfg, rngs=nnx.Rngs(0))), compiler_options=FAST_COMPILE)()
    return jax.jit(lambda: jax.tree.map(lambda x: x * 3.0, Seq2Seq(cfg, rngs=nnx.Rngs(0))),
                   compiler_options=FAST_COMPILE)()


SOURCES = copy_batch(jax.random.key(9), 16)[:2]


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def full_log_probs(model, src, lengths, tgt_in):
    """log_softmax of one teacher-forced call of the full model: [B, T, V]."""
    return jax.nn.log_softmax(model(src, lengths, tgt_in), axis=-1)


def rescore(model, src, lengths, tokens):
    """The model's summed log-probability of tokens [B, T] (no BOS) up to and including the first EOS."""
    tgt_in = np.concatenate([np.full((len(tokens), 1), BOS, np.int32), tokens[:, :-1]], axis=1)
    gathered = np.take_along_axis(np.asarray(full_log_probs(model, src, lengths, tgt_in)), tokens[..., None], -1)
    before_eos = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) == 0
    return np.sum(gathered[..., 0] * before_eos, axis=1)


def decode(model, search, **options):
    tokens, scores = search(model, *SOURCES, bos_id=BOS, eos_id=EOS, max_length=MAX, **options)
    return np.asarray(tokens), np.asarray(scores)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_size_1_is_greedy(kind):
    model = build(kind)
    tokens, scores = decode(model, greedy_decode)
    beam_tokens, beam_scores = decode(model, beam_search, beam_size=1)
    np.testing.assert_array_equal(beam_tokens, tokens)
    np.testing.assert_array_equal(beam_scores, scores)


def rerun_translation_greedy(model, src, lengths):
    """Greedy decoding the slow way: the whole prefix through the full model at every step (EOS-padded to MAX:
    position t depends on the prefix only). -> tokens [B, MAX], scores [B], the smallest top-2 log-prob gap."""
    batch = len(src)
    tokens = np.full((batch, MAX), EOS, np.int32)
    scores = np.zeros(batch, np.float32)
    ended = np.zeros(batch, bool)
    gap = np.inf
    for t in range(MAX):
        tgt_in = np.concatenate([np.full((batch, 1), BOS, np.int32), tokens[:, :-1]], axis=1)
        log_probs = np.asarray(full_log_probs(model, src, lengths, tgt_in))[:, t]
        top2 = np.sort(log_probs, axis=-1)[:, -2:]
        gap = min(gap, np.min(np.where(ended, np.inf, top2[:, 1] - top2[:, 0])))
        token = np.where(ended, EOS, np.argmax(log_probs, axis=-1))
        scores += np.where(ended, 0.0, log_probs[np.arange(batch), token])
        ended |= token == EOS
        tokens[:, t] = token
    return tokens, scores, gap


@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_equals_full_rerun(kind):
    model = build(kind)
    want_tokens, want_scores, gap = rerun_translation_greedy(model, *SOURCES)
    assert gap > 1e-4, "argmax near-tie (the two paths differ by ~1e-6): the comparison would be fragile"
    tokens, scores = decode(model, greedy_decode)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", TRAINED)
def test_beam_search_on_trained_model_scores_at_least_greedy(kind):
    model = build(kind)
    greedy_tokens, greedy_scores = decode(model, greedy_decode)
    assert np.all(np.any(greedy_tokens == EOS, axis=1)), "training failed: a greedy hypothesis never ended"
    tokens, scores = decode(model, beam_search, beam_size=4, length_penalty=0.0)
    assert np.all(scores >= greedy_scores - 1e-5)
    src, lengths = SOURCES
    np.testing.assert_allclose(rescore(model, src, lengths, tokens), scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(rescore(model, src, lengths, greedy_tokens), greedy_scores, atol=1e-4, rtol=0)

    # Sources of tokens never seen in training (PAD/BOS/EOS): the model is unsure, hypotheses keep changing
    # places in the beam, and the scores are still the model's only if each one's state moved with it.
    unseen = np.asarray(jax.random.randint(jax.random.key(3), src.shape, 0, 3), np.int32)
    full = np.full_like(lengths, SRC_LEN)
    tokens, scores = beam_search(model, unseen, full, bos_id=BOS, eos_id=EOS, max_length=MAX, beam_size=4,
                                 length_penalty=0.0)
    np.testing.assert_allclose(rescore(model, unseen, full, np.asarray(tokens)), scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", TRAINED)
def test_eos_ends_hypotheses_and_rows_decode_independently(kind):
    model = build(kind)
    tokens, scores = decode(model, beam_search, beam_size=4, length_penalty=0.0)
    for hypotheses in (tokens, decode(model, greedy_decode)[0]):
        after_eos = np.cumsum(hypotheses == EOS, axis=1) > 0
        assert np.all(hypotheses[after_eos] == EOS)
        assert np.all(after_eos[:, -1])
    # Every row's result is unchanged with other batch-mates (the rows reversed; a batch of copies of one row:
    # that row alone) and a real token (7) as padding, so neither other sources nor padding reach it.
    src, lengths = (np.asarray(x) for x in SOURCES)
    assert len(set(lengths.tolist())) > 3
    src = np.where(np.arange(SRC_LEN) < lengths[:, None], src, 7)
    order = np.argsort(lengths)
    for rows in (order[::-1], np.full_like(order, order[0]), np.full_like(order, order[-1])):
        other_tokens, other_scores = beam_search(model, src[rows], lengths[rows], bos_id=BOS, eos_id=EOS,
                                                 max_length=MAX, beam_size=4, length_penalty=0.0)
        np.testing.assert_array_equal(other_tokens, tokens[rows])
        np.testing.assert_allclose(other_scores, scores[rows], atol=1e-5, rtol=0)


class MarkovDecoder:
    """A decoder whose next-token logits depend on the previous token only: table [V, V]; no state."""

    def __init__(self, table):
        self.table = table

    def step(self, state, tokens):
        return self.table[tokens], state

    def reorder(self, state, rows):
        return state


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_is_exhaustive_search(length_penalty):
    """With a beam as wide as all candidates the result is the best of every sequence ending in EOS by
    score / lp, found here by enumeration; greedy (beam 1) misses it for some tables."""
    vocab, eos, length = 4, 3, 4

    def search(table, width):
        return run_beam_search(MarkovDecoder(table), None, batch=1, bos_id=0, eos_id=eos, max_length=length,
                               beam_size=width, length_penalty=length_penalty)

    search = jax.jit(search, static_argnums=1)
    lengths_won, greedy_missed = set(), 0
    for seed in range(4):
        table = 2.0 * np.random.default_rng(seed).normal(size=(vocab, vocab)).astype(np.float32)
        log_probs = table - np.log(np.sum(np.exp(table), axis=-1, keepdims=True))
        best_rank, best = -np.inf, None
        for n in range(length):
            for prefix in np.ndindex(*(vocab - 1,) * n):
                path = (0,) + prefix + (eos,)
                score = sum(log_probs[a, b] for a, b in zip(path[:-1], path[1:]))
                rank = score / ((5.0 + n + 1) / 6.0) ** length_penalty
                if rank > best_rank:
                    best_rank, best = rank, (list(prefix) + [eos] * (length - n), score)
        tokens, scores = search(table, (vocab - 1) ** (length - 1) * vocab)
        np.testing.assert_array_equal(tokens[0], best[0])
        np.testing.assert_allclose(scores[0], best[1], atol=1e-5)
        lengths_won.add(best[0].index(eos))
        greedy_missed += not np.array_equal(search(table, 1)[0][0], best[0])
    assert len(lengths_won) > 1 and greedy_missed > 0


@pytest.mark.parametrize("search, kwargs, name", [
    (beam_search, dict(beam_size=0), "beam_size"),
    (beam_search, dict(length_penalty=-0.5), "length_penalty"),
    (beam_search, dict(max_length=0), "max_length"),
    (greedy_decode, dict(max_length=0), "max_length"),
    (greedy_decode, dict(bos_id=T_VOCAB), "bos_id"),
    (beam_search, dict(eos_id=-1), "eos_id"),
    (greedy_decode, dict(src=np.zeros((2, 3, 1), np.int32)), "src"),
    (beam_search, dict(src_lengths=np.ones((3,), np.int32)), "src_lengths"),
])
def test_bad_decode_arguments_name_the_argument(search, kwargs, name):
    args = dict(src=np.ones((2, 3), np.int32), src_lengths=np.ones((2,), np.int32), bos_id=BOS, eos_id=EOS,
                max_length=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        search(build("seq2seq-none"), **args)


def test_decode_rejects_other_models_and_lengths_beyond_the_transformer(model):
    src, lengths = np.ones((1, 3), np.int32), np.ones((1,), np.int32)
    with pytest.raises(ValueError, match="max_length"):
        greedy_decode(build("transformer"), src, lengths, bos_id=BOS, eos_id=EOS, max_length=17)
    with pytest.raises(TypeError, match="model"):
        beam_search(model, src, lengths, bos_id=BOS, eos_id=EOS, max_length=4)
