"""Fuzzing the boundaries that take user input: the experiment config loader and overrides, every model config,
tokenizer files and round trips through them on arbitrary Unicode, token-id decoding, the TSV reader on arbitrary
text, the max-length policy, the LM batchers and checkpoint metadata. Whatever the input, the only exception
allowed out is flaxlm's own (`flaxlm.errors.FlaxlmError` and its subclasses).

Fuzz tests of the generic config loader, the byte-level TSV/parallel/text readers, bucketing and the tokenizers'
in-memory round trips live beside their code (tests/test_config.py, tests/data/).
"""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxlm.checkpoint import CheckpointError, Checkpointer, checkpoint_dir
from flaxlm.config import from_dict, to_dict
from flaxlm.data.pipelines import lm_sequential, lm_windows, packed_lm
from flaxlm.data.sources import enforce_max_length, read_tsv_labeled
from flaxlm.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer
from flaxlm.errors import ConfigError, DataError, FlaxlmError
from flaxlm.experiment import DataConfig, ExperimentConfig, TrainConfig, load_experiment
from flaxlm.models import BertConfig, ClassifierConfig, GPTConfig, Seq2SeqConfig, TransformerConfig
from flaxlm.train.optimizers import OptimizerConfig
from flaxlm.train.schedules import ScheduleConfig
from flaxlm.train.sharding import MeshConfig

fuzz = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["char", "bpe", "adamw", "skip", "stop", "1e-3", "-1", "lm"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=8)


def field_names(*classes) -> list[str]:
    return sorted({f.name for cls in classes for f in dataclasses.fields(cls)})


def section(*classes):
    """Dicts over the fields of `classes` (plus typos) with arbitrary values."""
    keys = st.sampled_from(field_names(*classes)) | st.text(max_size=8)
    return st.dictionaries(keys, values, max_size=5)


SECTIONS = {
    "task": st.sampled_from(["lm", "classify", "translate", "mlm", "LM", ""]) | scalars,
    "model": section(GPTConfig, ClassifierConfig),
    "data": section(DataConfig),
    "optim": section(OptimizerConfig) | st.fixed_dictionaries({"schedule": section(ScheduleConfig)}),
    "train": section(TrainConfig),
    "mesh": section(MeshConfig),
}
experiments = st.fixed_dictionaries({}, optional={**SECTIONS, "trian": values}) | values


