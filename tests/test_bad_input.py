"""The bad-input catalogue: every kind of bad input to `flaxlm train` is ONE line `flaxlm: error: ...` on stderr naming
the file, line, key or shape at fault, with exit status 2 and no workdir created (the corrected command starts
cleanly). Inputs that never reach the command line (parallel corpora, token ids, truncation) are checked at the
API they enter through.
"""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm import cli
from flaxlm.data.default_corpus import default_corpus_text
from flaxlm.data.sources import read_parallel
from flaxlm.data.tokenizers import CharTokenizer
from flaxlm.errors import DataError
from flaxlm.experiment import load_experiment
from flaxlm.models.gpt import GPT, GPTConfig
from flaxlm.tasks import build_task

LM = """\
task: lm
model: {{n_layer: 1, n_head: 2, n_embd: 32}}
data: {{train: {train}, tokenizer: char, batch_size: 4, block_size: 16}}
train: {{steps: 2, progress: false}}
"""
CLASSIFY = """\
task: classify
model: {{backbone: lstm, embed_dim: 8, hidden_size: 8{model}}}
data: {{train: {train}, valid: {valid}, tokenizer: word, batch_size: 2, bucket_boundaries: [8]{data}}}
train: {{steps: 2, progress: false}}
"""
DEV_TSV = "label\tsentence\n0\ta dull film\n1\ta fine film\n"


def lm_case(corpus: bytes | None = None, *, directory=False, config_text: str | None = None):
    """Write a corpus (None: leave it missing) and an LM config over it; returns (config path, corpus path)."""

    def make(tmp: pathlib.Path):
        corpus_path = tmp / "corpus.txt"
        if directory:
            corpus_path.mkdir()
        elif corpus is not None:
            corpus_path.write_bytes(corpus)
        config = tmp / "tiny.yaml"
        config.write_text(config_text if config_text is not None else LM.format(train=corpus_path))
        return config, {"corpus": corpus_path, "config": config}

    return make


def classify_case(rows: str, *, model: str = "", data: str = ""):
    def make(tmp: pathlib.Path):
        train, valid = tmp / "train.tsv", tmp / "dev.tsv"
        train.write_text("label\tsentence\n" + rows)
        valid.write_text(DEV_TSV)
        config = tmp / "classify.yaml"
        config.write_text(CLASSIFY.format(train=train, valid=valid, model=model, data=data))
        return config, {"train": train, "config": config}

    return make


GOOD_CORPUS = default_corpus_text()[:2000].encode()

