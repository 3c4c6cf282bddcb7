"""flaxlm.evaluation: BLEU equals sacreBLEU's own corpus score, perplexity, and classification reports against
hand-computed golden values (scikit-learn's definitions with zero_division=0)."""

import math

import pytest
import sacrebleu

from flaxlm.errors import FlaxlmError
from flaxlm.evaluation import classification_report, corpus_bleu, perplexity

REFERENCES = ["The cat sat on the mat.", "A dog is running in the park.", "Two men play football outside."]


def test_identical_corpus_scores_100():
    assert corpus_bleu(REFERENCES, REFERENCES) == pytest.approx(100.0)


def test_bleu_equals_sacrebleu_corpus_bleu_with_13a_tokenization():
    hypotheses = ["The cat sat on a mat.", "A dog runs in the park!", "Two men are playing soccer."]
    want = sacrebleu.corpus_bleu(hypotheses, [REFERENCES], tokenize="13a").score
    assert corpus_bleu(hypotheses, REFERENCES) == pytest.approx(want, abs=1e-9)
    assert 0.0 < want < 100.0
    # Punctuation is split off by 13a: "mat." and "mat ." score the same.
    assert corpus_bleu(["The cat sat on the mat ."], ["The cat sat on the mat."]) == pytest.approx(100.0)


def test_no_overlap_scores_0_and_bad_arguments_are_named():
    assert corpus_bleu(["xyz uvw"] * 3, REFERENCES) == 0.0
    with pytest.raises(FlaxlmError, match="2 hypotheses but 3 references"):
        corpus_bleu(REFERENCES[:2], REFERENCES)
    with pytest.raises(FlaxlmError, match="single string"):
        corpus_bleu("The cat", "The cat")


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(1e4) == math.inf
    with pytest.raises(FlaxlmError, match=">= 0"):
        perplexity(-0.1)


def test_classification_report_golden_values():
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 2, 2]
    report = classification_report(predictions, labels, 3)
    # class 0: 2 predicted, both right, 3 examples; class 1: 2 predicted, 1 right, 2 examples;
    # class 2: 2 predicted, 1 right, 1 example.
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["precision"] == pytest.approx([1.0, 0.5, 0.5])
    assert report["recall"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert report["f1"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert report["support"] == [3, 2, 1]
    assert report["macro_precision"] == pytest.approx(2 / 3)
    assert report["macro_recall"] == pytest.approx(13 / 18)
    assert report["macro_f1"] == pytest.approx(59 / 90)


def test_classification_report_absent_class_counts_zero_in_the_macro_average():
    report = classification_report([0, 1, 1], [0, 1, 0], 3)
    assert report["precision"] == pytest.approx([1.0, 0.5, 0.0])
    assert report["recall"] == pytest.approx([0.5, 1.0, 0.0])
    assert report["f1"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert report["support"] == [2, 1, 0]
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 3)
    assert report["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("predictions, labels, num_classes, needle", [
    ([0, 3], [0, 1], 3, "predictions[1] = 3 is outside [0, num_classes=3)"),
    ([0, 1], [0, -1], 3, "labels[1] = -1"),
    ([0, 1], [0], 3, "must both have shape [N]"),
    ([], [], 3, "no examples"),
    ([0.5], [0], 2, "integer class ids"),
    ([0], [0], 0, "num_classes must be an integer >= 1"),
])
def test_classification_report_rejects_bad_input(predictions, labels, num_classes, needle):
    with pytest.raises(FlaxlmError) as info:
        classification_report(predictions, labels, num_classes)
    assert needle in str(info.value)
