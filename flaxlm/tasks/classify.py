"""Sentence classification (SST-2 style TSV files) with TextClassifier.

Training batches are bucketed by length (`data.bucket_boundaries`) so the step compiles once per bucket;
sentences longer than `data.max_length` are truncated with a warning or rejected (`data.overlong`).
`data.label_fraction` < 1 keeps a fixed random subset of the training labels (low-resource runs).
"""

import numpy as np

from flaxlm.data.pipelines import classification_batches
from flaxlm.data.sources import enforce_max_length, read_tsv_labeled
from flaxlm.data.tokenizers import train_tokenizer
from flaxlm.errors import DataError
from flaxlm.experiment import ExperimentConfig, model_config
from flaxlm.models.classifier import ClassifierConfig, TextClassifier
from flaxlm.ops.losses import softmax_cross_entropy


def _check_labels(rows, num_classes: int) -> None:
    """DataError naming the file and line of the first label outside [0, num_classes)."""
    for label, line in zip(rows.labels, rows.lines):
        if label >= num_classes:
            raise DataError(f"label {label} is outside the model's {num_classes} classes (model.num_classes)",
                            rows.path, line)


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
        self.model_config = model_config(ClassifierConfig, cfg.model, vocab_size=self.tokenizer.vocab_size,
                                         num_classes=cfg.model.get("num_classes", max(2, seen_classes)))
        for split in rows.values():
            _check_labels(split, self.model_config.num_classes)
        self.splits = {name: self._encode(split) for name, split in rows.items()}
        self.tokens_per_batch = data.batch_size * data.bucket_boundaries[-1]

    def _encode(self, rows):
        ids = [self.tokenizer.encode(text) or [self.tokenizer.unk_id] for text in rows.texts]
        ids = enforce_max_length(ids, min(self.cfg.data.max_length, self.cfg.data.bucket_boundaries[-1]),
                                 policy=self.cfg.data.overlong, path=rows.path, lines=rows.lines)
        return ids, rows.labels

    def make_model(self, rngs) -> TextClassifier:
        return TextClassifier(self.model_config, rngs=rngs)

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
