"""TranslateTask on tiny parallel files: reading PREFIX.LANG(.gz), errors naming the file or key, the shared
tokenizer, the loss (and its unsmoothed `nll`) against a direct computation, BLEU of `extra_metrics` against the
translate path, and `translate` on empty, unknown and overlong input. Models are untrained and tiny."""

import gzip
import pathlib
import random

import jax
import numpy as np
import pytest
from flax import nnx

from flaxlm.errors import ConfigError, DataError
from flaxlm.evaluation import corpus_bleu
from flaxlm.experiment import DataConfig, ExperimentConfig, TrainConfig
from flaxlm.ops.losses import sequence_cross_entropy
from flaxlm.tasks.translate import TranslateTask

GERMAN = "ein eine der die das hund katze mann frau kind läuft spielt sitzt auf dem im park wasser ball rot".split()
ENGLISH = "a a the the the dog cat man woman child runs plays sits on the in park water ball red".split()
TRANSFORMER = {"arch": "transformer", "d_model": 16, "num_heads": 2, "num_encoder_layers": 1,
               "num_decoder_layers": 1, "mlp_dim": 32, "dropout": 0.1, "max_length": 32}
SEQ2SEQ = {"arch": "seq2seq", "src_embed_dim": 8, "tgt_embed_dim": 8, "hidden_size": 16, "num_layers": 1,
           "attention": "luong", "dropout": 0.1}


