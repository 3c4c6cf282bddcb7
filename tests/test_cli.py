"""The `flaxlm` command, run in-process through `flaxlm.cli.main`: what `train` writes, `eval`, `sample`, `bench`,
`translate` and `attention` (tiny German -> English Transformer and Seq2Seq runs),
and bad input of every kind: exit status 2, one line `flaxlm: error: ...` naming the file, line or key, and
nothing already in the workdir changed."""

import contextlib
import gzip
import hashlib
import io
import json
import math
import pathlib
import shutil
import struct

import pytest

from flaxlm import cli
from flaxlm.data.default_corpus import default_corpus_text
from flaxlm.data.tokenizers import CharTokenizer, load_tokenizer

STEPS = 4


def write_config(path: pathlib.Path, corpus: pathlib.Path, **sections) -> pathlib.Path:
    text = f"""\
task: lm
model: {{n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.1}}
data: {{train: {corpus}, tokenizer: char, batch_size: 4, block_size: 16, eval_batch_size: 16}}
optim: {{name: adamw, learning_rate: 1.0e-3}}
train: {{steps: {STEPS}, log_every: 1, eval_every: 2, checkpoint_every: 2, progress: false}}
"""
    for name, body in sections.items():
        text = "\n".join(line for line in text.splitlines() if not line.startswith(name + ":")) + f"\n{name}: {body}\n"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small corpus (the first 3000 characters of the default corpus), a test file and the config."""
    root = tmp_path_factory.mktemp("files")
    text = default_corpus_text()
    (root / "corpus.txt").write_text(text[:3000])
    (root / "test.txt").write_text(text[3000:3600])
    return root, write_config(root / "tiny.yaml", root / "corpus.txt")


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """A workdir trained for STEPS steps by `flaxlm train`, and the JSON result the command printed."""
    _, config = files
    workdir = tmp_path_factory.mktemp("trained") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["train", str(config), "--workdir", str(workdir), "--no-progress"]) == 0
    return workdir, json.loads(out.getvalue().splitlines()[-1])


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained workdir (tests may break it)."""
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    return workdir


