"""Checkpoints: bit-exact round trips, retention, async saves, resharding, params-only loads, and every fault
(foreign config, version, tokenizer, corrupt bytes, truncated files, unwritable or full disk, killed saves)
ending in a one-line CheckpointError with the previous checkpoints intact."""

import functools
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxlm
from flaxlm.checkpoint import CheckpointError, Checkpointer, checkpoint_dir, load_metadata, restore_params

REPO = pathlib.Path(__file__).resolve().parents[1]


class Encoder(nnx.Module):
    def __init__(self, *, rngs, width=4, param_dtype=jnp.float32):
        self.embed = nnx.Embed(11, width, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(width, width, param_dtype=param_dtype, rngs=rngs)


class Classifier(nnx.Module):
    def __init__(self, *, rngs, width=4):
        self.encoder = Encoder(rngs=rngs, width=width)
        self.head = nnx.Linear(width, 3, rngs=rngs)


@functools.partial(jax.jit, static_argnums=1)
def _build_state(seed, width):
    model = Classifier(rngs=nnx.Rngs(jax.random.key(seed)), width=width)
    tx = optax.adamw(1e-2)
    grads = jax.tree.map(lambda p: jnp.sin(p * 3.0 + seed), model)
    _, opt_state = tx.update(grads, tx.init(model), model)
    return {"model": model, "opt_state": opt_state, "step": 7 + seed, "rng": jax.random.key(seed + 1)}


def make_state(seed=0, width=4):
    """A TrainState-like dict: NNX model, AdamW state after one update, int32 step, typed RNG key."""
    return _build_state(jnp.int32(seed), width)


def raw(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def assert_bit_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(raw(x)).tobytes() == np.asarray(raw(y)).tobytes()


def array_data_files(step_dir):
    """The files holding a step's array bytes: the largest in the OCDBT `d/` folders (Orbax keeps a copy of the
    per-process database beside the merged one, so there are usually two)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(p.stat().st_size for p in files)
    return [p for p in files if p.stat().st_size >= largest // 2]


def run_python(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result


@pytest.fixture
def saved(tmp_path):
    """A workdir with step 10 of make_state(0) saved synchronously; returns (workdir, state)."""
    state = make_state(0)
    with Checkpointer(tmp_path, config={"width": 4}, tokenizer={"vocab": ["a", "b"]}, async_save=False) as ck:
        assert ck.save(10, state, data_state={"epoch": 1, "position": 12})
    return tmp_path, state


def test_round_trip_is_bit_equal(saved):
    workdir, state = saved
    ck = Checkpointer(workdir, config={"width": 4}, tokenizer={"vocab": ["a", "b"]})
    assert ck.latest_step() == 10
    restored, data_state, meta = ck.restore(make_state(5))
    ck.close()
    assert_bit_equal(restored, state)
    assert isinstance(restored["model"], Classifier)
    assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    assert data_state == {"epoch": 1, "position": 12}
    assert meta["flaxlm_version"] == flaxlm.__version__
    assert meta["config"] == {"width": 4} and len(meta["config_hash"]) == 16
    assert meta["tokenizer"] == {"vocab": ["a", "b"]}
    assert meta["leaves"]["model/encoder/proj/kernel/value"] == {"shape": [4, 4], "dtype": "float32"}
    assert meta["leaves"]["rng"] == {"shape": [], "dtype": "key<fry>"}
    assert meta["param_count"] == 11 * 4 + 4 * 4 + 4 + 4 * 3 + 3
    assert load_metadata(workdir) == meta


def test_async_save_then_resume_in_a_new_checkpointer(tmp_path):
    states = [make_state(i) for i in range(3)]
    ck = Checkpointer(tmp_path, max_to_keep=5, async_save=True)
    for i, state in enumerate(states):
        assert ck.save(i + 1, state, data_state={"position": i})
    ck.wait_until_finished()
    assert ck.all_steps() == [1, 2, 3]
    ck.close()

    resumed = Checkpointer(tmp_path)
    restored, data_state, _ = resumed.restore(make_state(9))
    assert_bit_equal(restored, states[2])
    assert data_state == {"position": 2}
    older, data_state, _ = resumed.restore(make_state(9), step=2)
    assert_bit_equal(older, states[1])
    assert data_state == {"position": 1}
    resumed.close()


def test_keep_last_n_plus_best_by_metric(tmp_path):
    state = make_state(0)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0}
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/loss", best_mode="min", async_save=False) as ck:
        for step, loss in losses.items():
            ck.save(step, state, metrics={"eval/loss": loss, "train/loss": 9.0})
        assert ck.all_steps() == [2, 4, 5]
        assert ck.best_step() == 2
        ck.save(6, state)  # no metric: kept only while among the latest two
        ck.save(7, state, metrics={"train/loss": 1.0})
        assert ck.all_steps() == [2, 6, 7]
    # A new run in the same workdir reads the recorded metrics back from disk.
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/loss", best_mode="min", async_save=False) as ck:
        ck.save(8, state, metrics={"eval/loss": 0.5})
        assert ck.all_steps() == [7, 8]
        assert ck.best_step() == 8


def test_best_mode_max_keeps_the_highest(tmp_path):
    state = make_state(0)
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="acc", best_mode="max", keep_best=2) as ck:
        for step, acc in {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.1, 5: 0.2}.items():
            ck.save(step, state, metrics={"acc": acc})
        ck.wait_until_finished()
        assert ck.all_steps() == [2, 3, 5]
        assert ck.best_step() == 2


def test_restore_onto_explicit_single_device_sharding(saved):
    workdir, state = saved
    device = jax.devices()[-1]
    sharding = jax.sharding.SingleDeviceSharding(device)
    template = jax.eval_shape(lambda: make_state(3))
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), template)
    with Checkpointer(workdir) as ck:
        restored, _, _ = ck.restore(template)
    assert_bit_equal(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == sharding


@pytest.mark.multidevice
def test_sharded_save_on_4_devices_restores_on_1_and_back(tmp_path):
    def values(seed):
        rs = np.random.RandomState(seed)
        return {"w": rs.randn(8, 4).astype(np.float32), "b": rs.randn(4).astype(np.float32)}

    one = values(1)
    state = {"model": {k: jnp.asarray(v) for k, v in one.items()}, "rng": jax.random.key(4), "step": jnp.int32(3)}
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state)
    result = run_python(
        f"""
        import json, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from flaxlm.checkpoint import Checkpointer
        assert jax.device_count() == 4
        mesh = jax.make_mesh((4,), ("x",))
        rows, repl = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P())
        template = {{
            "model": {{"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=rows),
                       "b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=repl)}},
            "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
        }}
        ck = Checkpointer({str(tmp_path)!r}, async_save=False)
        restored, _, _ = ck.restore(template, step=1)
        w = restored["model"]["w"]
        out = {{"spec": list(w.sharding.spec), "shards": len(w.addressable_shards),
                "w": np.asarray(w).tolist(), "rng": np.asarray(jax.random.key_data(restored["rng"])).tolist()}}
        rs = np.random.RandomState(2)
        new = {{"model": {{"w": jax.device_put(rs.randn(8, 4).astype(np.float32), rows),
                          "b": jax.device_put(rs.randn(4).astype(np.float32), repl)}},
               "rng": jax.device_put(jax.random.key(5), repl),
               "step": jax.device_put(jnp.int32(4), jax.devices()[2])}}
        ck.save(2, new)
        ck.close()
        print("RESULT" + json.dumps(out))
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    assert out["spec"] == ["x", None] and out["shards"] == 4
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), one["w"])
    assert out["rng"] == np.asarray(jax.random.key_data(jax.random.key(4))).tolist()

    two = values(2)
    template = {"model": {k: jnp.zeros_like(v) for k, v in two.items()}}
    template.update(rng=jax.random.key(0), step=jnp.int32(0))
    with Checkpointer(tmp_path) as ck:
        restored, _, _ = ck.restore(template, step=2)
    np.testing.assert_array_equal(np.asarray(restored["model"]["w"]), two["w"])
    assert restored["model"]["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert_bit_equal(restored["rng"], jax.random.key(5))
    assert int(restored["step"]) == 4


def test_restore_params_into_a_sub_module(saved):
    workdir, state = saved
    encoder = restore_params(workdir, Encoder(rngs=nnx.Rngs(9)), prefix="encoder")
    assert_bit_equal(encoder, state["model"].encoder)

    # The other way: a classifier's encoder filled from an encoder-only checkpoint (given by its step dir).
    with Checkpointer(workdir / "pretrain", async_save=False) as ck:
        ck.save(3, {"model": state["model"].encoder})
    classifier = Classifier(rngs=nnx.Rngs(4))
    head_before = np.asarray(classifier.head.kernel[...]).copy()
    classifier.encoder = restore_params(checkpoint_dir(workdir / "pretrain") / "3", classifier.encoder)
    assert_bit_equal(classifier.encoder, state["model"].encoder)
    np.testing.assert_array_equal(classifier.head.kernel[...], head_before)


def test_restore_params_casts_floats_to_the_template_dtype(saved):
    workdir, state = saved
    encoder = restore_params(workdir, Encoder(rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16), prefix="encoder")
    assert encoder.proj.kernel.dtype == jnp.bfloat16
    expected = state["model"].encoder.proj.kernel[...].astype(jnp.bfloat16)
    np.testing.assert_array_equal(encoder.proj.kernel[...], expected)


def test_shape_mismatch_names_the_key_path_and_both_shapes(saved):
    workdir, _ = saved
    with Checkpointer(workdir) as ck, pytest.raises(CheckpointError) as info:
        ck.restore(jax.eval_shape(lambda: make_state(0, 6)))  # abstract: shapes are checked before any read
    message = str(info.value)
    assert "\n" not in message and str(checkpoint_dir(workdir) / "10") in message
    assert "model/encoder/embed/embedding/value: checkpoint shape (11, 4) != template shape (11, 6)" in message

    head_mismatch = r"model/head/bias/value: checkpoint shape \(3,\) != template shape \(5,\) \(and 1 more"
    with pytest.raises(CheckpointError, match=head_mismatch):
        restore_params(workdir, nnx.Linear(4, 5, rngs=nnx.Rngs(0)), prefix="head")


def test_missing_or_unexpected_keys_are_errors_not_partial_loads(saved):
    workdir, _ = saved
    with pytest.raises(CheckpointError, match="model/head/bias/value: in the checkpoint but not in the template"):
        restore_params(workdir, nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(0)), prefix="head")
    with pytest.raises(CheckpointError, match="model/encoder/extra/value: missing from the checkpoint"):
        encoder = Encoder(rngs=nnx.Rngs(0))
        encoder.extra = nnx.Param(jnp.zeros(2))
        restore_params(workdir, encoder, prefix="encoder")
    with pytest.raises(CheckpointError, match="no 'model/decoder' subtree"):
        restore_params(workdir, Encoder(rngs=nnx.Rngs(0)), prefix="decoder")
    state = make_state(0)
    state["ema"] = jnp.zeros(3)
    missing = r"ema: missing from the checkpoint \(template shape \(3,\)\)"
    with Checkpointer(workdir) as ck, pytest.raises(CheckpointError, match=missing):
        ck.restore(state)


def test_other_major_version_is_an_error_minor_a_warning(tmp_path, monkeypatch, caplog):
    state = make_state(0)
    monkeypatch.setattr(flaxlm, "__version__", "1.2.0")
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state)
    monkeypatch.setattr(flaxlm, "__version__", "2.0.0")
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="written by flaxlm 1.2.0, this is flaxlm 2.0.0"):
        ck.restore(state)
    with pytest.raises(CheckpointError, match="flaxlm 1.2.0"):
        restore_params(tmp_path, state["model"])
    relaxed = Checkpointer(tmp_path, version_check="warn")
    with caplog.at_level(logging.WARNING, logger="flaxlm.checkpoint"):
        restored, _, _ = relaxed.restore(state)
    assert "written by flaxlm 1.2.0" in caplog.text
    assert_bit_equal(restored, state)

    monkeypatch.setattr(flaxlm, "__version__", "1.3.0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxlm.checkpoint"):
        ck.restore(state)
    assert "this is flaxlm 1.3.0" in caplog.text
    with pytest.raises(CheckpointError, match="version_check='exact'"):
        Checkpointer(tmp_path, version_check="exact").restore(state)
    with pytest.raises(ValueError, match="version_check"):
        Checkpointer(tmp_path, version_check="minor")


