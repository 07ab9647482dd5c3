"""odeint/odeint_adjoint with torchdiffeq's semantics, checked against torchdiffeq itself (a
test-only reference), scipy and finite differences."""

import math
import warnings

import pytest
import torch
import torchdiffeq

from neuralode.solvers import SolverError, method_names, odeint, odeint_adjoint, odeint_event, solve_ivp

T = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)


def decay(t, y):
    return -0.5 * y + torch.sin(t)


def test_a_scalar_state_keeps_its_shape():
    y0 = torch.tensor(1.0, dtype=torch.float64)
    ours = odeint(decay, y0, T, rtol=1e-10, atol=1e-12)
    theirs = torchdiffeq.odeint(decay, y0, T, rtol=1e-10, atol=1e-12)
    assert ours.shape == theirs.shape == (5,)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "adaptive_heun", "rk4", "explicit_adams"])
def test_tuple_states_match_torchdiffeq(method):
    def func(t, state):
        x, w = state  # x' = -x / 2, and w = (cos t, -sin t) rotates
        return -0.5 * x, torch.stack([w[..., 1], -w[..., 0]], -1)

    y0 = (torch.tensor(1.0, dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    kwargs = dict(rtol=1e-6, atol=1e-8, method=method)
    if method == "rk4":
        kwargs["options"] = {"step_size": 0.01}
    if method == "explicit_adams":  # torchdiffeq's default max_order (12) is unstable here
        kwargs["options"] = {"step_size": 0.01, "max_order": 5}
    ours, theirs = odeint(func, y0, T, **kwargs), torchdiffeq.odeint(func, y0, T, **kwargs)
    assert isinstance(ours, tuple) and [o.shape for o in ours] == [(5,), (5, 1, 2)]
    torch.testing.assert_close(ours[0], torch.exp(-0.5 * T), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[1][:, 0, 0], torch.cos(T), rtol=0, atol=1e-4)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=0, atol=3e-4)


def test_one_output_time_still_validates():
    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown method 'nonsense'"):
        odeint(decay, y0, T[:1], method="nonsense")
    with pytest.raises(ValueError, match="do not apply to euler"):
        odeint(decay, y0, T[:1], method="euler", options={"first_step": 0.1})
    out = odeint(decay, y0, T[:1], method=None)
    assert out.shape == (1, 2) and torch.equal(out[0], y0)


def test_method_none_is_dopri5():
    y0 = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(odeint(decay, y0, T, method=None), odeint(decay, y0, T, method="dopri5"), rtol=0, atol=0)


def test_every_method_name_is_accepted():
    y0 = torch.ones(1, dtype=torch.float64)
    for name in method_names():
        options = (
            {}
            if name in ("dopri5", "dopri8", "tsit5", "bosh3", "adaptive_heun", "fehlberg2", "scipy_solver")
            else {"step_size": 0.1}
        )
        out = odeint(decay, y0, T, method=name, rtol=1e-6, atol=1e-8, options=options)
        assert out.shape == (5, 1) and bool(torch.isfinite(out).all()), name


def test_many_output_times_cost_no_extra_steps():
    """Outputs between steps come from the dense output (torchdiffeq's behaviour), so asking
    for 100 of them costs the NFE of asking for the end point alone."""
    calls = {"n": 0}

    def counted(t, y):
        calls["n"] += 1
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    odeint(counted, y0, torch.tensor([0.0, 10.0], dtype=torch.float64), rtol=1e-6, atol=1e-8)
    ends_only, calls["n"] = calls["n"], 0
    t = torch.linspace(0.0, 10.0, 101, dtype=torch.float64)
    out = odeint(counted, y0, t, rtol=1e-6, atol=1e-8)
    assert calls["n"] == ends_only
    torch.testing.assert_close(out[:, 0], torch.cos(t), rtol=0, atol=1e-5)


def test_fixed_grid_outputs_between_grid_points_are_interpolated_like_torchdiffeq():
    t = torch.tensor([0.0, 0.33, 0.71, 1.0], dtype=torch.float64)
    y0 = torch.tensor([1.0], dtype=torch.float64)
    for interp in ("linear", "cubic"):
        options = {"step_size": 0.1, "interp": interp}
        ours = odeint(decay, y0, t, method="rk4", options=options)
        theirs = torchdiffeq.odeint(decay, y0, t, method="rk4", options=options)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # torchdiffeq's rk4 is the 3/8 rule


def test_grid_constructor_and_step_t_choose_the_steps():
    seen = []

    def func(t, y):
        seen.append(float(t))
        return y

    grid = torch.tensor([0.0, 0.1, 0.35, 0.5, 1.0])
    out = odeint(
        func,
        torch.tensor(1.0),
        torch.tensor([0.0, 1.0]),
        method="euler",
        options={"grid_constructor": lambda f, y0, t: grid},
    )
    assert seen == pytest.approx([0.0, 0.1, 0.35, 0.5])
    assert float(out[1]) == pytest.approx(1.1 * 1.25 * 1.15 * 1.5)
    seen.clear()
    odeint(
        func,
        torch.tensor(1.0, dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
        options={"step_t": torch.tensor([0.3], dtype=torch.float64), "first_step": 0.25},
    )
    assert 0.3 in seen  # the first stage of the step after the stop


def test_perturb_evaluates_beside_the_grid_points():
    seen = []

    def func(t, y):
        seen.append(float(t))
        return -y

    odeint(
        func,
        torch.tensor(1.0, dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
        method="midpoint",
        options={"step_size": 0.5, "perturb": True},
    )
    assert 0.0 not in seen and 0.5 not in seen and min(seen) > 0.0 and min(seen) < 1e-15


def test_jump_t_saves_evaluations_at_a_discontinuity():
    calls = {"n": 0}

    def jump(t, x):
        calls["n"] += 1
        return -0.5 * x if t < 0.5 else x**2

    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    plain = odeint(jump, x0, t, rtol=1e-8, atol=1e-8)
    blind, calls["n"] = calls["n"], 0
    aware = odeint(jump, x0, t, rtol=1e-8, atol=1e-8, options={"jump_t": torch.tensor([0.5])})
    assert calls["n"] < blind / 2
    x_half = x0 * math.exp(-0.25)
    exact = 1 / (1 / x_half - 0.5)
    torch.testing.assert_close(aware[-1], exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(plain[-1], exact, rtol=1e-5, atol=0)


def test_min_and_max_step_bound_the_steps():
    steps = []

    class Counted(torch.nn.Module):
        def forward(self, t, y):
            return torch.stack([y[1], -y[0]])

        def callback_accept_step(self, t0, y0, dt):
            steps.append(float(dt))

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    odeint(
        Counted(), y0, torch.tensor([0.0, 10.0], dtype=torch.float64), rtol=1e-3, atol=1e-3, options={"max_step": 0.1}
    )
    assert max(steps) <= 0.1 * 1.01 and len(steps) >= 100
    steps.clear()
    odeint(
        Counted(), y0, torch.tensor([0.0, 10.0], dtype=torch.float64), rtol=1e-12, atol=1e-12, options={"min_step": 1.0}
    )
    assert min(steps[:-1]) >= 1.0 and len(steps) <= 11


def test_norm_option_sees_the_users_shapes():
    shapes = []

    def norm(state):
        shapes.append(tuple(s.shape for s in state) if isinstance(state, tuple) else state.shape)
        return state[0].abs().max() if isinstance(state, tuple) else state.abs().max()

    odeint(lambda t, y: -y, torch.tensor(1.0), torch.tensor([0.0, 1.0]), options={"norm": norm})
    assert set(shapes) == {()}
    shapes.clear()
    odeint(
        lambda t, y: (-y[0], -y[1]),
        (torch.tensor(1.0), torch.ones(2, 2)),
        torch.tensor([0.0, 1.0]),
        options={"norm": norm},
    )
    assert set(shapes) == {((), (2, 2))}


def test_step_callbacks_are_called_like_torchdiffeq():
    calls = {"step": 0, "accept": 0, "reject": 0}

    class F(torch.nn.Module):
        def forward(self, t, y):
            return -y * torch.cos(20 * t)

        def callback_step(self, t0, y0, dt):
            calls["step"] += 1
            assert y0.shape == (2,)

        def callback_accept_step(self, t0, y0, dt):
            calls["accept"] += 1

        def callback_reject_step(self, t0, y0, dt):
            calls["reject"] += 1

    odeint(F(), torch.ones(2), torch.tensor([0.0, 3.0]), rtol=1e-6, atol=1e-8, options={"first_step": 1.0})
    assert calls["reject"] > 0 and calls["step"] == calls["accept"] + calls["reject"]
    calls.update(step=0, accept=0, reject=0)
    with pytest.warns(UserWarning, match="does not support callbacks"):
        odeint(F(), torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 0.1})
    assert calls == {"step": 10, "accept": 0, "reject": 0}


def test_event_time_and_its_gradient_match_finite_differences():
    """y' = -y from y0 hits 0.5 at t* = log(2 y0): dt*/dy0 = 1 / y0."""

    def first_below_half(t, y):
        return y - 0.5

    y0 = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    for interface in (odeint, odeint_adjoint):
        kwargs = {} if interface is odeint else {"adjoint_params": ()}
        event_t, ys = odeint_event(
            lambda t, y: -y,
            y0,
            t0,
            event_fn=first_below_half,
            odeint_interface=interface,
            rtol=1e-10,
            atol=1e-12,
            **kwargs,
        )
        assert ys.shape == (2,)
        torch.testing.assert_close(event_t, torch.log(2 * y0.detach()), rtol=1e-9, atol=0)
        torch.testing.assert_close(ys[-1], torch.tensor(0.5, dtype=torch.float64), rtol=1e-9, atol=0)
        (grad,) = torch.autograd.grad(event_t, y0)
        torch.testing.assert_close(grad, 1 / y0.detach(), rtol=1e-6, atol=0)


def test_event_in_reverse_time():
    y0 = torch.tensor([1.0], dtype=torch.float64)
    event_t, ys = odeint_event(
        lambda t, y: -y,
        y0,
        torch.tensor(0.0, dtype=torch.float64),
        event_fn=lambda t, y: y[0] - 2.0,
        reverse_time=True,
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(event_t, torch.tensor(-math.log(2.0), dtype=torch.float64), rtol=1e-9, atol=0)


def test_adjoint_gradients_of_new_methods_match_finite_differences():
    weight = torch.nn.Parameter(torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=torch.float64))

    class F(torch.nn.Module):
        def forward(self, t, y):
            return torch.tanh(y @ weight.T) + 0.1 * torch.sin(t)

    func = F()
    func.weight = weight
    y0 = torch.tensor([0.5, -0.3], dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=torch.float64)

    def loss(w, method, **kwargs):
        with torch.no_grad():
            weight.copy_(w)
        return odeint(func, y0, t, method=method, **kwargs).square().sum()

    # Fixed steps keep the finite differences smooth (adaptive step choices jump with w).
    for method in ("dopri8", "tsit5", "heun3", "gl4", "implicit_adams"):
        kwargs = {"options": {"step_size": 0.05}}
        w0 = weight.detach().clone()
        out = odeint_adjoint(func, y0, t, method=method, rtol=1e-9, atol=1e-10, **kwargs).square().sum()
        (grad,) = torch.autograd.grad(out, weight)
        numeric = torch.zeros_like(w0)
        for i in range(2):
            for j in range(2):
                bump = torch.zeros_like(w0)
                bump[i, j] = 1e-6
                numeric[i, j] = (
                    loss(w0 + bump, method, rtol=1e-9, atol=1e-10, **kwargs)
                    - loss(w0 - bump, method, rtol=1e-9, atol=1e-10, **kwargs)
                ) / 2e-6
        with torch.no_grad():
            weight.copy_(w0)
        torch.testing.assert_close(grad, numeric, rtol=1e-4, atol=1e-6, msg=method)


def test_a_callable_adjoint_norm_sees_the_augmented_parts():
    seen = []

    def adjoint_norm(parts):
        seen.append(tuple(p.shape for p in parts))
        return max(part.abs().max() for part in parts)

    params = (torch.rand(3, requires_grad=True),)
    xs = odeint_adjoint(
        lambda t, y: -y * params[0].sum(),
        torch.tensor(1.0, requires_grad=True),
        torch.tensor([0.0, 1.0]),
        adjoint_params=params,
        adjoint_options={"norm": adjoint_norm},
    )
    xs.sum().backward()
    assert set(seen) == {((), (), (), (3,))}
    assert params[0].grad is not None and bool(torch.isfinite(params[0].grad).all())


def test_scipy_solver_through_odeint_and_the_adjoint():
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(2, 2).double()

    class Func(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, t, y):
            return self.linear(y)

    func = Func()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = odeint_adjoint(func, y0, T, method="scipy_solver", options={"solver": "DOP853"}, rtol=1e-10, atol=1e-12)
    reference = odeint(func, y0, T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-7, atol=1e-9)
    ours.sum().backward()
    scipy_grad, y0.grad = y0.grad.clone(), None
    reference.sum().backward()
    torch.testing.assert_close(scipy_grad, y0.grad, rtol=1e-6, atol=1e-8)


def test_a_failed_odeint_raises():
    with pytest.raises(SolverError, match="MAX_STEPS"):
        odeint(
            lambda t, y: -1e6 * y,
            torch.ones(1, dtype=torch.float64),
            torch.tensor([0.0, 1.0]),
            options={"max_num_steps": 50},
        )


def test_solve_ivp_events_on_an_unbounded_span():
    y0 = torch.tensor([[1.0], [4.0]], dtype=torch.float64)
    solution = solve_ivp(
        lambda t, y: -y, y0, (0.0, math.inf), event_fn=lambda t, y: y[:, 0] - 0.5, rtol=1e-10, atol=1e-12
    )
    assert solution.event.tolist() == [True, True]
    torch.testing.assert_close(solution.t1, torch.log(2 * y0[:, 0]), rtol=1e-9, atol=0)
