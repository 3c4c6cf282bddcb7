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


DOT_HLO = """
%fused_computation.36 (param_0: f32[1536,8000], param_1: f32[512,8000]) -> f32[1536,512] {
  %param_0 = f32[1536,8000]{1,0} parameter(0)
  %param_1 = f32[512,8000]{1,0} parameter(1)
  ROOT %dot_general.9 = f32[1536,512]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

%fused_computation.7 (p0: f32[12,64,32], p1: f32[12,64,32]) -> f32[12,64,64] {
  %p0 = f32[12,64,32]{2,1,0} parameter(0)
  %p1 = f32[12,64,32]{2,1,0} parameter(1)
  ROOT %dot.3 = f32[12,64,64]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}
}

ENTRY %main (a: f32[1536,8000], w: f32[512,8000], q: f32[12,64,32]) -> f32[1536,512] {
  %ynn_fusion.36 = f32[1536,512]{1,0} fusion(%a, %w), kind=kCustom, calls=%fused_computation.36
  %ynn_fusion.7 = f32[12,64,64]{2,1,0} fusion(%q, %q), kind=kCustom, calls=%fused_computation.7
  ROOT %copy.1 = f32[1536,512]{1,0} copy(%ynn_fusion.36)
}
"""


def test_dot_flops_from_the_fused_dot_shapes():
    flops = profile_step.dot_flops(DOT_HLO)
    assert flops["ynn_fusion.36"] == 2 * 1536 * 512 * 8000
    assert flops["ynn_fusion.7"] == 2 * 12 * 64 * 64 * 32
    assert "copy.1" not in flops


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


def test_wall_attribution_splits_shared_time_and_counts_idle():
    wall = profile_step._wall_attribution([("matmul", 0.0, 10.0), ("other", 5.0, 10.0)], 0.0, 20.0)
    assert wall == {"matmul": 7.5, "other": 2.5, "idle": 10.0}
    # A window shorter than one grid cell (a tiny step's execution) still adds up to its own length.
    short = profile_step._wall_attribution([("matmul", 0.0, 0.03)], 0.0, 0.035)
    assert sum(short.values()) == pytest.approx(0.035)
    ragged = profile_step._wall_attribution([("matmul", 0.0, 12.0)], 0.0, 12.0)
    assert ragged == {"matmul": pytest.approx(12.0), "idle": 0.0}


def test_profile_of_a_tiny_bilstm_step_adds_up(monkeypatch):
    monkeypatch.setattr(profile_step, "case_size", lambda name: speed_cases.case_size(name, tiny=True))
    result = profile_step.profile_case("bilstm", steps=2)
    categories = result["categories_ms"]
    assert categories.get("recurrence: matmul", 0.0) > 0.0 and categories.get("optimizer", 0.0) > 0.0
    assert sum(categories.values()) == pytest.approx(result["thread_ms"])
    assert 0.0 <= result["both_busy"] <= 1.0 and 0.0 <= result["idle"] <= 1.0
    assert sum(result["wall_categories_ms"].values()) == pytest.approx(result["execute_ms"], rel=0.02)
    assert result["execute_ms"] > 0.0 and result["wall_ms"] >= result["execute_ms"] * 0.5
    assert result["big_matmuls"] == 0  # a tiny model has no matmul of 5 ms
