"""The adjoint's gradients match backprop through the solver and finite differences, in memory
that does not grow with the number of steps."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from neuralode.solvers import SolverError, odeint, odeint_adjoint, solve_ivp

TIGHT = dict(rtol=1e-10, atol=1e-12)


class Dynamics(torch.nn.Module):
    """A small time-dependent MLP: f(t, y) = W2 tanh(W1 [y, t] + b1) + b2, per sample."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1).expand(y.shape[0], 1)
        return self.net(torch.cat([y, t], 1))


@pytest.fixture
def problem():
    torch.manual_seed(0)
    func = Dynamics().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64, requires_grad=True)
    return func, y0, t


def _gradients(func, y0, t, solve):
    leaves = [y0, t, *func.parameters()]
    for leaf in leaves:
        leaf.grad = None
    out = solve()
    loss = (out**2).sum() + (out[1] * torch.linspace(-1, 1, out[1].numel(), dtype=out.dtype).view_as(out[1])).sum()
    loss.backward()
    return [leaf.grad.clone() for leaf in leaves]


def _assert_gradients_match(expected, actual, rel=1e-6):
    for name, e, a in zip(["y0", "t", "params"], expected, actual):
        scale = e.abs().max()
        assert scale > 0, name
        assert float((e - a).abs().max() / scale) <= rel, name


@pytest.mark.parametrize("norm", ["full", "seminorm"])
def test_odeint_adjoint_matches_direct_backprop(problem, norm):
    func, y0, t = problem
    direct = _gradients(func, y0, t, lambda: odeint(func, y0, t, **TIGHT))
    adjoint = _gradients(func, y0, t, lambda: odeint_adjoint(func, y0, t, adjoint_options={"norm": norm}, **TIGHT))
    _assert_gradients_match(direct, adjoint)


def test_per_sample_adjoint_matches_direct_backprop(problem):
    func, y0, t = problem
    rtol = torch.tensor([1e-10, 1e-11, 1e-9, 1e-10], dtype=torch.float64)

    def solve(adjoint):
        solution = solve_ivp(func, y0, (t[0], t[-1]), t_eval=t[1:], rtol=rtol, atol=1e-12, adjoint=adjoint)
        return torch.cat([y0[None], solution.ys])

    _assert_gradients_match(_gradients(func, y0, t, lambda: solve(False)), _gradients(func, y0, t, lambda: solve(True)))


def test_per_sample_adjoint_gradients_equal_each_sample_alone(problem):
    func, y0, _ = problem
    rtol = torch.tensor([1e-3, 1e-8, 1e-5, 1e-6], dtype=torch.float64)
    y0 = y0.detach().requires_grad_(True)
    solution = solve_ivp(func, y0, (0.0, 1.0), rtol=rtol, atol=1e-9, adjoint=True)
    (grad_batch,) = torch.autograd.grad(solution.y1.square().sum(), y0)
    for i in range(4):
        y0_i = y0[i : i + 1].detach().requires_grad_(True)
        alone = solve_ivp(func, y0_i, (0.0, 1.0), rtol=rtol[i : i + 1], atol=1e-9, adjoint=True)
        (grad_alone,) = torch.autograd.grad(alone.y1.square().sum(), y0_i)
        torch.testing.assert_close(grad_batch[i], grad_alone[0], rtol=1e-12, atol=1e-14)
        assert int(alone.backward.nfe[0]) == int(solution.backward.nfe[i]) > 0


