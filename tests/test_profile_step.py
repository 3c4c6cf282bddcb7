"""benchmarks/profile_step.py: thunks attributed by named scope and kind, on a real trace of a tiny train step."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step  # noqa: E402
import speed_cases  # noqa: E402

HLO = """
%fused_computation.3 (p: f32[4,8]) -> f32[4,8] {
  ROOT %tanh.1 = f32[4,8]{1,0} tanh(%p), metadata={op_name="jit(train_step)/transpose(jvp(recurrence))/tanh"}
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %add_tanh_fusion = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.3
  ROOT %copy.2 = f32[4,8]{1,0} copy(%add_tanh_fusion), metadata={op_name="jit(train_step)/transpose"}
}
"""


def test_op_names_include_the_fused_computation():
    names = profile_step.hlo_op_names(HLO)
    assert names["add_tanh_fusion"] == ["jit(train_step)/transpose(jvp(recurrence))/tanh"]
    assert names["copy.2"] == ["jit(train_step)/transpose"]


@pytest.mark.parametrize("thunk, op_names, expected", [
    ("add_tanh_fusion", ["jit(train_step)/transpose(jvp(recurrence))/tanh"], "recurrence: other"),
    ("ynn_fusion.3", ["jit(train_step)/jvp(recurrence)/while/body/dot_general"], "recurrence: matmul"),
    ("ynn_fusion.7", ["jit(train_step)/jvp()/attention/dot_general"], "attention: matmul"),
    ("select_fusion", ["jit(train_step)/optimizer/select_n"], "optimizer"),
    ("ynn_fusion", ["jit(train_step)/jvp()/dot_general"], "matmul"),
    ("dot.12", [], "matmul"),
    ("copy_bitcast_fusion.4", ["jit(train_step)/transpose(jvp())/reshape"], "layout"),
    ("wrapped_broadcast.5", [], "layout"),
    ("wrapped_add.1", [], "loop"),
    ("multiply_erf_fusion", ["jit(train_step)/jvp()/erf"], "other"),
])
def test_category(thunk, op_names, expected):
    assert profile_step.category(thunk, op_names) == expected


def test_profile_of_a_tiny_bilstm_step_adds_up(monkeypatch):
    monkeypatch.setattr(profile_step, "case_size", lambda name: speed_cases.case_size(name, tiny=True))
    result = profile_step.profile_case("bilstm", steps=2)
    categories = result["categories_ms"]
    assert categories.get("recurrence: matmul", 0.0) > 0.0 and categories.get("optimizer", 0.0) > 0.0
    assert sum(categories.values()) == pytest.approx(result["thread_ms"])
    assert 0.0 <= result["both_busy"] <= 1.0 and 0.0 <= result["idle"] <= 1.0
    assert result["execute_ms"] > 0.0 and result["wall_ms"] >= result["execute_ms"] * 0.5
