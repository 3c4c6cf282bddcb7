"""Autoregressive decoding, one token per step with the model's cache or recurrent state.

`sample` draws from a GPT (prefill the prompt in one pass, then one token per step). `greedy_decode` and
`beam_search` translate with a Seq2Seq (carrying its LSTM state) or a Transformer (with its KV cache): each
source's output starts after BOS and ends at its first EOS, every later position holding eos_id.

Every loop is a `jax.lax.scan` of fixed length inside one `jax.jit`, so decoding compiles once per shape and
setting and never re-runs the model over the whole prefix.
"""

import functools

import jax
import jax.numpy as jnp

from flaxlm.beam_search import run_beam_search
from flaxlm.models.seq2seq import Seq2Seq, Seq2SeqState
from flaxlm.models.transformer import Transformer


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


class _Seq2SeqDecoder:
    """Seq2Seq one token at a time: the state is a Seq2SeqState; beams reorder its LSTM carry [L, N, H]."""

    def __init__(self, model: Seq2Seq):
        self.model = model

    def start(self, src, src_lengths, copies: int, max_length: int) -> Seq2SeqState:
        """-> the state of B * copies rows, row b * copies + c decoding source b."""
        state = self.model.encode(src, src_lengths)
        return Seq2SeqState(
            carry=jax.tree.map(lambda x: jnp.repeat(x, copies, axis=1), state.carry),
            memory=jnp.repeat(state.memory, copies, axis=0),
            keys=jnp.repeat(state.keys, copies, axis=0),
            memory_mask=jnp.repeat(state.memory_mask, copies, axis=0),
        )

    def step(self, state: Seq2SeqState, tokens):
        return self.model.decode_step(state, tokens)

    def reorder(self, state: Seq2SeqState, rows):
        return state._replace(carry=jax.tree.map(lambda x: x[:, rows], state.carry))


class _TransformerDecoder:
    """Transformer one token at a time: the state is (KV cache k, v [L, N, max_length, K, D], memory [N, S, F],
    source lengths [N]); beams reorder the cache."""

    def __init__(self, model: Transformer):
        self.model = model

    def start(self, src, src_lengths, copies: int, max_length: int):
        """-> the state of B * copies rows, row b * copies + c decoding source b."""
        memory = jnp.repeat(self.model.encode(src, src_lengths), copies, axis=0)
        cache = self.model.init_cache(memory.shape[0], max_length)
        return cache, memory, jnp.repeat(src_lengths, copies)

    def step(self, state, tokens):
        cache, memory, lengths = state
        logits, cache = self.model.decode(tokens[:, None], memory, lengths, cache=cache)
        return logits[:, 0], (cache, memory, lengths)

    def reorder(self, state, rows):
        cache, memory, lengths = state
        return cache._replace(k=cache.k[:, rows], v=cache.v[:, rows]), memory, lengths


def _translation_decoder(model, src, src_lengths, *, bos_id: int, eos_id: int, max_length: int):
    """Check the arguments shared by greedy_decode and beam_search (ValueError naming the argument) and return
    the model's one-token decoder."""
    if not isinstance(model, (Seq2Seq, Transformer)):
        raise TypeError(f"model must be a Seq2Seq or a Transformer, got {type(model).__name__}")
    if src.ndim != 2:
        raise ValueError(f"src must have shape [B, S], got {src.shape}")
    if src_lengths.shape != src.shape[:1]:
        raise ValueError(f"src_lengths must have shape [B] = {src.shape[:1]}, got {src_lengths.shape}")
    vocab = model.cfg.tgt_vocab_size
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if not 0 <= value < vocab:
            raise ValueError(f"{name} must be in [0, tgt_vocab_size={vocab}), got {value}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if isinstance(model, Transformer) and max_length > model.cfg.max_length:
        raise ValueError(f"max_length must be <= the Transformer's cfg.max_length={model.cfg.max_length}, "
                         f"got {max_length}")
    return _Seq2SeqDecoder(model) if isinstance(model, Seq2Seq) else _TransformerDecoder(model)


@functools.partial(jax.jit, static_argnames=("bos_id", "eos_id", "max_length"))
def greedy_decode(model, src: jax.Array, src_lengths: jax.Array, *, bos_id: int, eos_id: int,
                  max_length: int) -> tuple[jax.Array, jax.Array]:
    """Seq2Seq or Transformer, src [B, S] int, src_lengths [B] -> (tokens [B, max_length] int32 without BOS,
    eos_id after the first EOS; scores [B] float32, the summed log-probabilities up to and including EOS)."""
    decoder = _translation_decoder(model, src, src_lengths, bos_id=bos_id, eos_id=eos_id, max_length=max_length)
    batch = src.shape[0]

    def body(carry, _):
        state, last, score, ended = carry
        logits, state = decoder.step(state, last)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token = jnp.where(ended, eos_id, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))
        gained = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        score = score + jnp.where(ended, 0.0, gained)
        return (state, token, score, ended | (token == eos_id)), token

    start = (decoder.start(src, src_lengths, 1, max_length), jnp.full((batch,), bos_id, jnp.int32),
             jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), bool))
    (_, _, scores, _), tokens = jax.lax.scan(body, start, None, length=max_length)
    return tokens.T, scores


@functools.partial(jax.jit, static_argnames=("bos_id", "eos_id", "max_length", "beam_size", "length_penalty"))
def beam_search(model, src: jax.Array, src_lengths: jax.Array, *, bos_id: int, eos_id: int, max_length: int,
                beam_size: int = 4, length_penalty: float = 0.6) -> tuple[jax.Array, jax.Array]:
    """Seq2Seq or Transformer, src [B, S] int, src_lengths [B] -> (tokens [B, max_length] int32, scores [B]
    float32) of the best hypothesis per source; see flaxlm.beam_search for the search.

    Hypotheses are ranked by score / ((5 + length) / 6) ** length_penalty, but `scores` is the raw summed
    log-probability up to and including EOS. beam_size=1 is greedy_decode.
    """
    decoder = _translation_decoder(model, src, src_lengths, bos_id=bos_id, eos_id=eos_id, max_length=max_length)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    state = decoder.start(src, src_lengths, beam_size, max_length)
    return run_beam_search(decoder, state, batch=src.shape[0], bos_id=bos_id, eos_id=eos_id, max_length=max_length,
                           beam_size=beam_size, length_penalty=length_penalty)
