"""The embedded default corpus: offline, deterministic, large enough for a char-level GPT."""

import numpy as np

from flaxlm.data.default_corpus import default_corpus_text
from flaxlm.data.pipelines import lm_windows
from flaxlm.data.tokenizers import CharTokenizer


def test_default_corpus_is_large_deterministic_prose():
    text = default_corpus_text()
    assert len(text) >= 500_000
    assert text.startswith("The Zen of Python, by Tim Peters\n\nBeautiful is better than ugly.")
    assert default_corpus_text.__wrapped__() == text
    assert 60 <= len(set(text)) <= 300
    assert sum(c.isascii() for c in text) / len(text) > 0.99


def test_default_corpus_feeds_a_char_lm_pipeline():
    text = default_corpus_text()
    tok = CharTokenizer.train(text)
    tokens = np.asarray(tok.encode(text), np.int32)
    assert tok.decode(tokens[:200].tolist()) == text[:200]
    batch = next(lm_windows(tokens, block_size=64, batch_size=12, seed=0, process_index=0, process_count=1))
    assert batch["inputs"].shape == (12, 64) and batch["inputs"].max() < tok.vocab_size
