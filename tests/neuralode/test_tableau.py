"""Tableaus are consistent data, and every method converges at its stated order."""

import math
from itertools import product

import numpy as np
import pytest
import torch

from neuralode.solvers import METHODS, Adams, ButcherTableau, ExplicitRK, ImplicitRK, ImplicitTableau, solve_ivp
from neuralode.solvers.tableau import _DOPRI8_MID, DOPRI8_TABLEAU

RUNGE_KUTTA = sorted(name for name, m in METHODS.items() if isinstance(m, (ExplicitRK, ImplicitRK)))
ADAPTIVE = sorted(name for name, m in METHODS.items() if m.adaptive)


def _matrix(tableau) -> np.ndarray:
    s = tableau.stages
    A = np.zeros((s, s))
    if isinstance(tableau, ImplicitTableau):
        return np.asarray(tableau.a, dtype=float)
    for i, row in enumerate(tableau.a, start=1):
        A[i, : len(row)] = row
    return A


def _trees(order: int):
    """Rooted trees up to ``order`` as (order, elementary weight function, γ)."""
    trees = {1: [()]}
    for n in range(2, order + 1):
        found = set()

        def grow(remaining, smallest, children):
            if remaining == 0:
                found.add(tuple(sorted(children)))
                return
            for size in range(min(remaining, smallest), 0, -1):
                for child in trees[size]:
                    grow(remaining - size, size, children + [child])

        grow(n - 1, n - 1, [])
        trees[n] = sorted(found)

    def size(tree):
        return 1 + sum(size(child) for child in tree)

    def gamma(tree):
        return size(tree) * math.prod(gamma(child) for child in tree)

    return [(n, tree, gamma(tree)) for n in range(1, order + 1) for tree in trees[n]]


def _residuals(tableau, order: int, b, theta: float = 1.0) -> list[float]:
    """Residuals of the order conditions ``b · Φ(τ) = θ^|τ| / γ(τ)`` for trees up to ``order``."""
    A, b = _matrix(tableau), np.asarray(b, dtype=float)

    def phi(tree):
        value = np.ones(tableau.stages)
        for child in tree:
            value = value * (A @ phi(child))
        return value

    return [float(b @ phi(tree) - theta**n / g) for n, tree, g in _trees(order)]


@pytest.mark.parametrize("name", RUNGE_KUTTA)
def test_tableau_is_consistent(name):
    tableau = METHODS[name].tableau
    A = _matrix(tableau)
    np.testing.assert_allclose(A.sum(1), tableau.c, atol=1e-14)
    assert math.isclose(sum(tableau.b), 1.0, abs_tol=1e-14)
    if getattr(tableau, "b_err", None) is not None:
        assert math.isclose(sum(tableau.b_err), 0.0, abs_tol=1e-14)


@pytest.mark.parametrize("name", RUNGE_KUTTA)
def test_order_conditions_hold(name):
    method = METHODS[name]
    checked = min(method.order, 6)  # trees beyond order 6 are many; dopri8 is checked empirically
    assert max(abs(r) for r in _residuals(method.tableau, checked, method.tableau.b)) < 1e-12
    if method.order <= 5:  # ...and not of a higher order, so the stated order is the order
        assert max(abs(r) for r in _residuals(method.tableau, method.order + 1, method.tableau.b)) > 1e-6
    if method.adaptive:
        b_hat = np.asarray(method.tableau.b) - np.asarray(method.tableau.b_err)
        assert max(abs(r) for r in _residuals(method.tableau, min(method.error_order, 6), b_hat)) < 1e-12
        if method.error_order <= 5:
            assert max(abs(r) for r in _residuals(method.tableau, method.error_order + 1, b_hat)) > 1e-6


@pytest.mark.parametrize("name", ["dopri5", "tsit5", "dopri8"])
def test_dense_output_is_fourth_order_at_every_point(name):
    """The continuous extension b_i(θ) satisfies the order conditions up to order 4 for all θ."""
    tableau = METHODS[name].tableau
    for theta in (0.1, 0.5, 0.9):
        weights = [sum(c * theta ** (j + 1) for j, c in enumerate(poly)) for poly in tableau.b_dense]
        assert max(abs(r) for r in _residuals(tableau, 4, weights, theta)) < 1e-12


def test_dopri8_midpoint_weights_are_fifth_order():
    assert max(abs(r) for r in _residuals(DOPRI8_TABLEAU, 5, _DOPRI8_MID, 0.5)) < 1e-12


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(c=(0.0, 0.5), a=((0.4,),), b=(0.0, 1.0)), "row 1 of a sums"),
        (dict(c=(0.0, 0.5), a=((0.5,),), b=(0.5, 0.6)), "b sums"),
        (dict(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0), b_err=(0.1, 0.0)), "b_err sums"),
        (dict(c=(0.0, 0.5), a=((0.5, 0.0),), b=(0.0, 1.0)), "rows of lengths"),
        (dict(c=(0.1,), a=(), b=(1.0,)), "c\\[0\\] == 0"),
        (dict(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0), b_dense=((0.5,), (1.0,))), "b_dense\\[0\\]\\(1\\)"),
    ],
)
def test_inconsistent_tableau_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ButcherTableau(**change)


