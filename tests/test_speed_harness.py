"""benchmarks/speed.py compares equal models: same parameter counts, and with torch's weights the same losses.

Each case at its tiny size: the flaxlm and PyTorch builders give models with the same number of trained
parameters; flaxlm's model loaded with the PyTorch model's weights gives the same loss on the benchmark batch,
and (both taking one AdamW step with the harness's optimizer settings) the same loss after the update.
No timings are asserted.
"""

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch not installed: parity tests need it (pip install -e .[test])")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import speed  # noqa: E402
import speed_cases  # noqa: E402
import speed_flaxlm  # noqa: E402
import speed_torch  # noqa: E402

from flaxlm.interop.nanogpt import gpt_from_nanogpt_state_dict  # noqa: E402
from flaxlm.interop.torch import from_torch  # noqa: E402

TINY = [(name, speed_cases.case_size(name, tiny=True)) for name in speed_cases.CASES]
TINY_MAX_POOLING = ("bilstm_max", speed_cases.case_size("bilstm", tiny=True, pooling="max"))


def _put(param, value: torch.Tensor) -> None:
    param.set_value(jnp.array(value.detach().numpy(), copy=True))


def _copied_state(module) -> dict:
    """The module's state_dict with cloned tensors: the flaxlm arrays must not share torch's memory, which
    the torch optimizer updates in place."""
    return {key: value.clone() for key, value in module.state_dict().items()}


def _load_linear(linear, torch_linear) -> None:
    _put(linear.kernel, torch_linear.weight.T)
    if torch_linear.bias is not None:
        _put(linear.bias, torch_linear.bias)


def flaxlm_with_torch_weights(size, torch_model):
    """The flaxlm model of `size` holding `torch_model`'s weights."""
    if isinstance(size, speed_cases.GPTSize):
        args = dataclasses.asdict(torch_model.args)
        model, _ = gpt_from_nanogpt_state_dict(_copied_state(torch_model), args)
        return model
    model = speed_flaxlm.make_model(size)
    if isinstance(size, speed_cases.BiLSTMSize):
        _put(model.embed.embedding, torch_model.embed.weight)
        model.backbone = from_torch(model.backbone, _copied_state(torch_model.lstm))
        _load_linear(model.head, torch_model.head)
        return model
    _put(model.src_embed.embedding, torch_model.src_embed.weight)
    _put(model.tgt_embed.embedding, torch_model.tgt_embed.weight)
    model.encoder = from_torch(model.encoder, _copied_state(torch_model.encoder))
    model.decoder = from_torch(model.decoder, _copied_state(torch_model.decoder))
    for name in ("attn_score", "attn_combine", "output"):
        _load_linear(getattr(model, name), getattr(torch_model, name))
    return model


def test_parameter_counts_match():
    """Every case, full and tiny, built abstractly (no weights allocated: nnx.eval_shape, torch's meta device)."""
    sizes = [(name, speed_cases.case_size(name)) for name in speed_cases.CASES] + TINY + [TINY_MAX_POOLING]
    for name, size in sizes:
        abstract = nnx.eval_shape(functools.partial(speed_flaxlm.make_model, size))
        flax_count = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        with torch.device("meta"):
            torch_count = speed_torch.num_params(speed_torch.make_model(size))
        assert flax_count == torch_count, (name, size)


@pytest.mark.parametrize("name,size", TINY, ids=[name for name, _ in TINY])
def test_one_step_gives_the_same_losses(name, size):
    torch_bench = speed_torch.Bench(size, seed=0)
    flax_bench = speed_flaxlm.Bench(size, model=flaxlm_with_torch_weights(size, torch_bench.model))
    assert flax_bench.num_params == torch_bench.num_params
    losses = []
    for _ in range(2):
        torch_bench.step()
        flax_bench.step()
        losses.append((torch_bench.last_loss(), flax_bench.last_loss()))
    (torch_first, flax_first), (torch_second, flax_second) = losses
    assert np.isfinite(flax_first) and np.isfinite(torch_first)
    assert abs(flax_first - torch_first) <= 1e-5
    assert abs(flax_second - torch_second) <= 1e-4
    assert torch_second < torch_first


def test_gpt_flops_formula():
    """gpt_cpu, as flaxlm.tasks.lm: (6 N + 12 L C T) B T with N = 12 L C^2 + C V: about 4.0 GFLOP
    (6 x 0.79M x 768 = 3.6 GFLOP for the blocks, plus attention and the tied head)."""
    size = speed_cases.case_size("gpt_cpu")
    n = 12 * 4 * 128**2 + 128 * 65
    assert speed_cases.model_flops_per_step(size) == (6 * n + 12 * 4 * 128 * 64) * 12 * 64
    assert 3.9e9 < speed_cases.model_flops_per_step(size) < 4.0e9


def test_lstm_flops_formula():
    """BiLSTM 2 layers, E=256, H=256: per token 2 * 4H(E + H) + 2 * 4H(2H + H), plus the head per sequence."""
    size = speed_cases.case_size("bilstm")
    per_token = 2 * 4 * 256 * (256 + 256) + 2 * 4 * 256 * (512 + 256)
    expected = 6 * (64 * 64 * per_token + 64 * 512 * 2)
    assert speed_cases.model_flops_per_step(size) == expected


def test_rounds_give_the_median_run_and_the_median_paired_ratio():
    """Three rounds on a drifting host: each framework reports its median round; ratios pair runs of one round."""

    def run(ms):
        return {"median_step_s": ms / 1e3, "num_params": 1}

    rounds = [{"flaxlm": run(100), "torch": run(50)},  # a slow minute for both: ratio 2.0
              {"flaxlm": run(60), "torch": run(60)},  # ratio 1.0
              {"flaxlm": run(90), "torch": {"error": "worker exited with status 1: boom"}}]
    out = speed.combine_rounds(rounds)
    assert out["flaxlm"]["median_step_s"] == 0.09
    assert out["flaxlm"]["rounds_s"] == [0.1, 0.06, 0.09]
    assert out["torch"]["median_step_s"] == 0.05  # the median of its two good rounds (the lower one)
    assert out["ratios_flaxlm_torch"] == [2.0, 1.0]
    assert out["ratio_flaxlm_torch"] == 1.5
    assert "ratio_flaxlm_torch_compile" not in out


def test_dot_backend_pairs_are_parsed_and_bad_ones_named(capsys):
    parser = speed.argparse.ArgumentParser()
    assert speed._dot_backends(parser, ["gpt_large=eigen", "gpt_cpu=onednn"]) == {"gpt_large": "eigen",
                                                                                 "gpt_cpu": "onednn"}
    with pytest.raises(SystemExit):
        speed._dot_backends(parser, ["gpt_large=mkl"])
    assert "--dot-backend 'gpt_large=mkl': expected CASE=NAME" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")  # oneDNN programs
def test_the_bench_builds_its_step_with_the_chosen_dot_backend():
    bench = speed_flaxlm.Bench(speed_cases.case_size("gpt_cpu", tiny=True), dot_backend="onednn")
    assert "__onednn_fusion" in bench.lower().compile().as_text()
