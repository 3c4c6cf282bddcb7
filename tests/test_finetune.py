"""Fine-tuning a classifier from a masked-LM run (`train.init_from`): the backbone starts exactly at the pretrained
encoder, the head as freshly built, the tokenizer is the pretraining one; mismatches are clear errors; a resumed
fine-tune continues from its own checkpoint, not from the pretrained weights."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from flaxlm.checkpoint import CheckpointError, restore_params
from flaxlm.data.tokenizers import load_tokenizer
from flaxlm.errors import ConfigError
from flaxlm.experiment import load_experiment
from flaxlm.tasks import build_task
from flaxlm.trainer import build_run, train

BERT = "{hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32, max_position: 16, dropout: 0.1}"
WORDS = "the a film plot was good bad dull fine actor story scene".split()


def write_tsv(path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lines = [f"{i % 2}\t{' '.join(rng.choice(WORDS, 3 + i % 6))}" for i in range(rows)]
    path.write_text("label\tsentence\n" + "\n".join(lines) + "\n")


def mlm_config(root):
    path = root / "mlm.yaml"
    path.write_text(f"""\
task: mlm
model: {BERT}
data: {{train: {root / 'train.tsv'}, valid: {root / 'dev.tsv'}, extra_text: [{root / 'extra.txt'}], tokenizer: word,
        batch_size: 8, bucket_boundaries: [16], max_length: 16, eval_batch_size: 16}}
optim: {{name: adam, learning_rate: 0.01}}
train: {{steps: 6, log_every: 3, eval_every: 6, checkpoint_every: 6, progress: false, seed: 3}}
""")
    return load_experiment(path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 6-step MLM run on labelled sentences (labels unused) and one extra text file: (data directory, workdir)."""
    root = tmp_path_factory.mktemp("mlm")
    write_tsv(root / "train.tsv", 40, seed=0)
    write_tsv(root / "dev.tsv", 12, seed=1)
    (root / "extra.txt").write_text("the story was dull\nthe actor was superb\n")
    train(mlm_config(root), root / "run")
    return root, root / "run"


def finetune_config(pretrained, *, bert=BERT, backbone="bert", init_from=None, overrides=()):
    root, workdir = pretrained
    model = f"{{backbone: bert, pooling: cls, dropout: 0.1, bert: {bert}}}" if backbone == "bert" else \
        f"{{backbone: {backbone}, pooling: max, embed_dim: 16, hidden_size: 16}}"
    path = root / "finetune.yaml"
    path.write_text(f"""\
task: classify
model: {model}
data: {{train: {root / 'train.tsv'}, valid: {root / 'dev.tsv'}, tokenizer: word, batch_size: 8,
        bucket_boundaries: [16], max_length: 16, eval_batch_size: 16}}
optim: {{name: adam, learning_rate: 0.001}}
train: {{steps: 6, log_every: 3, eval_every: 3, checkpoint_every: 3, progress: false, seed: 5,
         init_from: {init_from or workdir}}}
""")
    return load_experiment(path, list(overrides))


def leaves(module):
    return jax.tree.leaves(nnx.state(module))


def assert_bit_equal(a, b):
    assert len(leaves(a)) == len(leaves(b))
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_backbone_is_the_pretrained_encoder_and_the_head_is_fresh(pretrained):
    cfg = finetune_config(pretrained)
    run = build_run(cfg)
    model = run.state.model
    # The pretraining run's whole BertMLM, restored independently: its encoder is what the backbone must hold.
    mlm_task = build_task(mlm_config(pretrained[0]), load_tokenizer(pretrained[1] / "tokenizer.json"))
    mlm = restore_params(pretrained[1], mlm_task.make_model(nnx.Rngs(0)))
    assert_bit_equal(model.backbone, mlm.encoder)
    # The head is exactly that of a classifier built with the run's seed and nothing loaded, whose backbone differs.
    fresh = run.task.make_model(nnx.Rngs(cfg.train.seed))
    assert_bit_equal(model.head, fresh.head)
    assert not np.array_equal(fresh.backbone.token_embed.embedding[...], model.backbone.token_embed.embedding[...])
    # The tokenizer is the pretraining one (with its <mask>), not one trained on the labelled sentences.
    assert run.task.tokenizer.to_json() == mlm_task.tokenizer.to_json() and run.task.tokenizer.mask_id == 4
    tokens, _ = run.task.splits["train"]
    tok = run.task.tokenizer
    assert tokens[0] == [tok.bos_id, *tok.encode(read_first_sentence(pretrained[0] / "train.tsv")), tok.eos_id]