def snapshot(workdir: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `workdir` ({} when it does not exist)."""
    if not workdir.exists():
        return {}
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def fails(capsys, argv, *needles) -> str:
    """Run the command; it must exit 2 printing exactly one line `flaxlm: error: ...` containing `needles`."""
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flaxlm: error: "), err
    for needle in needles:
        assert str(needle) in err[0], err[0]
    return err[0]


def metrics_rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(directory: pathlib.Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TFRecord event files in `directory`."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


# ------------------------------------------------------------------------------------------ what train writes


def test_train_writes_metrics_tensorboard_and_loss_curve(trained):
    workdir, printed = trained
    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in ("train/loss", "lr", "perf/step_time_s", "perf/tokens_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["perf/tokens_per_s"] == pytest.approx(4 * 16 / row["perf/step_time_s"])
        assert row["lr"] == pytest.approx(1e-3)
        has_eval = row["step"] % 2 == 0
        assert ("eval/loss" in row) == has_eval and ("eval/accuracy" in row) == has_eval
    last = rows[-1]
    assert 0 < last["eval/loss"] < 10 and 0 <= last["eval/accuracy"] <= 1
    assert printed == {"workdir": str(workdir), "eval/loss": last["eval/loss"], "eval/accuracy": last["eval/accuracy"]}

    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = tensorboard_scalars(workdir / "tensorboard")
    assert scalars["train/loss"] == pytest.approx({r["step"]: r["train/loss"] for r in rows}, rel=1e-6)
    assert scalars["eval/loss"] == pytest.approx({r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r},
                                                 rel=1e-6)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert {"config.yaml", "tokenizer.json"} <= {p.name for p in workdir.iterdir()}


# ------------------------------------------------------------------------------------------ eval, sample, bench


def test_eval_restores_the_checkpoint_and_matches_the_training_eval(trained, capsys):
    workdir, printed = trained
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out)
    # The training eval covered the whole valid split (train.eval_batches is null), so the numbers agree.
    assert result["valid/loss"] == pytest.approx(printed["eval/loss"], abs=1e-6)
    assert result["valid/accuracy"] == pytest.approx(printed["eval/accuracy"], abs=1e-9)


def test_eval_on_another_test_file(trained, files, capsys):
    workdir, _ = trained
    root, _ = files
    fails(capsys, ["eval", "--workdir", workdir, "--split", "test"], "data.test=PATH")
    assert cli.main(["eval", "--workdir", str(workdir), "--split", "test", f"data.test={root / 'test.txt'}"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"test/loss", "test/accuracy"}
    assert 0 < result["test/loss"] < 10 and 0 <= result["test/accuracy"] <= 1


def test_eval_of_a_chosen_step_or_the_best_checkpoint(trained, capsys):
    workdir, _ = trained
    evals = {r["step"]: r["eval/loss"] for r in metrics_rows(workdir) if "eval/loss" in r}
    best = min(evals, key=evals.get)  # train.best_metric is eval/loss; checkpoints are kept at steps 2 and 4
    for choice, step in (("2", 2), ("best", best), ("latest", STEPS)):
        assert cli.main(["eval", "--workdir", str(workdir), "--checkpoint", choice]) == 0
        assert json.loads(capsys.readouterr().out)["valid/loss"] == pytest.approx(evals[step], abs=1e-6), choice
    fails(capsys, ["eval", "--workdir", workdir, "--checkpoint", "3"], "no finalized checkpoint for step 3")
    fails(capsys, ["eval", "--workdir", workdir, "--checkpoint", "first"], "--checkpoint", "'first'")


def test_sample_greedy_is_deterministic(trained, capsys):
    workdir, _ = trained
    outputs = []
    for seed in ("0", "1"):
        argv = ["sample", "--workdir", str(workdir), "--prompt", "The ", "--max-new-tokens", "8",
                "--temperature", "0", "--seed", seed]
        assert cli.main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("The ") and len(outputs[0].rstrip("\n")) == len("The ") + 8
    fails(capsys, ["sample", "--workdir", workdir, "--top-p", "1.5"], "--top-p")
    fails(capsys, ["sample", "--workdir", workdir, "--prompt", "The ", "--max-new-tokens", "13"], "block_size 16")
    assert cli.main(["sample", "--workdir", str(workdir), "--prompt", "The ", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.rstrip("\n")) == 16, "default --max-new-tokens fills the context"


def test_sample_reads_the_chosen_checkpoint(trained, capsys):
    workdir, _ = trained
    argv = ["sample", "--workdir", str(workdir), "--prompt", "The ", "--max-new-tokens", "8", "--temperature", "0"]
    outputs = {}
    for choice in (None, "latest", str(STEPS), "2"):
        assert cli.main(argv + ([] if choice is None else ["--checkpoint", choice])) == 0
        outputs[choice] = capsys.readouterr().out
    assert outputs[None] == outputs["latest"] == outputs[str(STEPS)]
    assert outputs["2"].startswith("The ")
    fails(capsys, argv + ["--checkpoint", "3"], "no finalized checkpoint for step 3")


def test_bench_prints_one_json_object(files, capsys):
    _, config = files
    assert cli.main(["bench", str(config), "--steps", "3", "train.dot_backend=eigen"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["dot_backend"] == "eigen" and result["backend"] == "cpu"
    for key in ("compile_time_s", "median_step_time_s", "tokens_per_s", "model_flops_per_step", "peak_flops", "mfu"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result)
    assert result["tokens_per_s"] == pytest.approx(4 * 16 / result["median_step_time_s"])
    assert result["mfu"] == pytest.approx(
        result["model_flops_per_step"] / result["median_step_time_s"] / result["peak_flops"])


# ------------------------------------------------------------------- bad input against an existing workdir


@pytest.mark.parametrize("damage, needle", [
    ("delete", "file not found"),
    ("empty", "file is empty"),
    ("directory", "is a directory"),
])
def test_bad_data_file_of_a_resumed_run(damage, needle, files, run_copy, capsys, tmp_path):
    root, _ = files
    corpus = tmp_path / "corpus.txt"
    shutil.copy(root / "corpus.txt", corpus)
    config = write_config(tmp_path / "tiny.yaml", corpus)
    shutil.copy(config, run_copy / "config.yaml")  # the run was trained on this copy of the corpus
    before = snapshot(run_copy)
    corpus.unlink()
    if damage == "empty":
        corpus.write_text("")
    elif damage == "directory":
        corpus.mkdir()
    fails(capsys, ["train", config, "--workdir", run_copy], corpus, needle)
    assert snapshot(run_copy) == before


def permuted_tokenizer(workdir: pathlib.Path) -> CharTokenizer:
    """The run's character tokenizer with two ids swapped: same vocabulary size, other token ids."""
    tokenizer = load_tokenizer(workdir / "tokenizer.json")
    chars = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    chars[0], chars[1] = chars[1], chars[0]
    return CharTokenizer(chars)


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_tokenizer_that_does_not_match_the_checkpoint(command, files, run_copy, capsys):
    _, config = files
    permuted_tokenizer(run_copy).save(run_copy / "tokenizer.json")
    before = snapshot(run_copy)
    argv = {"train": ["train", config, "--workdir", run_copy], "eval": ["eval", "--workdir", run_copy],
            "sample": ["sample", "--workdir", run_copy]}[command]
    fails(capsys, argv, "tokenizer does not match the checkpoint")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("command", ["train", "eval"])
def test_corrupt_tokenizer_file(command, files, run_copy, capsys):
    _, config = files
    (run_copy / "tokenizer.json").write_text('{"kind": "char", "chars": [')
    before = snapshot(run_copy)
    argv = ["train", config, "--workdir", run_copy] if command == "train" else ["eval", "--workdir", run_copy]
    fails(capsys, argv, run_copy / "tokenizer.json", "corrupt tokenizer file")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("overrides, needles", [
    (["model.n_embd=64"], ["model: n_embd=64 (saved: 32) differs from the run in this workdir"]),
    (["model.n_layers=2"], ["model: n_layers=2 (saved: '<unset>')"]),
    (["data.block_size=8"], ["data: block_size=8 (saved: 16)"]),
    (["task=classify"], ["task: 'classify' (saved: 'lm')"]),
])
def test_resume_with_another_model_or_data_config_is_refused(overrides, needles, files, run_copy, capsys):
    _, config = files
    before = snapshot(run_copy)
    fails(capsys, ["train", config, "--workdir", run_copy, *overrides], *needles)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("overrides, needles", [
    (["train.stepz=3"], ["train.stepz", "unknown key 'stepz'", "did you mean 'steps'"]),
    (["train.steps=ten"], ["train.steps", "expected int", "'ten'"]),
    (["optim.learning_rate=[1]"], ["optim.learning_rate", "expected float"]),
    (["mesh.data=3"], ["mesh: ", "data=3", "needs 3 devices, but 1 are given"]),
    (["trian.steps=3"], ["unknown key 'trian'", "did you mean 'train'"]),
    (["train.steps"], ["malformed override 'train.steps'"]),
])
def test_config_errors_name_the_key(overrides, needles, files, run_copy, capsys):
    _, config = files
    before = snapshot(run_copy)
    fails(capsys, ["train", config, "--workdir", run_copy, *overrides], *needles)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("section, body, needles", [
    ("train", "{stpes: 4}", ["typo.yaml: train.stpes", "did you mean 'steps'"]),
    ("train", "{steps: four}", ["typo.yaml: train.steps", "expected int"]),
    ("model", "{n_layers: 1}", ["model.n_layers", "did you mean 'n_layer'"]),
])
def test_config_file_errors_name_the_key(section, body, needles, files, tmp_path, capsys):
    root, _ = files
    config = write_config(tmp_path / "typo.yaml", root / "corpus.txt", **{section: body})
    workdir = tmp_path / "run"
    fails(capsys, ["train", config, "--workdir", workdir], *needles)
    assert not workdir.exists()


def test_missing_config_file(tmp_path, capsys):
    fails(capsys, ["train", tmp_path / "nope.yaml", "--workdir", tmp_path / "run"], "nope.yaml", "not found")


# ------------------------------------------------------------------------ bad input for a new run


def classify_config(tmp_path: pathlib.Path, train_rows: str, **model) -> pathlib.Path:
    (tmp_path / "train.tsv").write_text("label\tsentence\n" + train_rows)
    (tmp_path / "dev.tsv").write_text("label\tsentence\n0\ta dull film\n1\ta fine film\n")
    model_fields = ", ".join(f"{k}: {v}" for k, v in {"backbone": "lstm", "embed_dim": 8, "hidden_size": 8,
                                                      **model}.items())
    path = tmp_path / "classify.yaml"
    path.write_text(f"""\
task: classify
model: {{{model_fields}}}
data: {{train: {tmp_path / 'train.tsv'}, valid: {tmp_path / 'dev.tsv'}, tokenizer: word, batch_size: 2,
        bucket_boundaries: [8]}}
train: {{steps: 2, progress: false}}
""")
    return path


@pytest.mark.parametrize("rows, model, needles", [
    ("0\tgood\n1 bad, no tab\n", {}, ["train.tsv:3:", "no tab"]),
    ("0\tgood\npositive\tgreat\n", {}, ["train.tsv:3:", "label 'positive'"]),
    ("0\tgood\n1\tbad\n2\tugly\n", {"num_classes": 2}, ["train.tsv:4:", "label 2 is outside", "num_classes"]),
    ("0\tgood\n1\tbad\tworse\n", {}, ["train.tsv:3:", "2 tab-separated columns"]),
])
def test_bad_tsv_names_file_and_line(rows, model, needles, tmp_path, capsys):
    config = classify_config(tmp_path, rows, **model)
    workdir = tmp_path / "run"
    fails(capsys, ["train", config, "--workdir", workdir], *needles)
    assert not workdir.exists()


@pytest.mark.parametrize("make, needle", [
    (lambda p: None, "file not found"),
    (lambda p: p.write_text(""), "file is empty"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_text(" \n\n"), "only whitespace"),
    (lambda p: p.write_bytes(b"ok\n\xff\xfe"), ":2: not valid UTF-8"),
])
def test_bad_data_file_for_a_new_run(make, needle, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    make(corpus)
    config = write_config(tmp_path / "tiny.yaml", corpus)
    workdir = tmp_path / "run"
    fails(capsys, ["train", config, "--workdir", workdir], corpus, needle)
    assert not workdir.exists()  # nothing written, so the corrected command starts cleanly


def test_unknown_command_line_option_is_a_usage_error(files, capsys):
    _, config = files
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config), "--wokdir", "x"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --wokdir" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ translation runs

PARALLEL = [("ein hund läuft .", "a dog runs ."), ("die katze sitzt im park .", "the cat sits in the park ."),
            ("der mann spielt ball .", "the man plays ball ."),
            ("eine frau läuft im wasser .", "a woman runs in the water ."), ("das kind spielt .", "the child plays ."),
            ("ein mann sitzt .", "a man sits .")]
TRANSLATE_MODELS = {
    "transformer": "{arch: transformer, d_model: 16, num_heads: 2, num_encoder_layers: 1, num_decoder_layers: 1, "
                   "mlp_dim: 32, max_length: 32, share_embeddings: true, label_smoothing: 0.1}",
    "seq2seq": "{arch: seq2seq, src_embed_dim: 8, tgt_embed_dim: 8, hidden_size: 16, num_layers: 1, "
               "attention: luong, dropout: 0.1, teacher_forcing_ratio: 0.5}",
}


@pytest.fixture(scope="module", params=sorted(TRANSLATE_MODELS))
def translate_run(request, tmp_path_factory):
    """A tiny German -> English run (gzipped target files) trained for 2 steps, and the JSON `train` printed."""
    root = tmp_path_factory.mktemp(f"translate_{request.param}")
    (root / "train.de").write_text("".join(s + "\n" for s, _ in PARALLEL), encoding="utf-8")
    (root / "train.en.gz").write_bytes(gzip.compress("".join(t + "\n" for _, t in PARALLEL).encode("utf-8")))
    config = root / "translate.yaml"
    config.write_text(f"""\
task: translate
model: {TRANSLATE_MODELS[request.param]}
data: {{train: {root / 'train'}, valid: {root / 'train'}, source_lang: de, target_lang: en, tokenizer: word,
        batch_size: 2, bucket_boundaries: [12], max_length: 12, eval_batch_size: 4}}
optim: {{name: adam, learning_rate: 1.0e-3, clip_norm: 1.0}}
train: {{steps: 2, log_every: 1, eval_every: 2, checkpoint_every: 2, best_metric: eval/bleu, progress: false}}
""")
    workdir = root / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["train", str(config), "--workdir", str(workdir), "--no-progress"]) == 0
    return request.param, workdir, json.loads(out.getvalue().splitlines()[-1])


