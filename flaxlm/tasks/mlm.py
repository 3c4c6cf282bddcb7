"""Masked-language-model pretraining of BERT (`BertMLM`) on unlabeled sentences.

Text: the sentences of `data.train` (the text column of a `label<TAB>text` file, whose labels are ignored, or
one sentence per line of a plain text file) plus every file of `data.extra_text` (one sentence per line);
validation on the sentences of `data.valid`. Every sentence becomes `<bos> ids <eos>` (BERT's [CLS] ... [SEP]);
a sentence longer than the longest sequence is cut into consecutive chunks, each framed the same way, so no
text is dropped. The tokenizer ('word', lower-cased, or 'bpe') is trained on the training text with a `<mask>`
token; a fine-tuning run (`task: classify`, `backbone: bert`, `train.init_from`) reuses it.

Masking (BERT's 80/10/10 over `data.mask_prob` of the real tokens, `mask_tokens`) happens inside the loss,
with a key split from the step's dropout key, so every step and every epoch sees a fresh masking. Evaluation
masks with a fixed key (folded with the batch's contents), so the eval loss is deterministic. Special tokens
(`<pad>`, `<unk>`, `<bos>`, `<eos>`, `<mask>`) are never selected: predicting them teaches nothing.

Like BERT's `max_predictions_per_seq`, the output layer runs only at the selected positions, gathered into a
static number of slots (`prediction_slots`, 4 standard deviations above the expected count): the [V]-wide
projection is most of the step's work, and ~85% of it would be thrown away.
"""

import math

import jax
import jax.numpy as jnp

from flaxlm.data.pipelines import bucketed_batches
from flaxlm.data.sources import read_lines, read_tsv_labeled
from flaxlm.data.tokenizers import train_tokenizer
from flaxlm.errors import ConfigError, DataError
from flaxlm.experiment import ExperimentConfig, model_config
from flaxlm.models.bert import BertConfig, BertMLM, mask_tokens
from flaxlm.ops.losses import softmax_cross_entropy

EVAL_MASK_SEED = 0


def prediction_slots(num_positions: int, mask_prob: float) -> int:
    """Static number of predicted positions for a [B, T] batch of B * T positions: the expected number
    selected plus 4 standard deviations (a batch selecting more predicts its first slots only)."""
    mean = num_positions * mask_prob
    return min(num_positions, math.ceil(mean + 4.0 * math.sqrt(mean * (1.0 - mask_prob))) + 1)


def selected_logits(model: BertMLM, hidden: jax.Array, selected: jax.Array, slots: int):
    """BertMLM's output head at the first `slots` selected positions: hidden [B, T, F], selected [B, T] ->
    (logits [K, V] float32, flat indices [K] into B * T, used [K] bool; unused slots point at position 0)."""
    flat = selected.reshape(-1)
    (index,) = jnp.nonzero(flat, size=slots, fill_value=0)
    used = jnp.arange(slots) < flat.sum()
    return model.predict(hidden.reshape(-1, hidden.shape[-1])[index]), index, used


def read_sentences(path) -> list[str]:
    """The sentences of `path`: the text column of a `label<TAB>text` file (header first column `label`),
    else every non-blank line, stripped. Gzipped files (*.gz) are read transparently."""
    lines = read_lines(path)
    if lines and lines[0].split("\t")[0].strip().lower() == "label":
        return read_tsv_labeled(path).texts
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise DataError("no sentences (only blank lines)", path)
    return sentences


def tokenizer_options(cfg: ExperimentConfig) -> dict:
    """The options `train_tokenizer` gets for `cfg.data.tokenizer`, as in `task: classify`, plus a `<mask>`."""
    data = cfg.data
    if data.tokenizer == "word":
        return {"min_count": data.min_count, "lowercase": True, "mask": True}
    if data.tokenizer == "bpe":
        return {"vocab_size": data.vocab_size, "mask": True}
    raise ConfigError(f"task 'mlm' needs a tokenizer with special tokens: 'word' or 'bpe', got {data.tokenizer!r}",
                      key="data.tokenizer")


