"""Tableaus are consistent data, and every method converges at its stated order."""

import math
from itertools import product

import numpy as np
import pytest
import torch

from neuralode.solvers import METHODS, ButcherTableau, solve_ivp

ADAPTIVE = [name for name, m in METHODS.items() if m.adaptive]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_tableau_is_consistent(name):
    tableau = METHODS[name].tableau
    for i, row in enumerate(tableau.a, start=1):
        assert math.isclose(sum(row), tableau.c[i], abs_tol=1e-14)
    assert math.isclose(sum(tableau.b), 1.0, abs_tol=1e-14)
    if tableau.b_err is not None:
        assert math.isclose(sum(tableau.b_err), 0.0, abs_tol=1e-14)


def _order_conditions(tableau: ButcherTableau, order: int, b) -> list[float]:
    """Residuals of the order conditions up to ``order`` (Butcher trees up to order 5)."""
    s = tableau.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tableau.a, start=1):
        A[i, : len(row)] = row
    b, c = np.asarray(b), np.asarray(tableau.c)
    conditions = [(1, b.sum(), 1.0)]
    conditions += [(2, b @ c, 1 / 2)]
    conditions += [(3, b @ c**2, 1 / 3), (3, b @ A @ c, 1 / 6)]
    conditions += [
        (4, b @ c**3, 1 / 4), (4, b @ (c * (A @ c)), 1 / 8),
        (4, b @ A @ c**2, 1 / 12), (4, b @ A @ A @ c, 1 / 24),
    ]  # fmt: skip
    conditions += [
        (5, b @ c**4, 1 / 5), (5, b @ (c**2 * (A @ c)), 1 / 10), (5, b @ ((A @ c) ** 2), 1 / 20),
        (5, b @ (c * (A @ c**2)), 1 / 15), (5, b @ (c * (A @ A @ c)), 1 / 30),
        (5, b @ A @ c**3, 1 / 20), (5, b @ A @ (c * (A @ c)), 1 / 40),
        (5, b @ A @ A @ c**2, 1 / 60), (5, b @ A @ A @ A @ c, 1 / 120),
    ]  # fmt: skip
    return [value - expected for p, value, expected in conditions if p <= order]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_order_conditions_hold(name):
    method = METHODS[name]
    residuals = _order_conditions(method.tableau, method.order, method.tableau.b)
    assert max(abs(r) for r in residuals) < 1e-12
    if method.adaptive:
        b_hat = np.asarray(method.tableau.b) - np.asarray(method.tableau.b_err)
        residuals = _order_conditions(method.tableau, method.error_order, b_hat)
        assert max(abs(r) for r in residuals) < 1e-12
        # ...and the embedded solution is of exactly that order, so the estimate is not zero.
        higher = _order_conditions(method.tableau, method.error_order + 1, b_hat)
        assert max(abs(r) for r in higher) > 1e-6


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(c=(0.0, 0.5), a=((0.4,),), b=(0.0, 1.0)), "row 1 of a sums"),
        (dict(c=(0.0, 0.5), a=((0.5,),), b=(0.5, 0.6)), "b sums"),
        (dict(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0), b_err=(0.1, 0.0)), "b_err sums"),
        (dict(c=(0.0, 0.5), a=((0.5, 0.0),), b=(0.0, 1.0)), "rows of lengths"),
        (dict(c=(0.1,), a=(), b=(1.0,)), "c\\[0\\] == 0"),
    ],
)
def test_inconsistent_tableau_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ButcherTableau(**change)


def test_fsal_is_derived_from_the_data():
    assert {name for name, m in METHODS.items() if m.tableau.fsal} == {"bosh3", "dopri5", "tsit5"}


# Step counts that put each method in its asymptotic regime on the oscillator below, with
# errors well above float64 rounding (tsit5's small leading error constant needs fine steps).
_STEPS = {
    "euler": (640, 1280, 2560, 5120),
    "midpoint": (320, 640, 1280, 2560),
    "rk4": (160, 320, 640, 1280),
    "bosh3": (160, 320, 640, 1280),
    "dopri5": (160, 320, 640, 1280),
    "tsit5": (160, 320, 640, 1280),
}
_SPAN = {"euler": 10.0}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_empirical_convergence_order(name):
    """Fixed steps on x'' = -x (exact solution cos, -sin): the error falls like dt**order."""

    def rhs(t, y):
        return torch.stack([y[:, 1], -y[:, 0]], 1)

    span = _SPAN.get(name, 40.0)
    exact = torch.tensor([math.cos(span), -math.sin(span)], dtype=torch.float64)
    errors = []
    for n in _STEPS[name]:
        y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        solution = solve_ivp(rhs, y0, (0.0, span), method=name, step_size=span / n).raise_for_status()
        assert int(solution.steps) == n
        errors.append(float((solution.y1[0] - exact).abs().max()))
    slope = -np.polyfit(np.log(_STEPS[name]), np.log(errors), 1)[0]
    assert abs(slope - METHODS[name].order) <= 0.3, (errors, slope)


@pytest.mark.parametrize("name, dtype", list(product(ADAPTIVE, [torch.float32, torch.float64])))
def test_adaptive_methods_run_in_both_precisions(name, dtype, device):
    y0 = torch.tensor([[1.0]], dtype=dtype, device=device)
    solution = solve_ivp(lambda t, y: -y, y0, (0.0, 1.0), method=name, rtol=1e-5, atol=1e-7)
    assert solution.y1.dtype == dtype and solution.y1.device.type == device.type
    assert abs(float(solution.y1) - math.exp(-1)) < 1e-4
