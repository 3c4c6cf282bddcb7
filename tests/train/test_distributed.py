"""Acceptance 3: two real processes on localhost train data-parallel and match one process.

Also: `flaxlm.distributed.initialize` is a no-op for one process and names missing settings. The two
worker processes start as soon as this module is collected (see conftest.py).
"""

import json
import atexit
import pathlib
import shutil
import socket
import tempfile

import numpy as np
import pytest

from background import BackgroundRun
from distributed_reference import CONFIG, GLOBAL_BATCH, batch_seeds, param_checksum
from flaxlm import distributed
from flaxlm.train import TrainState, make_optimizer, make_train_step
from tiny_lm import lm_loss, make_batch, make_model

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
_STARTED = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_background():
    if not _STARTED:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="flaxlm-distributed-"))
        atexit.register(shutil.rmtree, workdir, True)
        env = {
            "XLA_FLAGS": "--xla_backend_optimization_level=0",  # faster compiles
            "JAX_PLATFORMS": "cpu",
            "FLAXLM_COORDINATOR": f"127.0.0.1:{_free_port()}",
            "FLAXLM_NUM_PROCESSES": "2",
        }
        runs = [
            BackgroundRun(WORKER, workdir, env=dict(env, FLAXLM_PROCESS_ID=str(pid)), name=f"process_{pid}")
            for pid in range(2)
        ]
        _STARTED.update(workdir=workdir, runs=runs)
    return _STARTED


def _single_process_run():
    state = TrainState.create(make_model(0), make_optimizer(CONFIG), 1)
    step = make_train_step(lm_loss)
    losses = []
    for seed in batch_seeds():
        state, metrics = step(state, make_batch(seed, GLOBAL_BATCH, pad_rows=(1, 6)))
        losses.append(float(metrics["loss"]))
    return losses, param_checksum(state)


def test_two_processes_match_one():
    started = start_background()
    for pid, run in enumerate(started["runs"]):
        returncode, log = run.wait(timeout=300)
        assert returncode == 0, f"process {pid} failed (returncode {returncode}):\n{log[-4000:]}"
    results = [json.loads((started["workdir"] / f"result_{pid}.json").read_text()) for pid in range(2)]
    assert [r["rows"] for r in results] == [[0, GLOBAL_BATCH // 2], [GLOBAL_BATCH // 2, GLOBAL_BATCH]]
    losses, checksum = _single_process_run()
    for result in results:
        np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
        np.testing.assert_allclose(result["checksum"], checksum, rtol=1e-5)


def _clear_env(monkeypatch):
    for names in distributed._ENV.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    _clear_env(monkeypatch)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    monkeypatch.setenv("FLAXLM_NUM_PROCESSES", "1")
    assert distributed.initialize() is False


def test_initialize_reports_missing_settings(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("FLAXLM_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="coordinator_address .*FLAXLM_COORDINATOR"):
        distributed.initialize()
    monkeypatch.setenv("FLAXLM_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id .*FLAXLM_PROCESS_ID"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"process_id 5 must be in \[0, num_processes=2\)"):
        distributed.initialize(process_id=5)
    monkeypatch.setenv("FLAXLM_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="FLAXLM_PROCESS_ID must be an integer"):
        distributed.initialize()
