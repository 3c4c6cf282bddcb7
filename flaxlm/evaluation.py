"""Evaluation metrics computed on the host from predictions: BLEU, perplexity, classification report.

    corpus_bleu(hypotheses, references)            sacreBLEU corpus score (0-100), default 13a tokenization
    perplexity(mean_loss)                          exp of a mean per-token cross-entropy (nats)
    classification_report(predictions, labels, C)  accuracy, per-class and macro precision/recall/F1

Precision, recall and F1 of a class with no predictions, no examples, or both are 0 (scikit-learn's
`zero_division=0`); macro averages are unweighted means over all `num_classes` classes.
"""

import math
from collections.abc import Sequence

import numpy as np

from flaxlm.errors import FlaxlmError


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of one hypothesis per reference (one reference each), as sacreBLEU reports it (0-100)."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise FlaxlmError("corpus_bleu takes sequences of sentences, got a single string")
    if len(hypotheses) != len(references):
        raise FlaxlmError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise FlaxlmError("corpus_bleu: no sentences to score")
    import sacrebleu  # imported here: it needs a writable temp dir at import, which a full disk may not give

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def perplexity(mean_loss: float) -> float:
    """exp(mean per-token cross-entropy in nats); inf when that overflows."""
    mean_loss = float(mean_loss)
    if math.isnan(mean_loss) or mean_loss < 0:
        raise FlaxlmError(f"perplexity needs a mean cross-entropy >= 0, got {mean_loss}")
    return math.exp(mean_loss) if mean_loss < 709.0 else math.inf


def classification_report(predictions, labels, num_classes: int) -> dict:
    """Accuracy and precision/recall/F1 per class and macro-averaged, from integer predictions and labels [N].

    Returns {"accuracy": float, "precision": [C], "recall": [C], "f1": [C], "support": [C] (examples per
    class), "macro_precision", "macro_recall", "macro_f1"} with plain Python numbers.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise FlaxlmError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise FlaxlmError(f"predictions {predictions.shape} and labels {labels.shape} must both have shape [N]")
    if predictions.size == 0:
        raise FlaxlmError("classification_report: no examples")
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.dtype.kind not in "iu":
            raise FlaxlmError(f"{name} must be integer class ids, got dtype {values.dtype}")
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise FlaxlmError(f"{name}[{i}] = {values[i]} is outside [0, num_classes={num_classes})")
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros(num_classes), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(num_classes), where=both > 0)
    return {
        "accuracy": float(true_positive.sum() / labels.size),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }
