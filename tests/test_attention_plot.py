"""Attention maps: translation cross-attention (Transformer layers, Seq2Seq Luong) with rows summing to 1 over the
real source tokens and matching the model's own weights; a transformer classifier's recomputed encoder pass equals
its backbone; errors for maps that do not exist; the PNG writer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.attention_plot import AttentionMap, attention_map, plot_attention, token_labels
from flaxlm.errors import FlaxlmError
from flaxlm.experiment import DataConfig, ExperimentConfig
from flaxlm.tasks.classify import ClassifyTask
from flaxlm.tasks.translate import TranslateTask

PAIRS = [("ein hund läuft .", "a dog runs ."), ("die katze sitzt im park .", "the cat sits in the park ."),
         ("der mann spielt ball .", "the man plays ball ."), ("eine frau läuft .", "a woman runs .")]
TRANSFORMER = {"arch": "transformer", "d_model": 16, "num_heads": 2, "num_encoder_layers": 1,
               "num_decoder_layers": 2, "mlp_dim": 32, "max_length": 32}


def translate_task(tmp_path, model: dict) -> TranslateTask:
    for lang, column in (("de", 0), ("en", 1)):
        (tmp_path / f"train.{lang}").write_text("".join(p[column] + "\n" for p in PAIRS), encoding="utf-8")
    data = DataConfig(train=str(tmp_path / "train"), valid=str(tmp_path / "train"), source_lang="de",
                      target_lang="en", tokenizer="word", batch_size=2, bucket_boundaries=(8,), max_length=8)
    return TranslateTask(ExperimentConfig(task="translate", model=model, data=data))


def test_transformer_cross_attention_per_layer(tmp_path):
    task = translate_task(tmp_path, TRANSFORMER)
    model = task.make_model(nnx.Rngs(0))
    amap = attention_map(task, model, "ein hund läuft .")
    assert amap.columns == ["ein", "hund", "läuft", "."]
    assert amap.rows[-1] == "</s>" or len(amap.rows) == task.output_limit(4)
    assert amap.weights.shape == (len(amap.rows), 4)
    np.testing.assert_allclose(amap.weights.sum(-1), 1.0, rtol=1e-5)
    # The last layer is the default; layer 0 is the heads' mean of the model's own weights for that layer.
    first = attention_map(task, model, "ein hund läuft .", layer=0)
    assert "layer 1" in amap.title and "layer 0" in first.title
    out = task.generate(model, [task.tokenizer.encode("ein hund läuft .")])[0]
    tgt_in = jnp.asarray([[task.tokenizer.bos_id] + out[:len(amap.rows) - 1]])
    src = jnp.asarray([task.tokenizer.encode("ein hund läuft .")])
    _, weights = model.decode(tgt_in, model.encode(src), None, return_attention=True)
    np.testing.assert_allclose(first.weights, np.asarray(weights[0, 0].mean(0)), atol=1e-6)
    with pytest.raises(FlaxlmError, match=r"--layer 2 is out of range: the model has 2 decoder layers \(0 to 1\)"):
        attention_map(task, model, "ein hund", layer=2)
    with pytest.raises(FlaxlmError, match="--text is empty"):
        attention_map(task, model, "  ")


def test_seq2seq_attention_and_its_absence(tmp_path):
    model_cfg = {"arch": "seq2seq", "src_embed_dim": 8, "tgt_embed_dim": 8, "hidden_size": 8, "num_layers": 1}
    task = translate_task(tmp_path, {**model_cfg, "attention": "luong"})
    model = task.make_model(nnx.Rngs(0))
    # Unknown words are <unk>, never an error.
    amap = attention_map(task, model, "die zebra sitzt")
    assert amap.columns == ["die", "<unk>", "sitzt"] and "luong" in amap.title
    np.testing.assert_allclose(amap.weights.sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(FlaxlmError, match="--layer applies to Transformer runs"):
        attention_map(task, model, "die katze", layer=0)
    task = translate_task(tmp_path, {**model_cfg, "attention": "none"})
    with pytest.raises(FlaxlmError, match="attention='none'"):
        attention_map(task, task.make_model(nnx.Rngs(0)), "die katze")


def classify_task(tmp_path, backbone: str) -> ClassifyTask:
    (tmp_path / "train.tsv").write_text("label\tsentence\n0\ta dull film\n1\ta fine warm film\n")
    model = {"backbone": backbone, "embed_dim": 16, "num_layers": 2, "num_heads": 2, "mlp_dim": 32,
             "max_length": 16, "pooling": "mean"} if backbone == "transformer" else {"backbone": backbone,
                                                                                       "embed_dim": 8,
                                                                                       "hidden_size": 8}
    data = DataConfig(train=str(tmp_path / "train.tsv"), valid=str(tmp_path / "train.tsv"), tokenizer="word",
                      batch_size=2, bucket_boundaries=(8,), max_length=8)
    return ClassifyTask(ExperimentConfig(task="classify", model=model, data=data))


def test_classifier_self_attention_recomputes_the_backbone(tmp_path):
    task = classify_task(tmp_path, "transformer")
    model = task.make_model(nnx.Rngs(0))
    amap = attention_map(task, model, "A fine film")
    assert amap.rows == amap.columns == ["a", "fine", "film"]
    np.testing.assert_allclose(amap.weights.sum(-1), 1.0, rtol=1e-5)
    assert "encoder layer 1" in amap.title
    # The per-layer recomputation behind the map is the backbone's own forward pass: same hidden states.
    tokens = jnp.asarray([task.tokenizer.encode("a fine film")])
    x = model.embed(tokens) + model.positions(3)
    for i in range(2):
        x = jax.tree.map(lambda a, i=i: a[i], model.backbone.layers)(x)
    assert model.cfg.norm_first
    backbone_out = model.backbone(model.embed(tokens) + model.positions(3))
    np.testing.assert_allclose(model.backbone.final_norm(x), backbone_out, atol=1e-5)
    with pytest.raises(FlaxlmError, match="backbone='transformer', got 'lstm'"):
        lstm = classify_task(tmp_path, "lstm")
        attention_map(lstm, lstm.make_model(nnx.Rngs(0)), "a film")


def test_token_labels_and_png(tmp_path):
    task = translate_task(tmp_path, TRANSFORMER)
    tok = task.tokenizer
    assert token_labels(tok, [tok.bos_id, tok.encode("hund")[0], tok.unk_id, tok.eos_id, tok.pad_id]) == [
        "<s>", "hund", "<unk>", "</s>", "<pad>"]
    amap = AttentionMap(np.full((2, 3), 1 / 3, np.float32), ["a", "</s>"], ["x", "y", "z"], "t", "rows", "cols")
    path = tmp_path / "map.png"
    plot_attention(amap, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(FlaxlmError, match="cannot write the attention plot"):
        plot_attention(amap, tmp_path / "missing" / "map.png")
