"""Bad input gets a clear exception naming what is wrong; failures carry a useful status."""

import math

import pytest
import torch

from neuralode.solvers import SolverError, Status, odeint, odeint_adjoint, solve_ivp


def decay(t, y):
    return -y


Y0 = torch.ones(3, 2, dtype=torch.float64)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(y0=torch.tensor(1.0)), ValueError, "shape \\[B, ...\\]"),
        (dict(y0=torch.ones(0, 2)), ValueError, "B >= 1"),
        (dict(y0=torch.ones(3, 2, dtype=torch.int64)), ValueError, "floating-point"),
        (dict(y0=[[1.0]]), TypeError, "y0 must be a tensor"),
        (dict(y0=torch.tensor([[1.0], [math.nan]])), ValueError, "NaN or Inf \\(first at sample 1\\)"),
        (dict(y0=torch.tensor([[math.inf]])), ValueError, "NaN or Inf"),
        (dict(rtol=0.0), ValueError, "rtol must be > 0"),
        (dict(rtol=-1e-3), ValueError, "rtol must be > 0"),
        (dict(atol=0.0), ValueError, "atol must be > 0"),
        (dict(rtol=math.nan), ValueError, "rtol must be finite"),
        (dict(atol=math.inf), ValueError, "atol must be finite"),
        (dict(rtol=torch.tensor([1e-3, 1e-3])), ValueError, "rtol must be a number or a tensor of shape \\[3\\]"),
        (dict(rtol=torch.tensor([1e-3, -1.0, 1e-3])), ValueError, "rtol must be > 0, got -1.0 \\(sample 1\\)"),
        (dict(method="rk45"), ValueError, "unknown method 'rk45': choose one of adaptive_heun, bosh3, dopri5, dopri8"),
        (dict(t_span=(0.0, 0.0)), ValueError, "t0 != t1"),
        (dict(t_span=(0.0,)), ValueError, "pair"),
        (dict(t_span=(0.0, math.nan)), ValueError, "t_span\\[1\\] must be finite"),
        (dict(t_eval=torch.tensor([0.5, 0.2])), ValueError, "strictly monotone"),
        (dict(t_eval=torch.tensor([0.0, 0.5])), ValueError, "strictly after t0"),
        (dict(t_eval=torch.tensor([0.5, 2.0])), ValueError, "beyond t1"),
        (dict(t_eval=torch.ones(2, 2)), ValueError, "t_eval must have shape"),
        (dict(step_size=0.0, method="rk4"), ValueError, "step_size must be > 0"),
        (dict(first_step=-0.1), ValueError, "first_step must be > 0"),
        (dict(max_steps=0), ValueError, "max_steps must be >= 1"),
        (dict(max_nfe=0), ValueError, "max_nfe must be >= 1"),
        (
            dict(func=lambda t, y: y[:, :1]),
            ValueError,
            "func returned shape \\(3, 1\\), but the state has shape \\(3, 2\\)",
        ),
        (dict(func=lambda t, y: y.float()), ValueError, "func returned dtype torch.float32"),
        (dict(func=lambda t, y: 1.0), TypeError, "func must return a tensor"),
        (dict(adjoint=True, adjoint_norm="max"), ValueError, "adjoint norm must be one of"),
        (dict(adjoint=True, adjoint_norm="full"), ValueError, "supports a single sample, got 3"),
        (dict(adjoint=True, adjoint_rtol=-1.0), ValueError, "adjoint_rtol and adjoint_atol"),
    ],
)
def test_solve_ivp_refuses_bad_input(kwargs, error, message):
    args = dict(func=decay, y0=Y0, t_span=(0.0, 1.0))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        solve_ivp(args.pop("func"), args.pop("y0"), args.pop("t_span"), **args)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: odeint(decay, torch.ones(2), torch.ones(2, 2)), "t must be a non-empty 1-D tensor"),
        (lambda: odeint(decay, torch.ones(2), torch.tensor([])), "t must be a non-empty 1-D tensor"),
        (
            lambda: odeint(decay, torch.ones(2), torch.tensor([0.0, 1.0]), options={"stepsize": 0.1}),
            "\\['stepsize'\\] do not apply to dopri5",
        ),
        (lambda: odeint_adjoint(decay, torch.ones(2), torch.tensor([0.0, 1.0])), "must be an nn.Module"),
        (
            lambda: odeint_adjoint(
                torch.nn.Identity(), torch.ones(2), torch.tensor([0.0, 1.0]), adjoint_options={"norm": "max"}
            ),
            "must be 'seminorm', 'full' or a callable",
        ),
    ],
)
def test_odeint_refuses_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _stiff(t, y):
    return -1e6 * (y - torch.cos(t)[:, None])


def test_max_steps_is_reported_per_sample_and_raised_at_the_edge():
    y0 = torch.ones(2, 1, dtype=torch.float64)
    solution = solve_ivp(_stiff, y0, (0.0, 1.0), rtol=1e-6, atol=1e-9, max_steps=500)
    assert solution.status.tolist() == [Status.MAX_STEPS] * 2
    assert (solution.steps + solution.rejected).tolist() == [500, 500]
    with pytest.raises(SolverError, match="2 of 2 samples failed .*MAX_STEPS: max_steps reached: raise max_steps"):
        solution.raise_for_status()
    with pytest.raises(SolverError, match="max_steps reached"):
        odeint(
            lambda t, y: _stiff(t[None], y[None])[0],
            torch.ones(1, dtype=torch.float64),
            torch.tensor([0.0, 1.0]),
            options={"max_num_steps": 100},
        )


def test_blow_up_underflows_the_step_size():
    # y' = y^2, y(0) = 1 blows up at t = 1.
    solution = solve_ivp(lambda t, y: y**2, torch.ones(1, 1, dtype=torch.float64), (0.0, 2.0), rtol=1e-6, atol=1e-9)
    assert int(solution.status) in (Status.STEP_SIZE_UNDERFLOW, Status.NON_FINITE)
    assert 0.99 < float(solution.t1) < 1.01 and float(solution.y1) > 1e6


def test_non_finite_dynamics_are_reported():
    def breaks_down(t, y):
        return torch.where(t[:, None] > 0.5, torch.full_like(y, math.nan), -y)

    y0 = torch.ones(1, 1, dtype=torch.float64)
    solution = solve_ivp(breaks_down, y0, (0.0, 1.0), rtol=1e-6, atol=1e-9)
    assert int(solution.status) == Status.NON_FINITE
    assert 0.4 < float(solution.t1) <= 0.5
    assert "non-finite" in solution.messages()[0]
    fixed = solve_ivp(breaks_down, y0, (0.0, 1.0), method="rk4", step_size=0.1)
    assert int(fixed.status) == Status.NON_FINITE


def test_non_finite_first_evaluation_is_reported():
    solution = solve_ivp(lambda t, y: y / 0.0 * 0.0, torch.ones(1, 1), (0.0, 1.0))
    assert int(solution.status) == Status.NON_FINITE and int(solution.steps) == 0
