"""The training loop's pieces: a classification run through `flaxlm train`/`flaxlm eval`, stop signals, and the
metrics log's handling of a line cut short by a killed run."""

import json
import os
import signal

import pytest

from flaxlm import cli
from flaxlm.metrics_log import MetricsLog, read_metrics
from flaxlm.trainer import _last_eval, _stop_requests

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor"]


def sentiment_tsv(path, seed: int) -> None:
    """Sentences whose label is given by a sentiment word among neutral ones (learnable in a few steps)."""
    rows = ["label\tsentence"]
    for i in range(24):
        word = (POSITIVE if i % 2 else NEGATIVE)[(i * 7 + seed) % 5]
        filler = ["the", "film", "was", "a", "plot"][: 1 + (i + seed) % 5]
        rows.append(f"{i % 2}\t{' '.join(filler[:2] + [word] + filler[2:])}")
    path.write_text("\n".join(rows) + "\n")


def sentiment_config(tmp_path, train: str):
    """A tiny LSTM classification experiment on `sentiment_tsv` data; `train` is the YAML of its train section."""
    sentiment_tsv(tmp_path / "train.tsv", seed=0)
    sentiment_tsv(tmp_path / "dev.tsv", seed=3)
    config = tmp_path / "sentiment.yaml"
    config.write_text(f"""\
task: classify
model: {{backbone: lstm, pooling: max, embed_dim: 16, hidden_size: 16}}
data: {{train: {tmp_path / 'train.tsv'}, valid: {tmp_path / 'dev.tsv'}, tokenizer: word, batch_size: 8,
        bucket_boundaries: [8], eval_batch_size: 32}}
optim: {{name: adam, learning_rate: 0.03}}
train: {train}
""")
    return config


def test_classification_trains_and_evaluates(tmp_path, capsys):
    config = sentiment_config(tmp_path, "{steps: 30, log_every: 10, eval_every: 30, checkpoint_every: 30, "
                                        "best_metric: eval/accuracy, progress: false}")
    workdir = tmp_path / "run"
    assert cli.main(["train", str(config), "--workdir", str(workdir)]) == 0
    trained = json.loads(capsys.readouterr().out.splitlines()[-1])
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert "train/accuracy" in rows[0] and rows[-1]["eval/accuracy"] == trained["eval/accuracy"]

    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"valid/loss": pytest.approx(trained["eval/loss"], abs=1e-6),
                      "valid/accuracy": trained["eval/accuracy"]}
    assert result["valid/accuracy"] == 1.0  # the sentiment word decides the label

    assert cli.main(["sample", "--workdir", str(workdir)]) == 2
    assert "needs a language-model run" in capsys.readouterr().err


def test_evaluation_steps_that_are_not_log_steps_still_evaluate(tmp_path, capsys):
    config = sentiment_config(tmp_path, "{steps: 30, log_every: 10, eval_every: 15, checkpoint_every: 30, "
                                        "progress: false}")
    assert cli.main(["train", str(config), "--workdir", str(tmp_path / "run")]) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 15, 20, 30]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [15, 30]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_become_a_flag(sig):
    before = signal.getsignal(sig)
    with _stop_requests() as stop:
        os.kill(os.getpid(), sig)
        assert stop == [sig.name]
    assert signal.getsignal(sig) is before


def test_metrics_log_starts_a_new_line_after_a_cut_one(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "trai')
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(2, {"train/loss": 1.5, "eval/loss": float("nan")})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5, "eval/loss": None}]


def test_last_eval_is_the_latest_row_with_eval_metrics(tmp_path):
    assert _last_eval(tmp_path / "metrics.jsonl") == {}
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "train/loss": 2.0, "eval/loss": 1.9, "eval/accuracy": 0.5}\n{"step": 3, "train/loss": 1.0}\n')
    assert _last_eval(tmp_path / "metrics.jsonl") == {"eval/loss": 1.9, "eval/accuracy": 0.5}


def test_the_configs_dot_backend_reaches_both_compiled_steps(tmp_path):
    from flaxlm.experiment import load_experiment
    from flaxlm.train.sharding import shard_batch
    from flaxlm.trainer import build_run

    config = sentiment_config(tmp_path, "{steps: 2, dot_backend: eigen, progress: false}")
    run = build_run(load_experiment(config))
    batch = shard_batch(next(run.task.train_iterator()), run.mesh)
    for text in (run.train_step.lower(run.state, batch).compile().as_text(),
                 run.eval_step.lower(run.state.model, batch).compile().as_text()):
        assert " dot(" in text and "__ynn_fusion" not in text


def test_a_stop_signal_during_a_steps_logging_stops_after_the_next_step_with_its_checkpoint(tmp_path, capsys,
                                                                                           monkeypatch):
    """A SIGTERM arriving after a step's stop check (here while its metrics row is written) is acted on at the next
    step, which is checkpointed; it used to end the run at once with an error that no checkpoint matched its step."""
    write_row = MetricsLog.write_row

    def write_row_then_terminate(log, step, values):
        write_row(log, step, values)
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write_row", write_row_then_terminate)
    config = sentiment_config(tmp_path, "{steps: 30, log_every: 10, eval_every: 30, checkpoint_every: 30, "
                                        "progress: false}")
    workdir = tmp_path / "run"
    assert cli.main(["train", str(config), "--workdir", str(workdir)]) == 0
    assert "SIGTERM received: saved a checkpoint at step 11" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [10, 11]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [11]