# (case id, files maker, extra command-line overrides, what the one error line must contain: literal strings,
# or names of the files the maker wrote, in braces).
CASES = [
    ("missing data file", lm_case(None), [], ["{corpus}", "file not found"]),
    ("empty data file", lm_case(b""), [], ["{corpus}", "file is empty"]),
    ("whitespace-only data file", lm_case(b" \n\t\n"), [], ["{corpus}", "only whitespace"]),
    ("directory instead of a file", lm_case(directory=True), [], ["{corpus}", "is a directory"]),
    ("non-UTF-8 bytes", lm_case(GOOD_CORPUS + b"\n\xff\xfe oops\n"), [], ["{corpus}:", "not valid UTF-8"]),
    ("corpus shorter than a block", lm_case(b"tiny text\n"), [], ["{corpus}", "fewer than block_size + 1"]),
    ("TSV line without a tab", classify_case("0\tgood\n1 bad, no tab\n"), [], ["{train}:3:", "no tab"]),
    ("TSV line with three columns", classify_case("0\tgood\n1\tbad\tworse\n"), [],
     ["{train}:3:", "2 tab-separated columns"]),
    ("TSV label that is not a class", classify_case("0\tgood\npositive\tgreat\n"), [],
     ["{train}:3:", "label 'positive'"]),
    ("TSV label outside the label set", classify_case("0\tgood\n1\tbad\n2\tugly\n", model=", num_classes: 2"), [],
     ["{train}:4:", "label 2 is outside", "num_classes"]),
    ("overlong line rejected by config",
     classify_case("0\tgood\n1\tone two three four five six seven eight nine ten\n", data=", overlong: reject"), [],
     ["{train}:3:", "exceed max_length 8"]),
    ("config file missing", lambda tmp: (tmp / "nope.yaml", {}), [], ["nope.yaml", "not found"]),
    ("config YAML syntax error", lm_case(config_text="task: lm\ntrain: {steps: 2\nmodel: {}\n"), [],
     ["{config}", "line"]),
    ("config duplicate key", lm_case(config_text="task: lm\ntask: classify\n"), [],
     ["{config}", "duplicate key 'task'"]),
    ("config key typo", lm_case(config_text="task: lm\ntrain: {stpes: 4}\n"), [],
     ["{config}: train.stpes", "did you mean 'steps'"]),
    ("config model key typo", lm_case(GOOD_CORPUS), ["model.n_layers=2"], ["model.n_layers", "did you mean 'n_layer'"]),
    ("config wrong type", lm_case(config_text="task: lm\ntrain: {steps: four}\n"), [],
     ["{config}: train.steps", "expected int", "'four'"]),
    ("config value out of range", lm_case(config_text="task: lm\ndata: {batch_size: 0}\n"), [],
     ["{config}: data.batch_size", "must be >= 1"]),
    ("config unknown choice", lm_case(config_text="task: lm\ntrain: {nonfinite: raise}\n"), [],
     ["{config}: train.nonfinite", "expected one of 'skip', 'stop', 'ignore'"]),
    ("override of an unknown key", lm_case(GOOD_CORPUS), ["train.stepz=3"],
     ["train.stepz", "unknown key 'stepz'", "did you mean 'steps'"]),
    ("override of an unknown section", lm_case(GOOD_CORPUS), ["trian.steps=3"],
     ["unknown key 'trian'", "did you mean 'train'"]),
    ("override with a wrong type", lm_case(GOOD_CORPUS), ["train.steps=ten"], ["train.steps", "expected int", "'ten'"]),
    ("malformed override", lm_case(GOOD_CORPUS), ["train.steps"], ["malformed override 'train.steps'"]),
    ("impossible mesh for the device count", lm_case(GOOD_CORPUS), ["mesh.data={devices_plus_one}"],
     ["mesh", "needs {devices_plus_one} devices, but {devices} are given"]),
]


