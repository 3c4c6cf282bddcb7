"""Learning-rate schedules against their formulas."""

import numpy as np
import pytest

from flaxlm.train import ScheduleConfig, make_schedule

STEPS = np.array([0, 1, 5, 10, 15, 19, 20, 21, 45])


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay_matches_formula(staircase):
    config = ScheduleConfig(kind="exponential", decay_rate=0.5, decay_steps=10, staircase=staircase)
    schedule = make_schedule(config, 0.1)
    exponent = np.floor(STEPS / 10) if staircase else STEPS / 10
    np.testing.assert_allclose([schedule(s) for s in STEPS], 0.1 * 0.5**exponent, rtol=1e-6)


def test_constant_with_and_without_warmup():
    np.testing.assert_allclose([make_schedule(ScheduleConfig(), 0.3)(s) for s in STEPS], 0.3, rtol=1e-7)
    warm = make_schedule(ScheduleConfig(warmup_steps=10), 0.3)
    np.testing.assert_allclose([warm(s) for s in (0, 5, 10, 45)], [0.0, 0.15, 0.3, 0.3], rtol=1e-6)


def test_warmup_cosine_endpoints_and_midpoint():
    config = ScheduleConfig(kind="warmup_cosine", warmup_steps=10, total_steps=30, final_learning_rate=0.01)
    schedule = make_schedule(config, 1.0)
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 5, 10, 20, 30, 40)], [0.0, 0.5, 1.0, 0.01 + 0.99 * 0.5, 0.01, 0.01], rtol=1e-6
    )


def test_inverse_sqrt_after_warmup():
    schedule = make_schedule(ScheduleConfig(kind="inverse_sqrt", warmup_steps=4), 2.0)
    np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 16, 64)], [0.0, 1.0, 2.0, 1.0, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(kind="cosine"), "kind"),
        (dict(kind="exponential", decay_steps=0), "decay_steps"),
        (dict(kind="warmup_cosine", warmup_steps=10, total_steps=10), "total_steps"),
        (dict(kind="inverse_sqrt"), "warmup_steps"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(**kwargs)