def test_tokenizer_mismatch_names_both_fingerprints(saved):
    workdir, state = saved
    other = {"vocab": ["a", "c"]}
    ck = Checkpointer(workdir, tokenizer=other)
    with pytest.raises(CheckpointError, match="tokenizer does not match") as info:
        ck.restore(state)
    saved_fp = load_metadata(workdir)["tokenizer_fingerprint"]
    assert saved_fp in str(info.value) and ck._tokenizer_fingerprint in str(info.value)
    with pytest.raises(CheckpointError, match="tokenizer fingerprint"):
        restore_params(workdir, state["model"], tokenizer="not-the-same")
    assert_bit_equal(restore_params(workdir, state["model"], tokenizer={"vocab": ["a", "b"]}), state["model"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_byte_in_array_data_is_detected(tmp_path):
    big = {"model": {"w": jnp.asarray(np.random.RandomState(0).randn(64, 64).astype(np.float32))}}
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, big)
        ck.save(2, big)
    step_dir = checkpoint_dir(tmp_path) / "2"
    for data in array_data_files(step_dir):
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 0x40
        data.write_bytes(bytes(blob))
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CheckpointError, match="checksum mismatch for model/w") as info:
            ck.restore(big)
        assert str(step_dir) in str(info.value) and "\n" not in str(info.value)
        restored, _, _ = ck.restore(big, step=1)
    assert_bit_equal(restored, big)


