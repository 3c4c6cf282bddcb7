"""flaxlm.data: tokenizers, file readers and Grain pipelines.

    text = read_text(path)                     # or default_corpus_text()
    tok = CharTokenizer.train(text)
    train = lm_windows(np.asarray(tok.encode(text)), block_size=64, batch_size=12, seed=0)
    batch = next(train)                        # {"inputs": [B,T] int32, "targets": [B,T] int32, "mask": [B,T] float32}
    state = train.get_state()                  # JSON-serialisable; train.set_state(state) resumes exactly
"""

from flaxlm.data.default_corpus import default_corpus_text
from flaxlm.data.pipelines import (
    bucketed_batches,
    classification_batches,
    default_read_options,
    lm_sequential,
    lm_windows,
    packed_lm,
    translation_batches,
)
from flaxlm.data.sources import (
    LabeledTexts,
    ParallelTexts,
    enforce_max_length,
    read_bytes,
    read_lines,
    read_parallel,
    read_text,
    read_tsv_labeled,
)
from flaxlm.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "LabeledTexts",
    "ParallelTexts",
    "Tokenizer",
    "WordTokenizer",
    "bucketed_batches",
    "classification_batches",
    "default_corpus_text",
    "default_read_options",
    "enforce_max_length",
    "lm_sequential",
    "lm_windows",
    "load_tokenizer",
    "packed_lm",
    "read_bytes",
    "read_lines",
    "read_parallel",
    "read_text",
    "read_tsv_labeled",
    "train_tokenizer",
    "translation_batches",
]
