"""The PI step-size controller, driven by hand-made error estimates."""

import math

import pytest
import torch

from neuralode.solvers import PIController

K = 5  # dopri5: error estimate of order 4


def decide(controller, errors, prev=None, dt=0.1):
    errors = torch.tensor(errors, dtype=torch.float64)
    prev = torch.ones_like(errors) if prev is None else torch.tensor(prev, dtype=torch.float64)
    return controller.decide(errors, prev, torch.full_like(errors, dt), K)


def test_accept_and_reject_per_sample():
    accept, dt, prev = decide(PIController(), [0.5, 1.0, 1.5, 0.0])
    assert accept.tolist() == [True, True, False, True]
    assert prev.tolist()[2] == 1.0  # a rejected step does not overwrite the remembered error


def test_factors_follow_the_pi_formula():
    c = PIController(pcoeff=0.2, icoeff=0.65, safety=0.9)
    _, dt, _ = decide(c, [0.5], prev=[0.2])
    expected = 0.1 * 0.9 * 0.5 ** (-0.85 / K) * 0.2 ** (0.2 / K)
    assert math.isclose(float(dt), expected, rel_tol=1e-12)


def test_proportional_term_damps_growth_after_a_small_error():
    # With a much smaller previous error, PI grows the step less than pure I control would.
    _, dt_pi, _ = decide(PIController(pcoeff=0.4, icoeff=0.3), [0.3], prev=[0.01])
    _, dt_i, _ = decide(PIController(pcoeff=0.0, icoeff=0.7), [0.3], prev=[0.01])
    assert float(dt_pi) < float(dt_i)


def test_growth_and_shrink_are_clamped():
    c = PIController(min_factor=0.2, max_factor=10.0)
    _, dt, _ = decide(c, [0.0, 1e-30, 1e12])
    assert dt.tolist() == pytest.approx([1.0, 1.0, 0.02])


def test_a_rejected_step_never_grows():
    _, dt, _ = decide(PIController(), [1.0001], prev=[1e-6])
    assert float(dt) < 0.1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_error_rejects_with_the_strongest_shrink(bad):
    accept, dt, prev = decide(PIController(min_factor=0.2), [bad], prev=[0.3])
    assert not bool(accept)
    assert float(dt) == pytest.approx(0.02)
    assert float(prev) == 0.3


def test_signed_steps_keep_their_direction():
    _, dt, _ = decide(PIController(), [0.01], dt=-0.1)
    assert float(dt) < -0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(safety=0.0),
        dict(safety=1.5),
        dict(min_factor=1.0),
        dict(max_factor=0.5),
        dict(icoeff=0.0),
        dict(pcoeff=-0.1),
    ],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PIController(**kwargs)