@pytest.mark.parametrize("make, overrides, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(make, overrides, needles, tmp_path, capsys):
    config, files = make(tmp_path)
    names = {**{k: str(v) for k, v in files.items()}, "devices": jax.device_count(),
             "devices_plus_one": jax.device_count() + 1}
    workdir = tmp_path / "run"
    argv = ["train", str(config), "--workdir", str(workdir), *(o.format(**names) for o in overrides)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flaxlm: error: "), captured.err
    for needle in needles:
        assert needle.format(**names) in lines[0], lines[0]
    assert not workdir.exists()


# ------------------------------------------------------------------------------ inputs that enter through the API


def test_parallel_corpus_with_different_line_counts_names_both_files(tmp_path):
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("ein Haus\nein Baum\nein Hund\n")
    tgt.write_text("a house\na tree\n")
    with pytest.raises(DataError) as info:
        read_parallel(src, tgt)
    assert str(info.value) == (f"parallel files differ in line count: {src} has 3 lines, {tgt} has 2")


def test_token_ids_outside_the_vocabulary_name_the_id_and_its_index():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), rngs=nnx.Rngs(0))
    ids = np.array([[1, 2, 3], [4, 11, 5]], np.int32)
    with pytest.raises(ValueError, match=r"11.*\(1, 1\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"-1.*\(0, 0\)"):
        model(np.array([[-1, 2]], np.int32))
    # Inside jit the values are unknown when tracing: the bad rows become NaN, never a silently clamped row.
    logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    assert np.isnan(np.asarray(logits[1])).all() and np.isfinite(np.asarray(logits[0])).all()
    tokenizer = CharTokenizer.train("abc")
    with pytest.raises(DataError, match="3"):
        tokenizer.decode([0, 3])


def test_overlong_lines_are_truncated_with_a_warning_by_default(tmp_path):
    config, files = classify_case("0\tgood\n1\tone two three four five six seven eight nine ten\n")(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = build_task(load_experiment(config))
    assert [str(w.message) for w in caught] == [f"{files['train']}: truncated 1 sequence(s) to max_length 8 "
                                                f"(first at line 3)"]
    assert max(len(ids) for ids in task.splits["train"][0]) == 8


# ------------------------------------------------------------------------------- corrupt and foreign checkpoints


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """(config, workdir) of an LM run as `flaxlm train` leaves it after step 2, without training: config.yaml,
    tokenizer.json and the checkpoint of the freshly built state."""
    from flaxlm.checkpoint import Checkpointer
    from flaxlm.config import save_config, to_dict
    from flaxlm.trainer import build_run

    root = tmp_path_factory.mktemp("checkpointed")
    config, _ = lm_case(GOOD_CORPUS)(root)
    cfg = load_experiment(config)
    workdir = root / "run"
    workdir.mkdir()
    run = build_run(cfg)
    save_config(cfg, workdir / "config.yaml")
    run.task.tokenizer.save(workdir / "tokenizer.json")
    with Checkpointer(workdir, config=to_dict(cfg), tokenizer=run.task.tokenizer.to_json()) as checkpointer:
        checkpointer.save(2, run.state, data_state=run.task.train_iterator().get_state())
    return config, workdir


def flip_array_bytes(step_dir: pathlib.Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(p.stat().st_size for p in files)
    for path in (p for p in files if p.stat().st_size >= largest // 2):
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x10
        path.write_bytes(bytes(blob))


def foreign_model(workdir: pathlib.Path) -> None:
    """Replace the checkpoint by one of a wider model (its config.yaml still says n_embd: 32)."""
    import shutil

    from flaxlm.checkpoint import Checkpointer
    from flaxlm.trainer import build_run

    shutil.rmtree(workdir / "checkpoints")
    run = build_run(load_experiment(workdir / "config.yaml", ["model.n_embd=64"]))
    with Checkpointer(workdir) as checkpointer:
        checkpointer.save(2, run.state)


def other_major_version(workdir: pathlib.Path) -> None:
    import json

    meta = workdir / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "flaxlm_version": "99.0.0"}))


def permuted_tokenizer(path: pathlib.Path) -> None:
    """Swap two ids of the run's character tokenizer: same characters and size, other token ids."""
    from flaxlm.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(path)
    chars = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    chars[0], chars[1] = chars[1], chars[0]
    CharTokenizer(chars).save(path)


CHECKPOINT_CASES = [
    ("flipped bytes", lambda w: flip_array_bytes(w / "checkpoints" / "2"), ["checkpoints/2", "checksum mismatch"]),
    ("truncated array file", lambda w: [p.write_bytes(p.read_bytes()[:100]) for p in (w / "checkpoints" / "2").rglob(
        "*") if p.is_file() and p.parent.name == "d"], ["checkpoints/2"]),
    ("another model config", foreign_model, ["checkpoints/2", "checkpoint shape (", "!= template shape ("]),
    ("another flaxlm version", other_major_version, ["checkpoints/2", "written by flaxlm 99.0.0"]),
    ("mismatched tokenizer", lambda w: permuted_tokenizer(w / "tokenizer.json"),
     ["tokenizer does not match the checkpoint"]),
]


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("damage, needles", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_corrupt_or_foreign_checkpoint_is_one_line_error(damage, needles, command, checkpointed, tmp_path, capsys):
    import hashlib
    import shutil

    config, pristine = checkpointed
    workdir = tmp_path / "run"
    shutil.copytree(pristine, workdir)
    damage(workdir)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(workdir.rglob("*")) if p.is_file()}
    argv = ["train", str(config), "--workdir", str(workdir)] if command == "train" else ["eval", "--workdir",
                                                                                          str(workdir)]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flaxlm: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(workdir.rglob("*")) if p.is_file()} == before
