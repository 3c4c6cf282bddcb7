"""benchmarks/profile_torch.py: PyTorch's ops sorted into profile_step.py's kinds, and the side-by-side table."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_torch  # noqa: E402
import speed_cases  # noqa: E402


@pytest.mark.parametrize("name, in_optimizer, expected", [
    ("aten::mm", False, "matmul"),
    ("aten::addmm", False, "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", False, "attention"),
    ("aten::mkldnn_rnn_layer_backward", False, "recurrence"),
    ("autograd::engine::evaluate_function: MkldnnRnnLayerBackward0", False, "recurrence"),
    ("autograd::engine::evaluate_function: MmBackward0", False, "framework"),
    ("MmBackward0", False, "framework"),
    ("aten::view", False, "framework"),
    ("aten::empty_strided", False, "framework"),
    ("aten::cat", False, "layout"),
    ("aten::copy_", False, "layout"),
    ("aten::gelu_backward", False, "other"),
    ("aten::index_select", False, "other"),
    ("aten::mul_", True, "optimizer"),
    ("Optimizer.step#AdamW.step", False, "optimizer"),
])
def test_category(name, in_optimizer, expected):
    assert profile_torch.category(name, in_optimizer) == expected


def test_profile_of_a_tiny_gpt_step_adds_up(monkeypatch):
    monkeypatch.setattr(profile_torch, "case_size", lambda name: speed_cases.case_size(name, tiny=True))
    result = profile_torch.profile_case("gpt_cpu", steps=2)
    categories = result["categories_ms"]
    assert set(categories) == set(profile_torch.CATEGORIES)
    for kind in ("matmul", "attention", "optimizer", "other"):
        assert categories[kind] > 0.0, kind
    assert categories["recurrence"] == 0.0
    assert sum(categories.values()) <= result["profiled_ms"] * 1.01
    assert result["unattributed_ms"] == pytest.approx(result["profiled_ms"] - sum(categories.values()), abs=1e-6)


def test_comparison_folds_both_sides_into_the_same_columns():
    flaxlm = {"gpt_cpu": {"wall_ms": 50.0, "dispatch_ms": 2.0, "wall_categories_ms": {
        "matmul": 20.0, "attention: matmul": 4.0, "attention: other": 3.0, "other": 5.0, "layout": 6.0,
        "optimizer": 1.0, "loop": 0.5, "idle": 8.5}}}
    torch_result = {"gpt_cpu": {"wall_ms": 40.0, "profiled_ms": 45.0, "unattributed_ms": 4.0, "categories_ms": {
        "matmul": 25.0, "attention": 6.0, "recurrence": 0.0, "optimizer": 3.0, "layout": 1.0, "other": 4.0,
        "framework": 2.0}}}
    ours = profile_torch.flaxlm_columns(flaxlm["gpt_cpu"])
    assert ours["attention"] == 7.0 and ours["overhead"] == 11.0 and ours["recurrence"] == 0.0
    assert profile_torch.torch_columns(torch_result["gpt_cpu"])["overhead"] == 6.0
    table = profile_torch.comparison(flaxlm, torch_result)
    cells = ["gpt_cpu", "50.0 / 45.0", "20.0 / 25.0", "7.0 / 6.0", "0.0 / 0.0", "1.0 / 3.0", "6.0 / 1.0", "5.0 / 4.0",
             "11.0 / 6.0"]
    assert "| " + " | ".join(cells) + " |" in table


def test_a_flaxlm_profile_without_wall_times_is_refused(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text('{"gpt_cpu": {"wall_ms": 50.0}}')
    with pytest.raises(SystemExit):
        profile_torch.main(["--cases", "gpt_cpu", "--flaxlm", str(old)])
    assert "no wall_categories_ms" in capsys.readouterr().err