def test_translate_train_reports_bleu_and_eval_reproduces_it(translate_run, capsys):
    _, workdir, printed = translate_run
    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    last = rows[-1]
    assert 0.0 <= last["eval/bleu"] <= 100.0 and math.isfinite(last["eval/loss"])
    assert printed["eval/bleu"] == last["eval/bleu"] and "eval/bleu" not in rows[0]
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["valid/bleu"] == pytest.approx(printed["eval/bleu"], abs=1e-9)
    assert result["valid/loss"] == pytest.approx(printed["eval/loss"], abs=1e-5)


def test_translate_from_stdin_and_file(translate_run, tmp_path, capsys, monkeypatch):
    _, workdir, _ = translate_run
    lines = ["ein hund läuft .", "", "der ☃ zebra spielt", "   ", " ".join(["katze"] * 20)]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert cli.main(["translate", "--workdir", str(workdir), "--beam-size", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out.split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""
    assert out[1] == out[3] == ""
    assert captured.err.strip().splitlines() == [
        "flaxlm: warning: <stdin>: truncated 1 sequence(s) to max_length 12 (first at line 5)"]

    source, target = tmp_path / "source.de", tmp_path / "out.en"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    argv = ["translate", "--workdir", str(workdir), "--input", str(source), "--output", str(target)]
    assert cli.main(argv + ["--beam-size", "1"]) == 0
    assert target.read_text(encoding="utf-8") == captured.out
    assert cli.main(argv + ["--beam-size", "3", "--length-penalty", "1.0"]) == 0
    assert len(target.read_text(encoding="utf-8").split("\n")) == len(lines) + 1
    capsys.readouterr()


def test_translate_errors(translate_run, trained, tmp_path, capsys):
    _, workdir, _ = translate_run
    fails(capsys, ["translate", "--workdir", workdir, "--beam-size", "0"], "--beam-size must be >= 1")
    fails(capsys, ["translate", "--workdir", workdir, "--input", tmp_path / "nope.de"], "nope.de", "file not found")
    source = tmp_path / "source.de"
    source.write_text("ein hund .\n", encoding="utf-8")
    fails(capsys, ["translate", "--workdir", trained[0], "--input", source], "translate needs a translation run")
    fails(capsys, ["attention", "--workdir", trained[0], "--text", "x"], "attention needs a translate or classify run")
    fails(capsys, ["translate", "--workdir", workdir, "--input", source, "--checkpoint", "1"],
          "no finalized checkpoint for step 1")
    fails(capsys, ["attention", "--workdir", workdir, "--text", "ein hund", "--checkpoint", "1"],
          "no finalized checkpoint for step 1")
    assert cli.main(["translate", "--workdir", str(workdir), "--input", str(source), "--checkpoint", "best"]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_attention_writes_a_png(translate_run, tmp_path, capsys):
    arch, workdir, _ = translate_run
    output = tmp_path / "attention.png"
    argv = ["attention", "--workdir", str(workdir), "--text", "ein hund läuft .", "--output", str(output)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(output)
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    if arch == "transformer":
        fails(capsys, ["attention", "--workdir", workdir, "--text", "ein hund", "--layer", "1"],
              "--layer 1 is out of range")
    else:
        fails(capsys, ["attention", "--workdir", workdir, "--text", "ein hund", "--layer", "0"],
              "--layer applies to Transformer runs")