# Orbax's aborted async reads can leave tensorstore callbacks aimed at a closed event loop: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("target", ["array data", "metadata json", "data state json"])
def test_truncated_or_garbled_files_are_detected(saved, target):
    workdir, state = saved
    step_dir = checkpoint_dir(workdir) / "10"
    if target == "array data":
        for path in array_data_files(step_dir):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif target == "metadata json":
        path = step_dir / "meta" / "metadata"
        path.write_bytes(path.read_bytes()[:40])
    else:
        path = step_dir / "data" / "metadata"
        path.write_text(path.read_text().replace("12", "13"))
    with Checkpointer(workdir) as ck, pytest.raises(CheckpointError) as info:
        ck.restore(state)
    assert str(step_dir) in str(info.value) and "\n" not in str(info.value)


def test_unwritable_workdir_is_an_error_naming_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="is not writable") as info:
        Checkpointer(blocker / "run")
    assert str(blocker / "run" / "checkpoints") in str(info.value)


def test_read_only_checkpoint_dir_keeps_previous_checkpoints(saved):
    workdir, state = saved
    directory = checkpoint_dir(workdir)
    directory.chmod(0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (the full-disk test covers this)")
        with pytest.raises(CheckpointError, match=str(directory)):
            Checkpointer(workdir)
        restored, _, _ = Checkpointer(workdir, read_only=True).restore(state)
        assert_bit_equal(restored, state)
    finally:
        directory.chmod(0o755)


def test_full_disk_error_names_the_path_and_keeps_previous_checkpoints(tmp_path):
    # RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk fails them with ENOSPC.
    result = run_python(
        f"""
        import json, os, resource, signal
        import jax.numpy as jnp, numpy as np
        from flaxlm.checkpoint import Checkpointer, CheckpointError
        w = jnp.asarray(np.random.RandomState(0).randn(256, 256).astype(np.float32))
        ck = Checkpointer({str(tmp_path)!r}, max_to_keep=1)
        ck.save(1, {{"model": {{"w": w}}}})
        ck.wait_until_finished()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        errors = []
        try:
            ck.save(2, {{"model": {{"w": w + 1}}}})
            ck.wait_until_finished()
        except CheckpointError as e:
            errors.append(str(e))
        after_failure = ck.latest_step()
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        restored, _, _ = ck.restore({{"model": {{"w": w}}}})
        intact = bool(np.array_equal(restored["model"]["w"], w))
        ck.save(3, {{"model": {{"w": w + 3}}}})
        ck.close()
        print("RESULT" + json.dumps({{"errors": errors, "after_failure": after_failure, "intact": intact}}))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    assert len(out["errors"]) == 1
    message = out["errors"][0]
    assert str(checkpoint_dir(tmp_path)) in message and "step 2" in message and "File too large" in message
    assert out["after_failure"] == 1 and out["intact"]
    with Checkpointer(tmp_path) as ck:
        assert ck.all_steps() == [3]


def test_leftover_temporary_directory_is_never_picked_up(saved):
    workdir, state = saved
    directory = checkpoint_dir(workdir)
    ck = Checkpointer(workdir)
    partial = directory / "11.orbax-checkpoint-tmp"
    shutil.copytree(directory / "10", partial)
    shutil.rmtree(partial / "state" / "ocdbt.process_0")
    assert ck.latest_step() == 10 and ck.all_steps() == [10]
    restored, _, _ = ck.restore(make_state(3))
    assert_bit_equal(restored, state)
    ck.close()
    # Opening the directory again removes the leftover (Orbax cleanup_tmp_directories).
    with Checkpointer(workdir) as again:
        assert again.latest_step() == 10
        for _ in range(100):
            if not partial.exists():
                break
            time.sleep(0.05)
    assert not partial.exists()


def test_process_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path):
    result = run_python(
        f"""
        import os, signal
        import jax.numpy as jnp, numpy as np
        from flaxlm.checkpoint import Checkpointer
        w = jnp.asarray(np.random.RandomState(0).randn(1024, 1024).astype(np.float32))
        ck = Checkpointer({str(tmp_path)!r})
        ck.save(1, {{"model": {{"w": w}}}}, data_state={{"position": 1}})
        ck.wait_until_finished()
        ck.save(2, {{"model": {{"w": w + 1}}}}, data_state={{"position": 2}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert result.returncode == -9
    leftovers = [p.name for p in checkpoint_dir(tmp_path).iterdir() if "tmp" in p.name]
    w = np.random.RandomState(0).randn(1024, 1024).astype(np.float32)
    with Checkpointer(tmp_path) as ck:
        step = ck.latest_step()
        restored, data_state, _ = ck.restore({"model": {"w": jnp.zeros_like(w)}})
    # The kill lands before step 2's write starts (no leftovers, step 1), in the middle of it (temporary
    # leftovers, step 1) or after it finished (step 2): whichever, the latest checkpoint is complete.
    expected = {1: w, 2: w + 1}
    assert step in expected and data_state == {"position": step}
    np.testing.assert_array_equal(restored["model"]["w"], expected[step])
    if leftovers:
        assert step == 1


def test_save_skips_old_steps_and_force_refuses_to_overwrite(saved):
    workdir, state = saved
    with Checkpointer(workdir, async_save=False) as ck:
        assert not ck.save(10, state)
        assert not ck.save(5, state)
        with pytest.raises(CheckpointError, match="step 10"):
            ck.save(10, state, force=True)
        assert ck.all_steps() == [10]


def test_nothing_to_restore_and_bad_arguments(tmp_path):
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CheckpointError, match="no finalized checkpoint"):
            ck.restore(make_state(0))
        with pytest.raises(CheckpointError, match="data_state must be JSON-serializable"):
            ck.save(1, make_state(0), data_state={"x": object()})
        with pytest.raises(CheckpointError, match="cannot checkpoint a leaf of type str"):
            ck.save(1, {"model": {"name": "gpt"}})
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        restore_params(tmp_path / "missing", make_state(0)["model"])
