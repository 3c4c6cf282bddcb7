"""dot_backend: each choice really puts the step's matmuls in its library, and the step's results do not change."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.experiment import TrainConfig
from flaxlm.train import (
    OptimizerConfig,
    TrainState,
    create_ablation,
    make_ablation_step,
    make_eval_step,
    make_mesh,
    make_optimizer,
    make_train_step,
)
from flaxlm.train.dot_backend import DOT_BACKENDS, compiler_options
from tiny_lm import lm_loss, make_batch, make_model

# JAX cannot store oneDNN-compiled programs in the tests' persistent compilation cache and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")
ADAMW = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.1))
# What each library's matmul looks like in the optimized HLO: a custom fusion, or XLA's own dot (Eigen).
FUSION = {"xla": "__ynn_fusion", "onednn": "__onednn_fusion"}


def _state():
    return TrainState.create(make_model(0), ADAMW, 1)


def _compiled_text(step, state, batch) -> str:
    return step.lower(state, batch).compile().as_text()


@pytest.mark.parametrize("name", DOT_BACKENDS)
def test_the_train_step_runs_its_matmuls_in_the_chosen_library(name):
    text = _compiled_text(make_train_step(lm_loss, dot_backend=name), _state(), make_batch(0))
    for backend, fusion in FUSION.items():
        assert (fusion in text) == (backend == name), (backend, name)
    if name == "eigen":
        assert " dot(" in text


@pytest.mark.parametrize("name", [n for n in DOT_BACKENDS if n != "xla"])
def test_steps_give_the_same_results_whatever_the_library(name):
    batch = make_batch(0, pad_rows=(1,))
    reference, chosen = make_train_step(lm_loss, donate=False), make_train_step(lm_loss, donate=False,
                                                                                 dot_backend=name)
    a, b = _state(), _state()
    for _ in range(3):
        (a, metrics_a), (b, metrics_b) = reference(a, batch), chosen(b, batch)
        np.testing.assert_allclose(float(metrics_b["loss"]), float(metrics_a["loss"]), rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6),
                 jax.tree.leaves(a.model), jax.tree.leaves(b.model))
    evaluated = make_eval_step(lm_loss, dot_backend=name)(b.model, batch)
    np.testing.assert_allclose(float(evaluated["loss"]), float(make_eval_step(lm_loss)(b.model, batch)["loss"]),
                               rtol=1e-5)


def test_sharded_steps_take_the_option_too():
    mesh = make_mesh()
    step = make_train_step(lm_loss, mesh=mesh, dot_backend="onednn")
    assert "__onednn_fusion" in _compiled_text(step, _state(), make_batch(0))


def test_other_platforms_get_no_options():
    gpu = type("FakeGpu", (), {"platform": "gpu"})()
    assert compiler_options("onednn", [gpu]) is None
    assert compiler_options("xla") is None
    assert compiler_options("eigen") == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_unknown_library_is_a_clear_error():
    with pytest.raises(ValueError, match=r"dot_backend must be one of \('xla', 'eigen', 'onednn'\), got 'mkl'"):
        make_train_step(lm_loss, dot_backend="mkl")
    with pytest.raises(ValueError, match="dot_backend must be one of"):
        make_eval_step(lm_loss, dot_backend="MKL")


def test_a_step_meant_for_the_callers_pmap_refuses_the_option():
    with pytest.raises(ValueError, match="compile option of the top-level jit; with axis_name and no mesh"):
        make_train_step(lm_loss, axis_name="data", dot_backend="eigen")
    with pytest.raises(ValueError, match="pass mesh="):
        make_eval_step(lm_loss, axis_name="data", dot_backend="onednn")


def test_the_config_offers_exactly_these_libraries():
    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["dot_backend"]) == DOT_BACKENDS
    assert TrainConfig().dot_backend == "xla"


def test_a_bad_config_value_names_the_key():
    from flaxlm.config import ConfigError, from_dict
    from flaxlm.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match=r"train\.dot_backend: expected one of 'xla', 'eigen', 'onednn'"):
        from_dict(ExperimentConfig, {"train": {"dot_backend": "mkl"}})


def test_ablation_steps_take_the_option_too():
    """make_ablation_step jits the vmapped step itself: the option must reach that outer compilation."""
    keys = jax.random.split(jax.random.key(0), 2)
    states = create_ablation(make_model, make_optimizer(OptimizerConfig(name="adamw", learning_rate=1.0)), keys,
                             learning_rate=jnp.array([1e-3, 1e-2]))
    for name in ("xla", "onednn"):
        text = make_ablation_step(lm_loss, dot_backend=name).lower(states, make_batch(0)).compile().as_text()
        assert ("__onednn_fusion" in text) == (name == "onednn"), name
    with pytest.raises(ValueError, match="dot_backend must be one of"):
        make_ablation_step(lm_loss, dot_backend="mkl")