def sentence_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Word-for-word 'translations' of 2-6 word sentences."""
    rng = random.Random(seed)
    lexicon = dict(zip(GERMAN, ENGLISH))
    pairs = []
    for _ in range(n):
        words = [rng.choice(GERMAN) for _ in range(rng.randint(2, 6))]
        pairs.append((" ".join(words) + " .", " ".join(lexicon[w] for w in words) + " ."))
    return pairs


def write_split(root: pathlib.Path, name: str, pairs, *, gzip_target: bool = False) -> str:
    """Files root/name.de (plain) and root/name.en (or .en.gz); returns the prefix."""
    (root / f"{name}.de").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    target = "".join(t + "\n" for _, t in pairs).encode("utf-8")
    if gzip_target:
        (root / f"{name}.en.gz").write_bytes(gzip.compress(target))
    else:
        (root / f"{name}.en").write_bytes(target)
    return str(root / name)


def make_cfg(train: str, valid: str, model: dict, **data) -> ExperimentConfig:
    options = dict(train=train, valid=valid, source_lang="de", target_lang="en", tokenizer="word", batch_size=4,
                   bucket_boundaries=(8, 12), max_length=12, eval_batch_size=4)
    return ExperimentConfig(task="translate", model=model, data=DataConfig(**{**options, **data}),
                            train=TrainConfig(seed=0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    train = write_split(root, "train", sentence_pairs(40, 0), gzip_target=True)
    valid = write_split(root, "valid", sentence_pairs(9, 1))
    return root, train, valid


@pytest.fixture(scope="module", params=["transformer", "seq2seq"])
def task_and_model(request, corpus):
    _, train, valid = corpus
    model = dict(TRANSFORMER if request.param == "transformer" else SEQ2SEQ)
    task = TranslateTask(make_cfg(train, valid, model))
    return task, task.make_model(nnx.Rngs(0))


def test_task_reads_plain_and_gzipped_files_with_one_shared_tokenizer(corpus):
    root, train, valid = corpus
    task = TranslateTask(make_cfg(train, valid, TRANSFORMER))
    tok = task.tokenizer
    assert task.references["valid"] == (root / "valid.en").read_text(encoding="utf-8").splitlines()
    assert len(task.splits["train"][0]) == len(task.splits["train"][1]) == 40
    # Source and target words share one vocabulary: German and English words both have their own ids.
    assert tok.unk_id not in tok.encode("hund läuft") + tok.encode("dog runs")
    assert task.model_config.src_vocab_size == task.model_config.tgt_vocab_size == tok.vocab_size
    batch = next(task.train_iterator())
    assert set(batch) == {"src", "src_lengths", "tgt_in", "tgt_out", "tgt_lengths", "tgt_mask", "weights"}
    assert (batch["tgt_in"][:, 0] == tok.bos_id).all()
    ends = batch["tgt_out"][np.arange(4), batch["tgt_lengths"] - 1]
    assert (ends == tok.eos_id).all()


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_bpe_tokenizer_round_trips_both_languages(corpus):
    _, train, valid = corpus
    task = TranslateTask(make_cfg(train, valid, TRANSFORMER, tokenizer="bpe", vocab_size=300))
    for text in ("ein hund läuft im park .", "a dog runs in the park ."):
        assert task.tokenizer.decode(task.tokenizer.encode(text)) == text


def test_missing_file_names_both_candidates(corpus, tmp_path):
    _, train, _ = corpus
    with pytest.raises(DataError) as info:
        TranslateTask(make_cfg(train, str(tmp_path / "nope"), TRANSFORMER))
    message = str(info.value)
    assert "data.valid" in message and f"{tmp_path / 'nope'}.de" in message and f"{tmp_path / 'nope'}.de.gz" in message


def test_line_count_mismatch_names_both_files(corpus, tmp_path):
    _, train, _ = corpus
    valid = write_split(tmp_path, "valid", sentence_pairs(3, 2))
    (tmp_path / "valid.en").write_text("a dog .\n")
    with pytest.raises(DataError, match="differ in line count") as info:
        TranslateTask(make_cfg(train, valid, TRANSFORMER))
    assert f"{valid}.de has 3 lines" in str(info.value) and f"{valid}.en has 1" in str(info.value)


@pytest.mark.parametrize("model, data, key, needle", [
    (TRANSFORMER, {"source_lang": None}, "data.source_lang", "language suffix"),
    (TRANSFORMER, {"target_lang": ""}, "data.target_lang", "language suffix"),
    ({k: v for k, v in TRANSFORMER.items() if k != "arch"}, {}, "model.arch", "seq2seq, transformer"),
    ({**TRANSFORMER, "arch": "rnn"}, {}, "model.arch", "'rnn'"),
    ({**TRANSFORMER, "label_smoothing": 1.5}, {}, "model.label_smoothing", "[0, 1)"),
    ({**TRANSFORMER, "teacher_forcing_ratio": 0.5}, {}, "model.teacher_forcing_ratio", "seq2seq only"),
    ({**SEQ2SEQ, "teacher_forcing_ratio": 2}, {}, "model.teacher_forcing_ratio", "[0, 1]"),
    ({**TRANSFORMER, "max_length": 20}, {}, "model.max_length", "largest bucket + 10 = 22, got 20"),
    ({**TRANSFORMER, "src_vocab_size": 7}, {}, "model.src_vocab_size", "set by the data"),
    (TRANSFORMER, {"tokenizer": "char"}, "data.tokenizer", "'word' or 'bpe'"),
])
def test_config_errors_name_the_key(model, data, key, needle, corpus):
    _, train, valid = corpus
    with pytest.raises(ConfigError) as info:
        TranslateTask(make_cfg(train, valid, model, **data))
    assert info.value.key == key and needle in str(info.value), str(info.value)


def test_overlong_sentences_are_truncated_with_a_warning_or_rejected(corpus, tmp_path):
    _, _, valid = corpus
    pairs = sentence_pairs(6, 3)
    pairs[4] = (" ".join(["hund"] * 20), "dog .")
    train = write_split(tmp_path, "train", pairs)
    with pytest.warns(UserWarning, match=r"train\.de: truncated 1 sequence\(s\) to max_length 12 \(first at line 5\)"):
        task = TranslateTask(make_cfg(train, valid, TRANSFORMER))
    assert len(task.splits["train"][0][4]) == 12
    with pytest.raises(DataError, match=r"train\.de:5: 20 tokens exceed max_length 12"):
        TranslateTask(make_cfg(train, valid, TRANSFORMER, overlong="reject"))


def test_loss_fn_is_the_summed_smoothed_token_cross_entropy(corpus):
    _, train, valid = corpus
    task = TranslateTask(make_cfg(train, valid, {**TRANSFORMER, "label_smoothing": 0.1}))
    model = task.make_model(nnx.Rngs(0))
    batch = next(task.eval_iterator("valid"))
    loss_sum, aux = task.loss_fn(model, batch, None)
    logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"])
    want_sum, want_count = sequence_cross_entropy(logits, batch["tgt_out"], batch["tgt_mask"], label_smoothing=0.1)
    np.testing.assert_allclose(loss_sum, want_sum, rtol=1e-6)
    nll, _ = sequence_cross_entropy(logits, batch["tgt_out"], batch["tgt_mask"])
    np.testing.assert_allclose(aux["nll"], nll, rtol=1e-6)
    assert float(aux["weight"]) == float(want_count) == batch["tgt_mask"].sum()
    correct = ((np.asarray(logits).argmax(-1) == batch["tgt_out"]) * batch["tgt_mask"]).sum()
    assert float(aux["correct"]) == correct


def test_seq2seq_teacher_forcing_key_comes_from_the_dropout_key(corpus):
    _, train, valid = corpus
    task = TranslateTask(make_cfg(train, valid, {**SEQ2SEQ, "teacher_forcing_ratio": 0.5}))
    model = task.make_model(nnx.Rngs(0))
    batch = next(task.train_iterator())
    key = jax.random.key(3)
    loss_sum, aux = task.loss_fn(model, batch, key)
    dropout_key, forcing_key = jax.random.split(key)
    logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"], teacher_forcing_ratio=0.5,
                   teacher_forcing_key=forcing_key, dropout_key=dropout_key)
    want, _ = sequence_cross_entropy(logits, batch["tgt_out"], batch["tgt_mask"])
    np.testing.assert_allclose(loss_sum, want, rtol=1e-6)
    # Evaluation (no key) feeds the references: the plain teacher-forced loss.
    eval_sum, _ = task.loss_fn(model, batch, None)
    np.testing.assert_allclose(eval_sum, sequence_cross_entropy(
        model(batch["src"], batch["src_lengths"], batch["tgt_in"]), batch["tgt_out"], batch["tgt_mask"])[0], rtol=1e-6)


def test_extra_metrics_bleu_matches_the_translate_path(task_and_model, corpus):
    root, _, _ = corpus
    task, model = task_and_model
    metrics = task.extra_metrics(model, "valid")
    sources = (root / "valid.de").read_text(encoding="utf-8").splitlines()
    hypotheses = task.translate(model, sources, beam_size=1)
    assert metrics == {"bleu": pytest.approx(corpus_bleu(hypotheses, task.references["valid"]), abs=1e-9)}
    with pytest.raises(DataError, match="data.test=PREFIX"):
        task.extra_metrics(model, "test")


def test_translate_handles_empty_unknown_and_overlong_lines(task_and_model):
    task, model = task_and_model
    lines = ["ein hund läuft .", "", "   ", "der ☃ zebra \ud800 spielt", " ".join(["katze"] * 30)]
    with pytest.warns(UserWarning, match=r"stdin: truncated 1 sequence\(s\) to max_length 12 \(first at line 5\)"):
        outputs = task.translate(model, lines, beam_size=1, source="stdin")
    assert len(outputs) == 5 and outputs[1] == outputs[2] == ""
    assert all(isinstance(line, str) and "\n" not in line for line in outputs)
    # The same sentence alone or in a batch translates the same; the truncated line equals its first 12 words.
    assert task.translate(model, [lines[0]], beam_size=1) == outputs[:1]
    assert task.translate(model, [" ".join(["katze"] * 12)], beam_size=1) == outputs[4:]


def test_beam_search_returns_one_line_per_input_and_beam_1_is_greedy(task_and_model):
    task, model = task_and_model
    src = [task.tokenizer.encode(s) for s in ("ein hund .", "die frau spielt im park .")]
    greedy = task.generate(model, src)
    assert task.generate(model, src, beam_size=1) == greedy
    beams = task.generate(model, src, beam_size=3, length_penalty=0.6)
    assert len(beams) == 2
    assert all(len(ids) <= task.output_limit(len(s)) for ids, s in zip(beams + greedy, src + src))
    assert all(task.tokenizer.eos_id not in ids for ids in beams + greedy)
