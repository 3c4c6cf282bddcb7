"""task: mlm: sentences from TSV, plain and gzipped text, <bos>/<eos> framing and chunking, masking in the loss
(fresh per step, fixed in evaluation), and a short BertMLM run through the trainer that learns."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.errors import ConfigError, DataError
from flaxlm.experiment import load_experiment
from flaxlm.metrics_log import read_metrics
from flaxlm.models.bert import BertConfig, BertMLM, mask_tokens
from flaxlm.ops.losses import softmax_cross_entropy
from flaxlm.tasks import build_task
from flaxlm.tasks.mlm import EVAL_MASK_SEED, MLMTask, prediction_slots, read_sentences, selected_logits
from flaxlm.trainer import train

WORDS = "the a film plot was good bad dull fine actor story scene".split()


def write_corpus(root) -> dict:
    """A labelled train TSV, a plain-text extra file, a gzipped one (with a long line) and a dev TSV.

    Sentences run through WORDS cyclically from a random start, so a masked word follows from its neighbours."""
    rng = np.random.default_rng(0)

    def sentence(n):
        start = rng.integers(len(WORDS))
        return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))

    (root / "train.tsv").write_text("label\tsentence\n" + "".join(f"{i % 2}\t{sentence(3 + i % 6)}\n"
                                                                    for i in range(40)))
    (root / "extra.txt").write_text("".join(f"{sentence(4 + i % 5).upper()}\n\n" for i in range(20)))
    with gzip.open(root / "extra.txt.gz", "wt") as f:
        f.write(sentence(30) + "\n" + sentence(5) + "\n")
    (root / "dev.tsv").write_text("label\tcontent\n" + "".join(f"{i % 2}\t{sentence(4 + i % 4)}\n" for i in range(12)))
    return {name: root / name for name in ("train.tsv", "extra.txt", "extra.txt.gz", "dev.tsv")}


def mlm_config(tmp_path, *, steps=40, hidden=16, layers=1, extra=True, tokenizer="word", overrides=()):
    files = write_corpus(tmp_path)
    extra_text = f"[{files['extra.txt']}, {files['extra.txt.gz']}]" if extra else "[]"
    path = tmp_path / "mlm.yaml"
    path.write_text(f"""\
task: mlm
model: {{hidden_size: {hidden}, num_layers: {layers}, num_heads: 2, intermediate_size: 32, max_position: 16,
         dropout: 0.0}}
data: {{train: {files['train.tsv']}, valid: {files['dev.tsv']}, extra_text: {extra_text}, tokenizer: {tokenizer},
        vocab_size: 300, batch_size: 8, bucket_boundaries: [16], max_length: 16, eval_batch_size: 16,
        mask_prob: 0.3}}
