"""Translation (e.g. German -> English Multi30k) with an LSTM Seq2Seq or a Transformer.

Files: `data.train`, `data.valid` and `data.test` are path prefixes; a split's sentences are
`PREFIX.SRC` and `PREFIX.TGT` (each optionally gzipped, `PREFIX.SRC.gz`), with SRC = `data.source_lang` and
TGT = `data.target_lang` (fairseq's layout). One tokenizer (`data.tokenizer`: word or byte-level BPE) is
trained on the source and target training sentences together, so source and target share ids.

The task's own options live in the `model` section and are removed before the model config is built:

    arch: seq2seq | transformer     which model (Seq2SeqConfig or TransformerConfig fields follow)
    label_smoothing: 0.0            smoothing of the training loss's targets
    teacher_forcing_ratio: 1.0      seq2seq only: probability of feeding the true previous token

Lengths: a source keeps at most L = min(data.max_length, largest bucket boundary) tokens and a target L - 1
(room for <eos>); longer ones are truncated with one warning per file, or rejected (`data.overlong`).

Evaluation: the loss is label-smoothed like the training loss; the loss's aux `nll` is the unsmoothed summed
cross-entropy (perplexity = exp(nll / tokens)). `extra_metrics` greedy-decodes the split (each output at most
len(source) + DECODE_MARGIN tokens; batched and jitted, one compile per source bucket) and scores the detokenized
output against the raw reference lines with sacreBLEU (13a tokenization).
"""

import os
import warnings

import jax
import numpy as np

from flaxlm.data.pipelines import translation_batches
from flaxlm.data.sources import enforce_max_length, read_parallel
from flaxlm.data.tokenizers import train_tokenizer
from flaxlm.decode import beam_search, greedy_decode
from flaxlm.errors import ConfigError, DataError, FlaxlmError
from flaxlm.evaluation import corpus_bleu
from flaxlm.experiment import ExperimentConfig, model_config
from flaxlm.models.seq2seq import Seq2Seq, Seq2SeqConfig
from flaxlm.models.transformer import Transformer, TransformerConfig
from flaxlm.ops.losses import sequence_cross_entropy

ARCHS = {"seq2seq": (Seq2SeqConfig, Seq2Seq), "transformer": (TransformerConfig, Transformer)}
DECODE_MARGIN = 10


def parallel_paths(prefix: str, source_lang: str, target_lang: str, key: str) -> tuple[str, str]:
    """(source file, target file) of a split: PREFIX.LANG, else PREFIX.LANG.gz; DataError naming both if neither."""
    paths = []
    for lang in (source_lang, target_lang):
        candidates = (f"{prefix}.{lang}", f"{prefix}.{lang}.gz")
        found = next((path for path in candidates if os.path.exists(path)), None)
        if found is None:
            raise DataError(f"{key}={prefix}: no {lang!r} file: neither {candidates[0]} nor {candidates[1]} exists")
        paths.append(found)
    return paths[0], paths[1]