def test_adjoint_gradients_against_finite_differences(problem):
    func, y0, t = problem
    params = dict(func.named_parameters())

    def solve(y0, t, *weights):
        replaced = dict(zip(params, weights))
        f = lambda t, y: torch.func.functional_call(func, replaced, (t, y))  # noqa: E731
        return solve_ivp(f, y0, (t[0], t[-1]), t_eval=t[1:], adjoint=True, adjoint_params=weights, **TIGHT).ys

    inputs = (y0.detach().requires_grad_(True), t.detach().requires_grad_(True))
    inputs += tuple(p.detach().requires_grad_(True) for p in params.values())
    # fast_mode compares u·J·v for random u, v: finite differences along v against one vector–Jacobian product.
    assert torch.autograd.gradcheck(solve, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_time_gradients_match_the_analytic_ones():
    # y' = -y: y(t1) = y0 exp(-(t1 - t0)), so dy1/dt1 = -y1 and dy1/dt0 = y1.
    y0 = torch.tensor([2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.5], dtype=torch.float64, requires_grad=True)
    func = torch.nn.Identity()
    out = odeint_adjoint(lambda t, y: -func(y), y0, t, adjoint_params=(), **TIGHT)
    (grad_t,) = torch.autograd.grad(out[-1].sum(), t)
    y1 = float(out[-1].detach())
    assert grad_t.tolist() == pytest.approx([y1, -y1], rel=1e-8)


def test_backward_through_a_failed_solve_is_refused(problem):
    func, y0, _ = problem
    solution = solve_ivp(func, y0, (0.0, 1.0), max_nfe=torch.tensor([1000, 8, 1000, 1000]), adjoint=True)
    assert not bool(solution.success[1])
    with pytest.raises(SolverError, match="cannot backpropagate through a failed forward solve"):
        solution.y1.sum().backward()


class _LiveTensorBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages that ops create while it is on, in
    the forward and the backward pass (the adjoint's backward solve included): every op's new
    storage counts from its creation until the storage is freed (torch keeps a storage's
    Python object as long as the storage lives, so a weakref's finalizer fires at the free).
    Unlike the process's peak resident set it does not depend on the C allocator's heap
    (glibc keeps and fragments freed blocks of this size), on page faults or on other load:
    the same solve counts the same bytes on every run."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.tracked.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.tracked:
                    self.tracked.add(key)
                    self.live += size
                    weakref.finalize(storage, self._freed, key, size)
        self.peak = max(self.peak, self.live)
        return out


def _peak_states(steps: int, adjoint: bool, dim: int = 20_000) -> float:
    """Peak live tensor memory of a fixed-step solve and its backward pass, in states."""
    weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    y0 = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with _LiveTensorBytes() as memory:
        solution = solve_ivp(
            lambda t, y: -weight * y * torch.cos(t)[:, None],
            y0,
            (0.0, 1.0),
            method="rk4",
            step_size=1.0 / steps,
            adjoint=adjoint,
            adjoint_params=(weight,),
        )
        solution.y1.square().sum().backward()
        assert int(solution.steps) == steps and int(solution.backward.steps if adjoint else steps) == steps
    return memory.peak / y0.nbytes


def test_adjoint_memory_does_not_grow_with_the_number_of_steps():
    # Backprop through the solver keeps rk4's four stages per step; the adjoint must keep
    # nothing per step: even one state per step over 80 extra steps would add 80 states.
    # (Counted, not sampled: the process's peak RSS, measured before, once flaked.)
    adjoint = {steps: _peak_states(steps, adjoint=True) for steps in (10, 90)}
    direct = {steps: _peak_states(steps, adjoint=False) for steps in (10, 30)}
    assert direct[30] - direct[10] >= 3 * 20, f"the probe must see per-step storage ({direct})"
    assert adjoint[90] - adjoint[10] < 1, f"adjoint peak grew from 10 to 90 steps ({adjoint} states)"


def test_rejected_rows_with_nan_stages_add_nothing_to_parameter_gradients():
    """A trial step that runs into NaN is rejected; its stages must not poison dL/dθ."""
    from neuralode.solvers import Stepper, get_method
    from neuralode.solvers.adjoint import _SeminormDynamics

    weight = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def func(t, z):  # NaN beyond |z| = 5: the big first step of row 1 runs into it
        out = weight * z
        return torch.where(z.abs() > 5, torch.full_like(out, float("nan")), out)

    def one_step(z0):
        dynamics = _SeminormDynamics(func, [weight], Stepper(get_method("dopri5")))
        y = torch.stack([z0, torch.ones_like(z0)], 1)
        t0 = torch.zeros(len(z0), dtype=torch.float64)
        end = torch.full_like(t0, 2.0)
        tol = torch.full_like(t0, 1e-2)
        state = dynamics.stepper.init(dynamics, y, t0, end, end, tol, tol, first_step=torch.full_like(t0, 1.0))
        _, record = dynamics.stepper.step(dynamics, state)
        dynamics.quadrature(record)
        return record, dynamics.grads[0]

    record, both = one_step(torch.tensor([[0.1], [4.5]], dtype=torch.float64))
    assert record.accepted.tolist() == [True, False] and record.error_finite.tolist() == [True, False]
    _, alone = one_step(torch.tensor([[0.1]], dtype=torch.float64))
    assert torch.isfinite(both) and float(both) != 0.0
    torch.testing.assert_close(both, alone, rtol=1e-14, atol=0)


@pytest.mark.parametrize("method, options", [("gl4", {"step_size": 0.02}), ("dopri8", {}), ("bosh3", {})])
def test_seminorm_quadrature_serves_every_runge_kutta_method(problem, method, options):
    """Per-sample parameter quadrature with the method's own weights, implicit stages too."""
    func, y0, t = problem
    step_size = options.get("step_size")

    def solve(adjoint):
        solution = solve_ivp(
            func, y0, (t[0], t[-1]), t_eval=t[1:], method=method, step_size=step_size, adjoint=adjoint, **TIGHT
        )
        return torch.cat([y0[None], solution.ys])

    direct = _gradients(func, y0, t, lambda: solve(False))
    adjoint = _gradients(func, y0, t, lambda: solve(True))
    _assert_gradients_match(direct, adjoint, rel=1e-5 if step_size else 1e-6)


def test_seminorm_needs_a_quadrature_rule(problem):
    func, y0, t = problem
    with pytest.raises(ValueError, match="explicit_adams does not have"):
        solve_ivp(func, y0, (0.0, 1.0), method="explicit_adams", step_size=0.1, adjoint=True)
    # One sample with the parameters in the state works for any method.
    out = solve_ivp(
        func, y0[:1], (0.0, 1.0), method="explicit_adams", step_size=0.01, adjoint=True, adjoint_norm="full"
    )
    out.y1.sum().backward()
    assert all(p.grad is not None for p in func.parameters())
