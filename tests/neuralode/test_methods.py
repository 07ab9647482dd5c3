"""Every method against the outside oracle: scipy's DOP853 at rtol 1e-12 (problems.py)."""

import numpy as np
import pytest
import torch
from problems import PROBLEMS

from neuralode.solvers import METHODS, ScipyMethod, solve_ivp

FIXED = sorted(name for name, m in METHODS.items() if not m.adaptive)
ADAPTIVE = sorted(name for name, m in METHODS.items() if m.adaptive)
_CHECKED = [p for p in PROBLEMS if p.name in ("harmonic_oscillator", "van_der_pol", "forced_decay")]


def _error(solution, problem) -> float:
    reference = problem.reference()
    return float(np.abs(solution.y1[0].numpy() - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("problem", _CHECKED, ids=lambda p: p.name)
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_meet_their_tolerance(problem, method):
    rtol = 1e-4 if METHODS[method].order <= 2 else 1e-6
    solution = solve_ivp(
        problem.torch_rhs,
        torch.tensor([problem.y0], dtype=torch.float64),
        problem.t_span,
        method=method,
        rtol=rtol,
        atol=rtol * 1e-3,
    ).raise_for_status()
    # fehlberg2's error estimate is its first-order solution's, whose error constant is 1/512:
    # the second-order solution it propagates (as torchdiffeq does) errs ~1000x more.
    assert _error(solution, problem) <= (2000 if method == "fehlberg2" else 20) * rtol


# Error bounds for 200 fixed steps over 2 time units (h = 0.01), by order: about 3x what each
# method reaches (orders 5 and 6 are implicit, limited by the 1e-8 stage-equation residual).
_FIXED_BOUND = {1: 1e-1, 2: 6e-4, 3: 3e-6, 4: 1.5e-6, 5: 1e-9, 6: 3e-9}


@pytest.mark.parametrize("problem", _CHECKED, ids=lambda p: p.name)
@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_methods_converge_to_the_reference(problem, method):
    t_span = (problem.t_span[0], problem.t_span[0] + 2.0)
    solution = solve_ivp(
        problem.torch_rhs,
        torch.tensor([problem.y0], dtype=torch.float64),
        t_span,
        method=method,
        step_size=0.01,
        rtol=1e-12,
        atol=1e-12,
    ).raise_for_status()
    reference = problem.reference(t_span)
    error = float(np.abs(solution.y1[0].numpy() - reference).max() / np.abs(reference).max())
    assert error <= _FIXED_BOUND[METHODS[method].order], error
    assert int(solution.steps) == 200


@pytest.mark.parametrize("solver", ["RK45", "DOP853", "Radau", "LSODA"])
def test_scipy_wrapper_matches_the_reference(solver):
    problem = next(p for p in PROBLEMS if p.name == "van_der_pol")
    y0 = torch.tensor([problem.y0, problem.y0], dtype=torch.float64)
    t_eval = torch.tensor([2.0, 5.0, 10.0], dtype=torch.float64)
    solution = solve_ivp(
        problem.torch_rhs, y0, problem.t_span, t_eval=t_eval, method=ScipyMethod(solver), rtol=1e-9, atol=1e-12
    ).raise_for_status()
    for k, t in enumerate(t_eval.tolist()):
        reference = problem.reference((0.0, t))
        np.testing.assert_allclose(solution.ys[k, 0].numpy(), reference, rtol=1e-5, atol=1e-7)
    assert bool((solution.nfe > 0).all())
    torch.testing.assert_close(solution.y1[0], solution.y1[1], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3", "adaptive_heun", "gl4", "implicit_adams"])
def test_interpolated_outputs_match_the_reference(method):
    """Outputs between steps come from the method's dense output, within its accuracy."""
    problem = next(p for p in PROBLEMS if p.name == "van_der_pol")
    t_eval = torch.linspace(0.0, 10.0, 41, dtype=torch.float64)[1:]
    fixed = not METHODS[method].adaptive
    rtol = 1e-4 if METHODS[method].order <= 2 else 1e-7
    solution = solve_ivp(
        problem.torch_rhs,
        torch.tensor([problem.y0], dtype=torch.float64),
        problem.t_span,
        t_eval=t_eval,
        method=method,
        rtol=rtol,
        atol=rtol * 1e-2,
        interpolate=True,
        step_size=0.01 if fixed else None,
    ).raise_for_status()
    errors = [
        np.abs(solution.ys[k, 0].numpy() - problem.reference((0.0, t))).max() for k, t in enumerate(t_eval.tolist())
    ]
    # dopri8's interpolant is fourth order (torchdiffeq's quartic), across its long steps.
    scale = 1e-3 if fixed else (1e-4 if method == "dopri8" else 100 * rtol)
    assert max(errors) < scale * 2.0  # |y| is about 2
    # The steps go their own way: exactly those of a solve without outputs.
    alone = solve_ivp(
        problem.torch_rhs,
        torch.tensor([problem.y0], dtype=torch.float64),
        problem.t_span,
        method=method,
        rtol=rtol,
        atol=rtol * 1e-2,
        step_size=0.01 if fixed else None,
    )
    assert int(solution.nfe) == int(alone.nfe) and int(solution.steps) == int(alone.steps)