def _task_options(model: dict) -> tuple[str, float, float, dict]:
    """Split the model section into (arch, label_smoothing, teacher_forcing_ratio, the model config's fields)."""
    model = dict(model)
    arch = model.pop("arch", None)
    if arch not in ARCHS:
        raise ConfigError(f"must be one of {', '.join(ARCHS)}, got {arch!r}", key="model.arch")
    label_smoothing = model.pop("label_smoothing", 0.0)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"must be a number in [0, 1), got {label_smoothing!r}", key="model.label_smoothing")
    if "teacher_forcing_ratio" in model and arch != "seq2seq":
        raise ConfigError("applies to model.arch=seq2seq only", key="model.teacher_forcing_ratio")
    ratio = model.pop("teacher_forcing_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"must be a number in [0, 1], got {ratio!r}", key="model.teacher_forcing_ratio")
    return arch, float(label_smoothing), float(ratio), model


class TranslateTask:
    """Data, model and loss for `task: translate`.

    Batches (from `translation_batches`): src [B, T], src_lengths [B], tgt_in [B, T] (<bos> + y),
    tgt_out [B, T] (y + <eos>), tgt_lengths [B] int32; tgt_mask [B, T], weights [B] float32.
    """

    def __init__(self, cfg: ExperimentConfig, tokenizer=None):
        self.cfg = cfg
        data = cfg.data
        self.arch, self.label_smoothing, self.teacher_forcing_ratio, model_fields = _task_options(cfg.model)
        for key in ("source_lang", "target_lang"):
            if not getattr(data, key):
                raise ConfigError("task 'translate' needs the language suffix of its files, e.g. de or en",
                                  key=f"data.{key}")
        if data.train == "default":
            raise DataError("task 'translate' needs data.train=PREFIX (files PREFIX.SRC and PREFIX.TGT)")
        if data.valid is None:
            raise DataError("task 'translate' needs data.valid=PREFIX (files PREFIX.SRC and PREFIX.TGT)")
        if data.tokenizer == "char":
            raise ConfigError("task 'translate' needs a tokenizer with <pad>/<bos>/<eos>: 'word' or 'bpe'",
                              key="data.tokenizer")
        self.max_length = min(data.max_length, data.bucket_boundaries[-1])
        if self.max_length < 2:
            raise ConfigError(f"must leave room for a target token and <eos>, got {self.max_length}",
                              key="data.max_length")
        pairs = {"train": read_parallel(*parallel_paths(data.train, data.source_lang, data.target_lang,
                                                        "data.train"))}
        for split in ("valid", "test"):
            prefix = getattr(data, split)
            if prefix is not None:
                pairs[split] = read_parallel(*parallel_paths(prefix, data.source_lang, data.target_lang,
                                                             f"data.{split}"))
        if tokenizer is None:
            options = {"vocab_size": data.vocab_size} if data.tokenizer == "bpe" else {"min_count": data.min_count}
            tokenizer = train_tokenizer(data.tokenizer, pairs["train"].src + pairs["train"].tgt, **options)
        if None in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id):
            raise DataError(f"the {tokenizer.kind} tokenizer lacks <pad>/<unk>/<bos>/<eos>; use 'word' or 'bpe'")
        self.tokenizer = tokenizer
        vocab = tokenizer.vocab_size
        cls, self._model_cls = ARCHS[self.arch]
        self.model_config = model_config(cls, model_fields, src_vocab_size=vocab, tgt_vocab_size=vocab)
        longest = self.output_limit(data.bucket_boundaries[-1])
        if self.arch == "transformer" and self.model_config.max_length < longest:
            raise ConfigError(f"must cover the longest decoded output, the largest bucket + {DECODE_MARGIN} = "
                              f"{longest}, got {self.model_config.max_length}", key="model.max_length")
        self.references = {split: p.tgt for split, p in pairs.items()}
        self.splits = {split: self._encode(p) for split, p in pairs.items()}
        self.tokens_per_batch = data.batch_size * data.bucket_boundaries[-1]

    def _encode(self, pairs):
        """Token ids of a split's (source, target) sentences, lengths enforced per file."""
        policy = self.cfg.data.overlong
        src = enforce_max_length([self.tokenizer.encode(s) for s in pairs.src], self.max_length, policy=policy,
                                 path=pairs.src_path, lines=pairs.lines)
        tgt = enforce_max_length([self.tokenizer.encode(t) for t in pairs.tgt], self.max_length - 1, policy=policy,
                                 path=pairs.tgt_path, lines=pairs.lines)
        return src, tgt

    def make_model(self, rngs):
        return self._model_cls(self.model_config, rngs=rngs)

    def loss_fn(self, model, batch, dropout_key):
        """Summed label-smoothed cross-entropy over real target tokens, with the token count as weight; aux
        `nll` is the unsmoothed sum (so nll / weight is the per-token cross-entropy behind the perplexity).

        Training (a dropout_key) of a seq2seq model with teacher_forcing_ratio < 1 draws the teacher-forcing
        choices from a key split off dropout_key; evaluation (dropout_key None) always feeds the references.
        """
        kwargs = {}
        if dropout_key is not None and self.arch == "seq2seq" and self.teacher_forcing_ratio < 1.0:
            dropout_key, forcing_key = jax.random.split(dropout_key)
            kwargs = {"teacher_forcing_ratio": self.teacher_forcing_ratio, "teacher_forcing_key": forcing_key}
        logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"], dropout_key=dropout_key, **kwargs)
        mask = batch["tgt_mask"]
        nll, count = sequence_cross_entropy(logits, batch["tgt_out"], mask)
        loss_sum = nll if not self.label_smoothing else sequence_cross_entropy(
            logits, batch["tgt_out"], mask, label_smoothing=self.label_smoothing)[0]
        correct = ((logits.argmax(-1) == batch["tgt_out"]) * mask).sum()
        return loss_sum, {"weight": count, "correct": correct, "nll": nll}

    def _batches(self, split: str, *, batch_size: int, shuffle: bool, num_epochs):
        src, tgt = self.splits[split]
        data = self.cfg.data
        return translation_batches(src, tgt, bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                                   bucket_boundaries=data.bucket_boundaries, batch_size=batch_size,
                                   pad_id=self.tokenizer.pad_id, seed=self.cfg.train.seed, shuffle=shuffle,
                                   num_epochs=num_epochs)

    def train_iterator(self):
        return self._batches("train", batch_size=self.cfg.data.batch_size, shuffle=True, num_epochs=None)

    def eval_iterator(self, split: str):
        if split not in self.splits:
            raise DataError(f"no {split!r} split: set data.{split}=PREFIX")
        return self._batches(split, batch_size=self.cfg.data.eval_batch_size, shuffle=False, num_epochs=1)

    def output_limit(self, source_length: int) -> int:
        """Most output tokens (<eos> included) decoded for a source of `source_length` tokens."""
        return source_length + DECODE_MARGIN

    def _source_batches(self, src_ids, batch_size: int):
        """(indices, src [batch_size, S], src_lengths) with sources sorted by length, S their smallest bucket.

        Rows past len(indices) repeat the first source (their outputs are dropped).
        """
        boundaries = self.cfg.data.bucket_boundaries
        order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            length = next(b for b in boundaries if b >= len(src_ids[indices[-1]]))
            rows = [src_ids[i] for i in indices]
            rows += [rows[0]] * (batch_size - len(rows))
            src = np.full((batch_size, length), self.tokenizer.pad_id, np.int32)
            for r, row in enumerate(rows):
                src[r, :len(row)] = row
            yield indices, src, np.asarray([len(row) for row in rows], np.int32)

    def generate(self, model, src_ids, *, beam_size: int = 1, length_penalty: float = 0.6) -> list[list[int]]:
        """Output ids (without <bos>/<eos>) for each source id list (each 1 to L tokens).

        beam_size 1 is greedy decoding; otherwise beam search with the GNMT length penalty `length_penalty`.
        Each output stops at <eos> or after `output_limit(len(source))` tokens. Batches of eval_batch_size
        sources of similar length are decoded for their bucket length + DECODE_MARGIN steps, so decoding
        compiles once per bucket; greedy outputs do not depend on which sources share a batch.
        """
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise FlaxlmError(f"beam size must be an integer >= 1, got {beam_size!r}")
        if not length_penalty >= 0.0:
            raise FlaxlmError(f"length penalty must be >= 0, got {length_penalty!r}")
        for i, ids in enumerate(src_ids):
            if not 1 <= len(ids) <= self.max_length:
                raise FlaxlmError(f"source {i} has {len(ids)} tokens, expected 1 to {self.max_length}")
        tok = self.tokenizer
        outputs: list[list[int]] = [[] for _ in src_ids]
        batch_size = max(1, min(self.cfg.data.eval_batch_size, len(src_ids)))
        for indices, src, src_lengths in self._source_batches(src_ids, batch_size):
            common = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, max_length=self.output_limit(src.shape[1]))
            if beam_size == 1:
                tokens, _ = greedy_decode(model, src, src_lengths, **common)
            else:
                tokens, _ = beam_search(model, src, src_lengths, beam_size=beam_size,
                                        length_penalty=float(length_penalty), **common)
            for row, index in zip(np.asarray(tokens).tolist(), indices):
                row = row[:self.output_limit(len(src_ids[index]))]
                outputs[index] = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
        return outputs

    def extra_metrics(self, model, split: str) -> dict[str, float]:
        """BLEU of greedy translations of the whole split against its raw reference lines."""
        if split not in self.splits:
            raise DataError(f"no {split!r} split: set data.{split}=PREFIX")
        hypotheses = [self.tokenizer.decode(ids) for ids in self.generate(model, self.splits[split][0])]
        return {"bleu": corpus_bleu(hypotheses, self.references[split])}

    def encode_source(self, text: str) -> list[int]:
        """Token ids of one source sentence, never failing: text that is not valid Unicode is repaired first,
        unknown words map to <unk>; the result may exceed L tokens (see `translate`)."""
        text = text.encode("utf-8", "replace").decode("utf-8")
        return self.tokenizer.encode(text)

    def translate(self, model, lines, *, beam_size: int = 4, length_penalty: float = 0.6,
                  source: str = "input") -> list[str]:
        """Translate source sentences, one output line per input line.

        Blank lines (or lines with no tokens) give empty outputs; lines longer than L tokens are truncated,
        with one warning naming `source` and the first such line number (1-based).
        """
        ids = [self.encode_source(line) if line.strip() else [] for line in lines]
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            ids = enforce_max_length(ids, self.max_length, policy="truncate", path=source,
                                     lines=range(1, len(ids) + 1))
        keep = [i for i, x in enumerate(ids) if x]
        outputs = [""] * len(ids)
        generated = self.generate(model, [ids[i] for i in keep], beam_size=beam_size,
                                  length_penalty=length_penalty) if keep else []
        for i, out in zip(keep, generated):
            outputs[i] = self.tokenizer.decode(out)
        return outputs

    def model_flops_per_step(self) -> float:
        """An estimate: 6 x (matmul parameters used per token) x tokens, with both sides at the largest bucket.

        Counts the Transformer's attention/FFN projections, attention scores and output projection, or the
        Seq2Seq's LSTM gates, attention and output projection; embeddings, norms and biases are left out, and
        real batches (bucketed, padded) are usually shorter, so this is an upper estimate of useful work.
        """
        m, t = self.model_config, self.cfg.data.bucket_boundaries[-1]
        if self.arch == "transformer":
            d = m.d_model
            encoder = m.num_encoder_layers * (4 * d * d + 2 * d * m.mlp_dim + 2 * t * d)
            decoder = m.num_decoder_layers * (8 * d * d + 2 * d * m.mlp_dim + 4 * t * d)
            per_token = encoder + decoder + d * m.tgt_vocab_size
        else:
            h = m.hidden_size
            attention = {"none": 0, "luong": 2 * h * h + 2 * t * h, "bahdanau": 2 * h * h + 3 * t * h}[m.attention]
            context = h if m.attention == "bahdanau" else 0
            lstm = 4 * h * (m.src_embed_dim + h) + 4 * h * (m.tgt_embed_dim + context + h) \
                + 2 * (m.num_layers - 1) * 4 * h * (2 * h)
            out = (2 * h if m.attention == "bahdanau" else h) * m.tgt_vocab_size
            per_token = lstm + attention + out
        return float(6 * per_token * self.tokens_per_batch)