class MLMTask:
    """Data, model and loss for `task: mlm`.

    Batches (`bucketed_batches`): tokens [B, T] int32 (`<bos> ids <eos>`, then padding), tokens_lengths [B]
    int32, weights [B] float32 (0 = filler row). T is a bucket boundary.
    """

    def __init__(self, cfg: ExperimentConfig, tokenizer=None):
        self.cfg = cfg
        data = cfg.data
        if data.train == "default":
            raise DataError("task 'mlm' needs data.train=PATH to a text or label<TAB>sentence file")
        if data.valid is None:
            raise DataError("task 'mlm' needs data.valid=PATH to a text or label<TAB>sentence file")
        options = tokenizer_options(cfg)
        texts = {path: read_sentences(path) for path in (data.train, *data.extra_text)}
        self.tokenizer = tokenizer or train_tokenizer(
            data.tokenizer, [s for sentences in texts.values() for s in sentences], **options)
        if self.tokenizer.mask_id is None:
            raise DataError(f"the {self.tokenizer.kind} tokenizer has no <mask> token: task 'mlm' needs one "
                            "(train it with mask=True)")
        self.model_config = model_config(BertConfig, cfg.model, vocab_size=self.tokenizer.vocab_size)
        self.max_length = min(data.max_length, data.bucket_boundaries[-1])
        if self.max_length > self.model_config.max_position:
            raise ConfigError(f"the longest sequence (the smaller of data.max_length and the largest bucket boundary, "
                              f"{self.max_length}) exceeds model.max_position={self.model_config.max_position}",
                              key="data.max_length")
        if self.max_length < 3:
            raise ConfigError(f"must leave room for <bos>, a token and <eos> (>= 3), got {self.max_length}",
                              key="data.max_length")
        tok = self.tokenizer
        self.special_ids = tuple(i for i in (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id)
                                 if i is not None)
        self.splits = {
            "train": [seq for sentences in texts.values() for seq in self._encode(sentences)],
            "valid": self._encode(read_sentences(data.valid)),
        }
        if data.test is not None:
            self.splits["test"] = self._encode(read_sentences(data.test))
        self.tokens_per_batch = data.batch_size * data.bucket_boundaries[-1]

    def _encode(self, sentences: list[str]) -> list[list[int]]:
        """Sentences -> `<bos> ids <eos>` sequences of at most max_length, long ones cut into several."""
        tok, width = self.tokenizer, self.max_length - 2
        out = []
        for sentence in sentences:
            ids = tok.encode(sentence)
            for start in range(0, len(ids), width):
                out.append([tok.bos_id, *ids[start : start + width], tok.eos_id])
        return out

    def make_model(self, rngs) -> BertMLM:
        return BertMLM(self.model_config, rngs=rngs)

    def loss_fn(self, model, batch, dropout_key):
        """Summed cross-entropy over the selected real tokens (at most `prediction_slots`), with their count as
        weight; `correct` counts the selected tokens predicted exactly.

        Training: masking key and dropout key are split from dropout_key. Evaluation (dropout_key None): the
        masking key is EVAL_MASK_SEED folded with the batch's token sum, fixed for a given batch.
        """
        tokens = batch["tokens"]
        if dropout_key is None:
            mask_key, model_key = jax.random.fold_in(jax.random.key(EVAL_MASK_SEED), tokens.sum()), None
        else:
            mask_key, model_key = jax.random.split(dropout_key)
        inputs, selected = mask_tokens(tokens, mask_key, mask_id=self.tokenizer.mask_id,
                                       vocab_size=self.model_config.vocab_size, special_ids=self.special_ids,
                                       mask_prob=self.cfg.data.mask_prob)
        hidden = model.encode(inputs, lengths=batch["tokens_lengths"], dropout_key=model_key)
        logits, index, used = selected_logits(model, hidden, selected,
                                              prediction_slots(tokens.size, self.cfg.data.mask_prob))
        targets = tokens.reshape(-1)[index]
        weights = used.astype(jnp.float32)
        loss_sum = softmax_cross_entropy(logits, targets, weights=weights).sum()
        correct = ((logits.argmax(-1) == targets) & used).sum()
        return loss_sum, {"weight": weights.sum(), "correct": correct.astype(jnp.float32)}

    def _batches(self, split: str, *, batch_size: int, shuffle: bool, num_epochs):
        return bucketed_batches([{"tokens": ids} for ids in self.splits[split]],
                                bucket_boundaries=self.cfg.data.bucket_boundaries, batch_size=batch_size,
                                pad_id=self.tokenizer.pad_id, seed=self.cfg.train.seed, shuffle=shuffle,
                                num_epochs=num_epochs)

    def train_iterator(self):
        return self._batches("train", batch_size=self.cfg.data.batch_size, shuffle=True, num_epochs=None)

    def eval_iterator(self, split: str):
        if split not in self.splits:
            raise DataError(f"no {split!r} split: set data.{split}=PATH")
        return self._batches(split, batch_size=self.cfg.data.eval_batch_size, shuffle=False, num_epochs=1)

    def model_flops_per_step(self) -> float:
        """6 N D for the layers over the padded batch plus attention, and for the head over the prediction slots."""
        m = self.model_config
        h, t = m.hidden_size, self.cfg.data.bucket_boundaries[-1]
        layers = m.num_layers * (4 * h * h + 2 * h * m.intermediate_size)
        attention = 12 * m.num_layers * h * t
        slots = prediction_slots(self.tokens_per_batch, self.cfg.data.mask_prob)
        return float((6 * layers + attention) * self.tokens_per_batch + 6 * (h * h + h * m.vocab_size) * slots)
