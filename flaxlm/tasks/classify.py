"""Sentence classification (SST-2 style TSV files) with TextClassifier.

Training batches are bucketed by length (`data.bucket_boundaries`) so the step compiles once per bucket;
sentences longer than `data.max_length` are truncated with a warning or rejected (`data.overlong`).
`data.label_fraction` < 1 keeps a fixed random subset of the training labels (low-resource runs).

With `backbone: bert` every sentence is framed as `<bos> ids <eos>` (BERT's [CLS] ... [SEP], as in `task: mlm`)
and `model.bert.vocab_size` comes from the tokenizer. `train.init_from` (the workdir of a `task: mlm` run)
starts the backbone from that run's pretrained encoder and tokenizes with that run's tokenizer; the head is
freshly initialised.
"""

import pathlib

import numpy as np

from flaxlm.checkpoint import CheckpointError, restore_params
from flaxlm.data.pipelines import classification_batches
from flaxlm.data.sources import enforce_max_length, read_tsv_labeled
from flaxlm.data.tokenizers import load_tokenizer, train_tokenizer
from flaxlm.errors import ConfigError, DataError
from flaxlm.experiment import ExperimentConfig, model_config
from flaxlm.models.classifier import ClassifierConfig, TextClassifier
from flaxlm.ops.losses import softmax_cross_entropy


def _check_labels(rows, num_classes: int) -> None:
    """DataError naming the file and line of the first label outside [0, num_classes)."""
    for label, line in zip(rows.labels, rows.lines):
        if label >= num_classes:
            raise DataError(f"label {label} is outside the model's {num_classes} classes (model.num_classes)",
                            rows.path, line)


def _require_bert(backbone: str, init_from: str) -> None:
    if backbone != "bert":
        raise ConfigError(f"{init_from!r}: only backbone 'bert' can start from a pretrained run (a task: mlm "
                          f"workdir), got backbone {backbone!r}", key="train.init_from")


def _pretraining_tokenizer(cfg: ExperimentConfig):
    """The tokenizer saved in the `train.init_from` workdir; its kind must be `data.tokenizer`."""
    path = pathlib.Path(cfg.train.init_from) / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{cfg.train.init_from!r} has no tokenizer.json: not the workdir of a flaxlm run",
                          key="train.init_from")
    tokenizer = load_tokenizer(path)
    if tokenizer.kind != cfg.data.tokenizer:
        raise ConfigError(f"is {cfg.data.tokenizer!r} but the pretraining run {cfg.train.init_from!r} "
                          f"(train.init_from) used a {tokenizer.kind!r} tokenizer", key="data.tokenizer")
    return tokenizer


def _with_bert_vocab(model: dict, vocab_size: int) -> dict:
    """The `model` section with `bert.vocab_size` set from the tokenizer (ConfigError if set otherwise)."""
    bert = model.get("bert") or {}
    if not isinstance(bert, dict):
        raise ConfigError(f"must be a mapping of BertConfig fields, got {bert!r}", key="model.bert")
    if bert.get("vocab_size", vocab_size) != vocab_size:
        raise ConfigError(f"is set by the data ({vocab_size}), got {bert['vocab_size']}", key="model.bert.vocab_size")
    return {**model, "bert": {**bert, "vocab_size": vocab_size}}