def test_inconsistent_implicit_tableau_is_refused():
    with pytest.raises(ValueError, match="row 0 of a sums"):
        ImplicitTableau(c=(0.5,), a=((0.4,),), b=(1.0,))
    with pytest.raises(ValueError, match="1 x 1 matrix"):
        ImplicitTableau(c=(0.5,), a=((0.5, 0.0),), b=(1.0,))


def test_fsal_is_derived_from_the_data():
    assert {name for name, m in METHODS.items() if m.fsal} == {"bosh3", "dopri5", "tsit5", "dopri8"}


# Step counts that put each method in its asymptotic regime on the oscillator below, with
# errors well above float64 rounding (tsit5's small leading error constant needs fine steps);
# the implicit methods, whose steps each solve their stage equations, take no more than that needs.
_STEPS = {
    "euler": (640, 1280, 2560, 5120),
    "implicit_euler": (320, 640, 1280, 2560),
    "midpoint": (320, 640, 1280, 2560),
    "heun2": (320, 640, 1280, 2560),
    "adaptive_heun": (320, 640, 1280, 2560),
    "fehlberg2": (320, 640, 1280, 2560),
    "implicit_midpoint": (160, 320, 640, 1280),
    "trapezoid": (160, 320, 640, 1280),
    "sdirk2": (160, 320, 640, 1280),
    "trbdf2": (160, 320, 640, 1280),
    "heun3": (160, 320, 640, 1280),
    "radauIIA3": (80, 160, 320, 640),
    "gl4": (80, 160, 320, 640),
    "radauIIA5": (40, 60, 80, 120),
    "gl6": (40, 60, 80, 120),
    "dopri8": (100, 140, 200, 280),
}
_SPAN = {"euler": 10.0, "implicit_euler": 10.0}


def _oscillator(t, y):
    return torch.stack([y[:, 1], -y[:, 0]], 1)


def _convergence_slope(method, steps, span, tolerance: float = 1e-14) -> float:
    exact = torch.tensor([math.cos(span), -math.sin(span)], dtype=torch.float64)
    errors = []
    for n in steps:
        y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        # Tight tolerances: iterating methods (corrector, stage equations) converge fully.
        solution = solve_ivp(
            _oscillator, y0, (0.0, span), method=method, step_size=span / n, rtol=tolerance, atol=tolerance
        ).raise_for_status()
        assert int(solution.steps) == n
        errors.append(float((solution.y1[0] - exact).abs().max()))
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("name", RUNGE_KUTTA)
def test_empirical_convergence_order(name):
    """Fixed steps on x'' = -x (exact solution cos, -sin): the error falls like dt**order."""
    slope = _convergence_slope(name, _STEPS.get(name, (160, 320, 640, 1280)), _SPAN.get(name, 40.0))
    assert abs(slope - METHODS[name].order) <= 0.3, slope


@pytest.mark.parametrize(
    "implicit, max_order, steps",
    [
        (False, 4, (160, 320, 640, 1280)),
        (False, 5, (160, 320, 640, 1280)),
        (True, 4, (160, 320, 640, 1280)),
        (True, 5, (240, 320, 480, 640)),
    ],
)
def test_adams_methods_converge_at_their_order(implicit, max_order, steps):
    """With ``max_order`` k the Adams–Bashforth step uses k - 1 past values (order k - 1); the
    Adams–Moulton corrector uses k (order k). The corrector drops to a lower order while it
    does not converge (large steps), so the implicit one is measured where it does."""
    method = Adams("implicit_adams" if implicit else "explicit_adams", implicit=implicit, max_order=max_order)
    slope = _convergence_slope(method, steps, 10.0, tolerance=1e-10)
    assert abs(slope - (max_order if implicit else max_order - 1)) <= 0.3, slope


@pytest.mark.parametrize("name, dtype", list(product(ADAPTIVE, [torch.float32, torch.float64])))
def test_adaptive_methods_run_in_both_precisions(name, dtype, device):
    y0 = torch.tensor([[1.0]], dtype=dtype, device=device)
    solution = solve_ivp(lambda t, y: -y, y0, (0.0, 1.0), method=name, rtol=1e-5, atol=1e-7)
    assert solution.y1.dtype == dtype and solution.y1.device.type == device.type
    tolerance = 1e-3 if name == "fehlberg2" else 1e-4  # its error estimate is the first-order one's
    assert abs(float(solution.y1) - math.exp(-1)) < tolerance
