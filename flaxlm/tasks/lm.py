"""Causal language modelling with GPT on one text file (or the embedded default corpus).

Like nanoGPT's shakespeare_char: a character (or BPE/word) tokenizer, the first (1 - valid_fraction) of
the token stream for training with random windows, the rest for validation, evaluated on EVERY target
of the split (not a few random batches).
"""

import numpy as np

from flaxlm.data.default_corpus import default_corpus_text
from flaxlm.data.pipelines import lm_sequential, lm_windows
from flaxlm.data.sources import read_text
from flaxlm.data.tokenizers import train_tokenizer
from flaxlm.errors import DataError
from flaxlm.experiment import ExperimentConfig, model_config
from flaxlm.models.gpt import GPT, GPTConfig
from flaxlm.ops.losses import sequence_cross_entropy


def _tokenizer_options(cfg: ExperimentConfig) -> dict:
    if cfg.data.tokenizer == "bpe":
        return {"vocab_size": cfg.data.vocab_size}
    if cfg.data.tokenizer == "word":
        return {"min_count": cfg.data.min_count}
    return {"unknown": "error"}


class LMTask:
    """Data, model and loss for `task: lm`.

    Batches: inputs [B, T] int32, targets [B, T] int32, mask [B, T] float32 (T = data.block_size).
    """

    def __init__(self, cfg: ExperimentConfig, tokenizer=None):
        self.cfg = cfg
        data = cfg.data
        text = default_corpus_text() if data.train == "default" else read_text(data.train)
        train_name = "default corpus" if data.train == "default" else data.train
        if data.valid is None:
            cut = int(len(text) * (1.0 - data.valid_fraction))
            train_text, valid_text, valid_name = text[:cut], text[cut:], train_name
        else:
            train_text, valid_text, valid_name = text, read_text(data.valid), data.valid
        # Like nanoGPT's prepare.py, characters come from the whole file: a split must not hit an unseen one.
        vocab_text = text if data.tokenizer == "char" and data.valid is None else train_text
        self.tokenizer = tokenizer or train_tokenizer(data.tokenizer, vocab_text, **_tokenizer_options(cfg))
        self.splits = {"train": self._encode(train_text, train_name), "valid": self._encode(valid_text, valid_name)}
        if data.test is not None:
            self.splits["test"] = self._encode(read_text(data.test), data.test)
        self.model_config = model_config(GPTConfig, cfg.model, vocab_size=self.tokenizer.vocab_size,
                                         block_size=cfg.model.get("block_size", data.block_size))
        if data.block_size > self.model_config.block_size:
            raise DataError(f"data.block_size={data.block_size} exceeds "
                            f"model.block_size={self.model_config.block_size}")
        self.tokens_per_batch = data.batch_size * data.block_size

    def _encode(self, text: str, path) -> np.ndarray:
        try:
            ids = np.asarray(self.tokenizer.encode(text), np.int32)
        except DataError as e:
            raise DataError(f"does not match the tokenizer: {e.message}", path) from None
        if len(ids) <= self.cfg.data.block_size:
            raise DataError(f"has {len(ids)} tokens, fewer than block_size + 1 = {self.cfg.data.block_size + 1}",
                            path)
        return ids

    def make_model(self, rngs) -> GPT:
        return GPT(self.model_config, rngs=rngs)

    @staticmethod
    def loss_fn(model, batch, dropout_key):
        """Summed next-token cross-entropy over real targets, with the token count as weight."""
        logits = model(batch["inputs"], dropout_key=dropout_key)
        loss_sum, count = sequence_cross_entropy(logits, batch["targets"], batch["mask"])
        correct = ((logits.argmax(-1) == batch["targets"]) * batch["mask"]).sum()
        return loss_sum, {"weight": count, "correct": correct}

    def train_iterator(self):
        data = self.cfg.data
        return lm_windows(self.splits["train"], block_size=data.block_size, batch_size=data.batch_size,
                          seed=self.cfg.train.seed)

    def eval_iterator(self, split: str):
        if split not in self.splits:
            raise DataError(f"no {split!r} split: set data.{split}=PATH")
        data = self.cfg.data
        return lm_sequential(self.splits[split], block_size=data.block_size, batch_size=data.eval_batch_size)

    def model_flops_per_step(self) -> float:
        """6 N D for the non-embedding parameters plus attention (PaLM appendix B), per training step."""
        m = self.model_config
        n = 12 * m.n_layer * m.n_embd**2 + m.n_embd * m.vocab_size
        t = self.cfg.data.block_size
        attention = 12 * m.n_layer * m.n_embd * t
        return float((6 * n + attention) * self.tokens_per_batch)