class ClassifyTask:
    """Data, model and loss for `task: classify`.

    Batches: tokens [B, T] int32, lengths [B] int32, labels [B] int32, weights [B] float32 (0 = filler row).
    """

    def __init__(self, cfg: ExperimentConfig, tokenizer=None):
        self.cfg = cfg
        data = cfg.data
        if data.train == "default":
            raise DataError("task 'classify' needs data.train=PATH to a label<TAB>sentence file")
        if data.valid is None:
            raise DataError("task 'classify' needs data.valid=PATH to a label<TAB>sentence file")
        train = read_tsv_labeled(data.train)
        if data.label_fraction < 1.0:
            keep = np.random.default_rng(cfg.train.seed).permutation(len(train))[
                : max(1, int(len(train) * data.label_fraction))]
            train = type(train)(train.path, [train.texts[i] for i in keep], [train.labels[i] for i in keep],
                                [train.lines[i] for i in keep])
        backbone = cfg.model.get("backbone", "lstm")
        if cfg.train.init_from is not None:
            _require_bert(backbone, cfg.train.init_from)
            tokenizer = tokenizer or _pretraining_tokenizer(cfg)
        options = {"min_count": data.min_count, "lowercase": True} if data.tokenizer == "word" else {}
        if data.tokenizer == "bpe":
            options = {"vocab_size": data.vocab_size}
        self.tokenizer = tokenizer or train_tokenizer(data.tokenizer, train.texts, **options)
        if self.tokenizer.pad_id is None:
            raise DataError(f"data.tokenizer={data.tokenizer!r} has no padding id; use 'word' or 'bpe'")
        rows = {"train": train, "valid": read_tsv_labeled(data.valid)}
        seen_classes = max(max(split.labels) for split in rows.values()) + 1
        if data.test is not None:
            rows["test"] = read_tsv_labeled(data.test)
        self.framed = backbone == "bert"
        model = _with_bert_vocab(cfg.model, self.tokenizer.vocab_size) if self.framed else cfg.model
        self.model_config = model_config(ClassifierConfig, model, vocab_size=self.tokenizer.vocab_size,
                                         num_classes=cfg.model.get("num_classes", max(2, seen_classes)))
        self.max_length = min(data.max_length, data.bucket_boundaries[-1])
        if self.framed and not 3 <= self.max_length <= self.model_config.bert.max_position:
            raise ConfigError(f"the longest sequence (the smaller of data.max_length and the largest bucket "
                              f"boundary, {self.max_length}) must be in [3, model.bert.max_position="
                              f"{self.model_config.bert.max_position}] (it holds <bos> and <eos>)",
                              key="data.max_length")
        for split in rows.values():
            _check_labels(split, self.model_config.num_classes)
        self.splits = {name: self._encode(split) for name, split in rows.items()}
        self.tokens_per_batch = data.batch_size * data.bucket_boundaries[-1]

    def _encode(self, rows):
        """Token ids (`<bos> ids <eos>` for 'bert') within max_length, and the labels."""
        tok = self.tokenizer
        ids = [tok.encode(text) or [tok.unk_id] for text in rows.texts]
        ids = enforce_max_length(ids, self.max_length - 2 * self.framed, policy=self.cfg.data.overlong,
                                 path=rows.path, lines=rows.lines)
        return ([[tok.bos_id, *x, tok.eos_id] for x in ids] if self.framed else ids), rows.labels

    def make_model(self, rngs) -> TextClassifier:
        return TextClassifier(self.model_config, rngs=rngs)

    def load_pretrained(self, model: TextClassifier, workdir) -> TextClassifier:
        """`model` with its 'bert' backbone replaced by the encoder of the latest checkpoint of `workdir` (a
        `task: mlm` run); every other parameter (the head) stays as built. CheckpointError naming the key and
        both shapes when the architectures differ, or when that run's tokenizer is not this task's."""
        _require_bert(self.model_config.backbone, str(workdir))
        try:
            model.backbone = restore_params(workdir, model.backbone, prefix="encoder",
                                            tokenizer=self.tokenizer.to_json())
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from={str(workdir)!r}: cannot load the pretraining checkpoint's "
                                  f"BERT encoder into backbone 'bert' (model.bert must match the pretraining "
                                  f"run's model): {e}") from None
        return model

    @staticmethod
    def loss_fn(model, batch, dropout_key):
        """Summed example cross-entropy (filler rows weigh 0) with the example count as weight."""
        logits = model(batch["tokens"], batch["lengths"], dropout_key=dropout_key)
        weights = batch["weights"]
        loss_sum = softmax_cross_entropy(logits, batch["labels"], weights=weights).sum()
        correct = ((logits.argmax(-1) == batch["labels"]) * weights).sum()
        return loss_sum, {"weight": weights.sum(), "correct": correct}

    def _batches(self, split: str, *, batch_size: int, shuffle: bool, num_epochs):
        ids, labels = self.splits[split]
        data = self.cfg.data
        return classification_batches(ids, labels, bucket_boundaries=data.bucket_boundaries,
                                      batch_size=batch_size, pad_id=self.tokenizer.pad_id, seed=self.cfg.train.seed,
                                      shuffle=shuffle, num_epochs=num_epochs)

    def train_iterator(self):
        return self._batches("train", batch_size=self.cfg.data.batch_size, shuffle=True, num_epochs=None)

    def eval_iterator(self, split: str):
        if split not in self.splits:
            raise DataError(f"no {split!r} split: set data.{split}=PATH")
        return self._batches(split, batch_size=self.cfg.data.eval_batch_size, shuffle=False, num_epochs=1)

    def model_flops_per_step(self) -> float:
        """Not modelled for classifiers (their FLOPs depend on the backbone); reported as 0."""
        return 0.0
