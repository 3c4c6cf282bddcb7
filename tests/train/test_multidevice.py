"""Acceptance 1: the same training on 8 forced CPU devices, whatever the mesh or the parallel API.

The runs happen in a subprocess (multidevice_worker.py) with XLA_FLAGS forcing 8 host devices, so every
other test keeps one device. It starts as soon as this module is collected (see conftest.py), so it
overlaps with the single-process tests.
"""

import atexit
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

from background import BackgroundRun

pytestmark = pytest.mark.multidevice

WORKER = pathlib.Path(__file__).with_name("multidevice_worker.py")
FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"  # level 0: faster compiles
_STARTED = {}


def start_background():
    if not _STARTED:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="flaxlm-multidevice-"))
        atexit.register(shutil.rmtree, workdir, True)
        run = BackgroundRun(WORKER, workdir, env={"XLA_FLAGS": FLAGS, "JAX_PLATFORMS": "cpu"})
        _STARTED.update(workdir=workdir, run=run)
    return _STARTED


@pytest.fixture(scope="module")
def runs():
    started = start_background()
    returncode, log = started["run"].wait(timeout=400)
    assert returncode == 0, log[-4000:]
    data = np.load(started["workdir"] / "runs.npz")
    grouped = {}
    for key in data.files:
        run, name = key.split("/", 1)
        grouped.setdefault(run, {})[name] = data[key]
    return grouped


def _assert_same_run(run, reference, *, first_rtol=1e-5, last_rtol=1e-4, param_atol=1e-4):
    losses, expected = run.pop("losses"), reference["losses"]
    assert len(losses) == 10
    np.testing.assert_allclose(losses[0], expected[0], rtol=first_rtol)
    np.testing.assert_allclose(losses, expected, rtol=last_rtol)
    params = {name: value for name, value in reference.items() if name != "losses"}
    assert run.keys() == params.keys()
    for name, value in params.items():
        np.testing.assert_allclose(run[name], value, atol=param_atol, err_msg=name)


@pytest.mark.parametrize("mesh", ["mesh_8_1_1", "mesh_2_4_1", "mesh_1_4_2"])
def test_meshes_match_single_device(runs, mesh):
    _assert_same_run(dict(runs[mesh]), runs["mesh_1_1_1"])


def test_training_makes_progress(runs):
    losses = runs["mesh_1_1_1"]["losses"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1


def test_shard_map_path_matches_jit_path(runs):
    _assert_same_run(dict(runs["shard_map_8_1_1"]), runs["jit_8_1_1"])