def read_first_sentence(path):
    return path.read_text().splitlines()[1].split("\t")[1]


@pytest.mark.parametrize("bert, key, saved, wanted", [
    (BERT.replace("hidden_size: 16", "hidden_size: 32"), "model/encoder/embed_norm/bias/value", "(16,)", "(32,)"),
    (BERT.replace("num_layers: 1", "num_layers: 2"), "model/encoder/layers/", "(1, ", "(2, "),
])
def test_another_architecture_is_a_clear_error(pretrained, bert, key, saved, wanted):
    task = build_task(finetune_config(pretrained, bert=bert))
    abstract = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0)))  # shapes suffice: checked before any read
    with pytest.raises(CheckpointError) as e:
        task.load_pretrained(abstract, pretrained[1])
    message = str(e.value)
    assert f"train.init_from={str(pretrained[1])!r}" in message and "pretraining checkpoint" in message
    assert key in message and f"checkpoint shape {saved}" in message and f"template shape {wanted}" in message


def test_config_errors_name_the_key(pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"train.init_from: .*only backbone 'bert' can start from a pretrained run"):
        build_task(finetune_config(pretrained, backbone="lstm"))
    with pytest.raises(ConfigError, match=r"train.init_from: .* has no tokenizer.json"):
        build_task(finetune_config(pretrained, init_from=tmp_path))
    with pytest.raises(ConfigError, match=r"data.tokenizer: is 'bpe' but the pretraining run .* used a 'word'"):
        build_task(finetune_config(pretrained, overrides=["data.tokenizer=bpe"]))
    with pytest.raises(ConfigError, match=r"model.bert.vocab_size: is set by the data \(18\), got 99"):
        build_task(finetune_config(pretrained, bert=BERT.replace("{", "{vocab_size: 99, ")))  # 13 words, 5 specials


def test_from_scratch_trains_its_own_tokenizer(pretrained):
    task = build_task(finetune_config(pretrained, overrides=["train.init_from=null"]))
    assert task.tokenizer.mask_id is None and task.model_config.bert.vocab_size == task.tokenizer.vocab_size
    assert all(s[0] == task.tokenizer.bos_id and s[-1] == task.tokenizer.eos_id for s in task.splits["valid"][0])


def test_resumed_finetune_continues_from_its_own_checkpoint(pretrained, tmp_path):
    cfg = finetune_config(pretrained)
    train(cfg, tmp_path / "straight")  # checkpoints at steps 3 and 6
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    # Resumes at step 3: build_run loads the pretrained encoder, then the step-3 checkpoint replaces all of it.
    train(cfg, tmp_path / "resumed")
    template = build_task(cfg).make_model(nnx.Rngs(0))
    straight = restore_params(tmp_path / "straight", template)
    assert_bit_equal(restore_params(tmp_path / "resumed", template), straight)
    pretrained_encoder = restore_params(pretrained[1], template.backbone, prefix="encoder")
    assert not np.array_equal(straight.backbone.pooler.kernel[...], pretrained_encoder.pooler.kernel[...])
    assert (load_tokenizer(tmp_path / "straight" / "tokenizer.json").to_json()
            == load_tokenizer(pretrained[1] / "tokenizer.json").to_json())
    # A classifier run is no pretraining run: it has no encoder subtree to start from.
    with pytest.raises(CheckpointError, match=r"has no 'model/encoder' subtree"):
        build_run(finetune_config(pretrained, init_from=tmp_path / "straight"))