@fuzz
@given(experiments)
def test_fuzz_experiment_config_files(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        cfg = load_experiment(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) or "(from override" in str(e), str(e)
        return
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


override_keys = st.sampled_from([f"{name}.{key}" for name, classes in
                                 (("data", [DataConfig]), ("train", [TrainConfig]), ("optim", [OptimizerConfig]),
                                  ("optim.schedule", [ScheduleConfig]), ("mesh", [MeshConfig]))
                                 for key in field_names(*classes)] + ["task", "model.n_layer", "train", "x.y"])
override_values = st.sampled_from(["1", "0", "-3", "2.5", "null", "[1, 2]", "{a: 1}", "skip", "stop", "true", ""]) \
    | st.text(max_size=10)


@fuzz
@given(st.lists(st.tuples(override_keys, override_values).map("=".join) | st.text(max_size=20), max_size=4))
def test_fuzz_experiment_overrides(tmp_path, overrides):
    path = tmp_path / "base.yaml"
    path.write_text("task: lm\ntrain: {steps: 3}\n")
    try:
        load_experiment(path, overrides)
    except ConfigError:
        pass


@fuzz
@given(st.sampled_from([GPTConfig, ClassifierConfig, Seq2SeqConfig, TransformerConfig, BertConfig]), st.data())
def test_fuzz_model_configs(cls, data):
    model = data.draw(section(cls))
    try:
        cfg = from_dict(cls, model, path="model")
    except ConfigError as e:
        assert e.key is None or e.key.startswith("model"), str(e)
        return
    assert from_dict(cls, to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------------------------- tokenizers


@fuzz
@given(st.text(min_size=1), st.text())
def test_fuzz_tokenizer_files_round_trip_arbitrary_unicode(tmp_path, train_text, text):
    for tokenizer in (CharTokenizer.train(train_text, unknown="unk"), WordTokenizer.train([train_text])):
        path = tmp_path / "tokenizer.json"
        tokenizer.save(path)
        loaded = load_tokenizer(path)
        assert loaded.fingerprint() == tokenizer.fingerprint()
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(train_text)) == tokenizer.decode(tokenizer.encode(train_text))
    char = CharTokenizer.train(train_text)
    assert char.decode(char.encode(train_text)) == train_text


@pytest.fixture(scope="module")
def tokenizer_json():
    text = ["the cat sat on the mat", "a dog ran"]
    return {"char": CharTokenizer.train(" ".join(text)).to_json(), "word": WordTokenizer.train(text).to_json(),
            "bpe": BPETokenizer.train(text, vocab_size=300).to_json()}


def mutate(data, path, value):
    """A copy of JSON `data` with the item at `path` (indices into dicts/lists, wrapped) replaced by `value`."""
    if not path or not isinstance(data, (dict, list)) or not data:
        return value
    if isinstance(data, dict):
        key = sorted(data)[path[0] % len(data)]
        return {**data, key: mutate(data[key], path[1:], value)}
    index = path[0] % len(data)
    return [*data[:index], mutate(data[index], path[1:], value), *data[index + 1:]]


@fuzz
@given(st.sampled_from(["char", "word", "bpe"]), st.lists(st.integers(0, 1000), max_size=4), values,
       st.binary(max_size=40) | st.none())
def test_fuzz_corrupt_tokenizer_files(tmp_path, tokenizer_json, kind, path, value, raw):
    file = tmp_path / "tokenizer.json"
    file.write_bytes(raw if raw is not None else json.dumps(mutate(tokenizer_json[kind], path, value)).encode())
    try:
        tokenizer = load_tokenizer(file)
    except DataError as e:
        assert str(e).startswith(str(file)), str(e)
        return
    try:
        assert isinstance(tokenizer.decode(tokenizer.encode("the cat")), str)
    except DataError:
        pass


@fuzz
@given(st.sampled_from(["char", "word", "bpe"]), st.lists(st.integers(-(2**40), 2**40) | st.sampled_from([-1, 0, 1])))
def test_fuzz_decode_arbitrary_ids(tokenizer_json, kind, ids):
    tokenizer = {"char": CharTokenizer, "word": WordTokenizer, "bpe": BPETokenizer}[kind].from_json(
        tokenizer_json[kind])
    try:
        assert isinstance(tokenizer.decode(ids), str)
    except DataError:
        assert any(not 0 <= i < tokenizer.vocab_size for i in ids)


# ----------------------------------------------------------------------------------------- readers, batching

tsv_text = st.lists(st.sampled_from(list("01ab \t\n\r") + ["label", "sentence", "\u2028", "\x00", "é"]),
                    max_size=30).map("".join) | st.text(max_size=40)


@fuzz
@given(tsv_text, st.none() | st.lists(st.sampled_from(["0", "1", "a", "pos"]), min_size=1, max_size=3, unique=True))
def test_fuzz_tsv_reader_on_arbitrary_text(tmp_path, text, label_set):
    path = tmp_path / "fuzz.tsv"
    path.write_text(text, encoding="utf-8")
    try:
        rows = read_tsv_labeled(path, label_set=label_set)
    except DataError as e:
        assert str(e).startswith(str(path)), str(e)
        return
    assert len(rows.texts) == len(rows.labels) == len(rows.lines) > 0
    assert all(text.strip() and "\t" not in text for text in rows.texts)


@fuzz
@given(st.lists(st.lists(st.integers(0, 50), max_size=12), max_size=6), st.integers(-2, 14) | st.sampled_from([True]),
       st.sampled_from(["truncate", "reject", "drop"]))
def test_fuzz_max_length_policy(sequences, max_length, policy):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = enforce_max_length(sequences, max_length, policy=policy)
    except DataError:
        return
    assert [len(s) for s in out] == [min(len(s), max_length) for s in sequences]


tokens = st.lists(st.integers(-3, 2**32), max_size=40).map(np.asarray) | st.lists(
    st.floats(allow_nan=True), max_size=5).map(np.asarray) | st.just(np.zeros((2, 3), np.int32))
sizes = st.integers(-2, 12) | st.sampled_from([True, 2.0, None, "4"])


@fuzz
@given(tokens, sizes, sizes, st.integers(-1, 2**33) | st.sampled_from([None, 1.5]),
       st.sampled_from(["windows", "sequential", "packed"]))
def test_fuzz_lm_batchers(array, block_size, batch_size, seed, kind):
    try:
        if kind == "windows":
            it = lm_windows(array, block_size=block_size, batch_size=batch_size, seed=seed, num_steps=2)
        elif kind == "sequential":
            it = lm_sequential(array, block_size=block_size, batch_size=batch_size)
        else:
            it = packed_lm([array[: len(array) // 2], array[len(array) // 2:]] if array.ndim == 1 else array,
                           seq_len=block_size, batch_size=batch_size, seed=seed)
        batches = list(it)
    except DataError:
        return
    for batch in batches:
        assert batch["inputs"].shape == batch["targets"].shape and batch["inputs"].dtype == np.int32


# -------------------------------------------------------------------------------------- checkpoint metadata


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ckpt")
    state = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": np.int32(3)}
    with Checkpointer(workdir, config={"n": 1}, async_save=False) as checkpointer:
        checkpointer.save(3, state, data_state={"position": 7})
    meta_file = checkpoint_dir(workdir) / "3" / "meta" / "metadata"
    return workdir, state, meta_file, json.loads(meta_file.read_text())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 1000), max_size=4), values, st.binary(max_size=30) | st.none())
def test_fuzz_checkpoint_metadata(saved_checkpoint, path, value, raw):
    workdir, state, meta_file, meta = saved_checkpoint
    try:
        meta_file.write_bytes(raw if raw is not None else json.dumps(mutate(meta, path, value)).encode())
        with Checkpointer(workdir, read_only=True) as checkpointer:
            restored, data_state, _ = checkpointer.restore(state)
        np.testing.assert_array_equal(restored["model"]["w"], state["model"]["w"])
        assert data_state == {"position": 7}
    except FlaxlmError as e:
        assert isinstance(e, CheckpointError) and "\n" not in str(e), str(e)
    finally:
        meta_file.write_text(json.dumps(meta))