optim: {{name: adam, learning_rate: 0.01}}
train: {{steps: {steps}, log_every: 10, eval_every: 20, checkpoint_every: 20, progress: false, seed: 3}}
""")
    return load_experiment(path, list(overrides))


def test_read_sentences_of_tsv_plain_and_gzip(tmp_path):
    files = write_corpus(tmp_path)
    train = read_sentences(files["train.tsv"])
    assert len(train) == 40 and all("\t" not in s and not s[0].isdigit() for s in train)
    assert len(read_sentences(files["extra.txt"])) == 20  # blank lines skipped
    assert [len(s.split()) for s in read_sentences(files["extra.txt.gz"])] == [30, 5]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="blank.txt: no sentences"):
        read_sentences(tmp_path / "blank.txt")


def test_sequences_are_framed_chunked_and_cover_all_text(tmp_path):
    task = build_task(mlm_config(tmp_path))
    tok = task.tokenizer
    assert tok.kind == "word" and tok.mask_id == 4 and tok.lowercase
    assert set(task.special_ids) == {0, 1, 2, 3, 4}
    train = task.splits["train"]
    assert all(s[0] == tok.bos_id and s[-1] == tok.eos_id and len(s) <= 16 for s in train)
    # 40 TSV rows + 20 lines + the 30-word line in 3 chunks of <= 14 words + the 5-word line.
    assert len(train) == 40 + 20 + 3 + 1
    words = [i for s in train for i in s[1:-1]]
    expected = [w for path in ("train.tsv", "extra.txt", "extra.txt.gz") for s in read_sentences(tmp_path / path)
                for w in tok.encode(s)]
    assert words == expected  # chunking drops and reorders nothing
    assert tok.unk_id not in words  # extra text (upper case) is lower-cased like the train text
    assert len(task.splits["valid"]) == 12


def test_mask_token_and_tokenizer_kinds(tmp_path):
    bpe = build_task(mlm_config(tmp_path, tokenizer="bpe"))
    assert bpe.tokenizer.kind == "bpe" and bpe.tokenizer.mask_id == 4
    with pytest.raises(ConfigError, match="data.tokenizer: task 'mlm' needs a tokenizer with special tokens"):
        build_task(mlm_config(tmp_path, tokenizer="char"))
    no_mask = build_task(mlm_config(tmp_path, tokenizer="word", overrides=["data.extra_text=[]"])).tokenizer
    no_mask.mask_id = None
    with pytest.raises(DataError, match="no <mask> token"):
        MLMTask(mlm_config(tmp_path), no_mask)
    with pytest.raises(ConfigError, match=r"data.max_length: the longest sequence .*16\) exceeds model.max_position=8"):
        build_task(mlm_config(tmp_path, overrides=["model.max_position=8"]))


def test_loss_masks_fresh_per_key_and_fixed_in_evaluation(tmp_path):
    task = build_task(mlm_config(tmp_path))
    model = task.make_model(nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in next(task.eval_iterator("valid")).items()}
    # The masking of evaluation, redone here: the loss must be BertMLM's full logits' cross-entropy at the selection.
    mask_key = jax.random.fold_in(jax.random.key(EVAL_MASK_SEED), batch["tokens"].sum())
    inputs, selected = mask_tokens(batch["tokens"], mask_key, mask_id=4, vocab_size=task.model_config.vocab_size,
                                   special_ids=task.special_ids, mask_prob=0.3)

    @jax.jit
    def run(model):
        losses = [task.loss_fn(model, batch, key) for key in (None, None, jax.random.key(1), jax.random.key(2))]
        return losses, model(inputs, lengths=batch["tokens_lengths"])

    (first, second, a, b), logits = run(model)
    assert first[0] == second[0] and first[1]["weight"] == second[1]["weight"]
    real = int(batch["tokens_lengths"].sum()) - 2 * int((batch["tokens_lengths"] > 0).sum())
    assert 0 < first[1]["weight"] < real  # only real, non-special tokens are targets
    assert a[0] != b[0] and a[0] != first[0]  # training masks afresh with every key
    expected = softmax_cross_entropy(logits, batch["tokens"], weights=selected.astype(jnp.float32)).sum()
    np.testing.assert_allclose(first[0], expected, rtol=1e-6)
    correct = ((logits.argmax(-1) == batch["tokens"]) & selected).sum()
    assert first[1]["weight"] == selected.sum() and first[1]["correct"] == correct


def test_prediction_slots_gather_the_selected_logits():
    assert prediction_slots(1024, 0.15) == 201 and prediction_slots(4, 0.5) == 4
    cfg = BertConfig(vocab_size=17, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position=16)
    model = BertMLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    selected = jnp.array([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]], bool)

    @jax.jit
    def run(model):
        hidden = model.encode(tokens)
        return model(tokens), selected_logits(model, hidden, selected, 6), selected_logits(model, hidden, selected, 3)

    full, (logits, index, used), (_, first3, used3) = run(model)
    assert index.tolist() == [1, 4, 6, 11, 0, 0] and used.tolist() == [True] * 4 + [False] * 2
    np.testing.assert_allclose(logits[:4], full.reshape(12, 17)[index[:4]], rtol=1e-6, atol=1e-6)
    assert first3.tolist() == [1, 4, 6] and used3.all()  # more selected than slots: the first 3 are predicted


def test_mlm_trains_through_the_trainer(tmp_path):
    cfg = mlm_config(tmp_path, steps=300, hidden=32, overrides=["optim.learning_rate=0.003", "train.log_every=50",
                                                                 "train.eval_every=150"])
    result = train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [50, 100, 150, 200, 250, 300]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [150, 300]
    assert result == {k: evals[-1][k] for k in ("eval/loss", "eval/accuracy")}
    # Below the unigram entropy of the 12 words (log 12 = 2.48): the model predicts masked words from context.
    assert evals[-1]["eval/loss"] < 2.0 < evals[0]["eval/loss"] and evals[-1]["eval/accuracy"] > 0.3
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.5
    assert (tmp_path / "run" / "tokenizer.json").exists()
