"""Each sample of a batch is solved exactly as if it were alone."""

import pytest
import torch

from neuralode.solvers import Status, solve_ivp


def oscillators(t, y):
    # x'' = -w^2 x, with w carried in the state so one batch mixes easy (slow) and hard (fast) samples.
    x, v, w = y.unbind(1)
    return torch.stack([v, -(w**2) * x, torch.zeros_like(w)], 1)


def forced(t, y):
    # Non-autonomous: each sample must see its own time.
    return -y + torch.sin(3 * t)[:, None]


FREQUENCIES = [0.5, 1.0, 4.0, 16.0, 2.0, 40.0]
TOLERANCES = [1e-3, 1e-9, 1e-5, 1e-7, 1e-4, 1e-6]


def _alone_vs_batch(func, y0, t_span, rtol, atol, **kwargs):
    batch = solve_ivp(func, y0, t_span, rtol=rtol, atol=atol, **kwargs)
    alone = []
    for i in range(y0.shape[0]):
        pick = lambda v: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v  # noqa: E731
        span = tuple(pick(s) for s in t_span)
        extra = {k: pick(v) for k, v in kwargs.items()}
        alone.append(solve_ivp(func, y0[i : i + 1], span, rtol=pick(rtol), atol=pick(atol), **extra))
    return batch, alone


@pytest.mark.parametrize("method", ["bosh3", "dopri5", "tsit5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_batch_equals_each_sample_alone(method, dtype, device):
    y0 = torch.tensor([[1.0, 0.0, w] for w in FREQUENCIES], dtype=dtype, device=device)
    rtol = torch.tensor(TOLERANCES, dtype=dtype, device=device).clamp_min(1e-6 if dtype == torch.float32 else 0)
    span = (0.0, 1.0 if method == "bosh3" else 3.0)  # the low-order method needs ~10x the steps
    batch, alone = _alone_vs_batch(oscillators, y0, span, rtol, rtol * 1e-2, method=method)
    assert batch.success.all()
    for i, single in enumerate(alone):
        assert int(batch.nfe[i]) == int(single.nfe), i
        assert int(batch.steps[i]) == int(single.steps), i
        assert int(batch.rejected[i]) == int(single.rejected), i
        torch.testing.assert_close(batch.y1[i], single.y1[0], rtol=0, atol=0)
    # The easy samples do not pay for the hard ones.
    assert int(batch.nfe[0]) < int(batch.nfe[5]) / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_place_in_a_large_batch_gets_the_bits_of_its_solve_alone(dtype):
    """37 rows: on the CPU most of a batch's per-row values go through vectorised kernels and
    its last few through scalar ones, which round differently in pow (the step-size rule's), so
    the rule must not depend on which a row gets."""
    generator = torch.Generator().manual_seed(3)
    w = 0.5 + 4.0 * torch.rand(37, generator=generator, dtype=torch.float64)
    y0 = torch.stack([torch.ones_like(w), torch.zeros_like(w), w], 1).to(dtype)
    rtol = torch.logspace(-2, -6 if dtype == torch.float32 else -10, 37, dtype=dtype)
    batch, alone = _alone_vs_batch(oscillators, y0, (0.0, 3.0), rtol, rtol * 1e-2)
    for i, single in enumerate(alone):
        assert (int(batch.nfe[i]), int(batch.rejected[i])) == (int(single.nfe), int(single.rejected)), i
        torch.testing.assert_close(batch.y1[i], single.y1[0], rtol=0, atol=0)


def test_per_sample_time_spans_and_directions():
    y0 = torch.tensor([[1.0], [1.0], [0.5], [2.0]], dtype=torch.float64)
    t0 = torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.0, 5.0, -3.0], dtype=torch.float64)
    batch, alone = _alone_vs_batch(forced, y0, (t0, t1), 1e-8, 1e-10)
    torch.testing.assert_close(batch.t1, t1, rtol=0, atol=0)
    for i, single in enumerate(alone):
        assert int(batch.nfe[i]) == int(single.nfe)
        torch.testing.assert_close(batch.y1[i], single.y1[0], rtol=0, atol=0)


def test_per_sample_output_times():
    y0 = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 5.0]], dtype=torch.float64)
    t_eval = torch.tensor([[0.5, 1.0, 2.0], [0.1, 0.2, 3.0]], dtype=torch.float64)
    batch, alone = _alone_vs_batch(oscillators, y0, (0.0, 3.0), 1e-8, 1e-10, t_eval=t_eval)
    for i, single in enumerate(alone):
        assert int(batch.nfe[i]) == int(single.nfe)
        torch.testing.assert_close(batch.ys[:, i], single.ys[:, 0], rtol=0, atol=0)
        w = y0[i, 2]
        torch.testing.assert_close(batch.ys[:, i, 0], torch.cos(w * t_eval[i]), rtol=0, atol=1e-6)
    # t1 = 3.0 is not in sample 0's t_eval: it is solved to 3.0 all the same.
    torch.testing.assert_close(batch.y1[:, 0], torch.cos(3.0 * y0[:, 2]), rtol=0, atol=1e-6)


def test_neural_network_dynamics_batch_equals_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()

    def func(t, y):
        return net(torch.cat([y, t[:, None]], 1))

    y0 = torch.randn(16, 4, dtype=torch.float64) * torch.logspace(-1, 1, 16, dtype=torch.float64)[:, None]
    rtol = torch.logspace(-3, -9, 16, dtype=torch.float64)
    with torch.no_grad():
        batch, alone = _alone_vs_batch(func, y0, (0.0, 2.0), rtol, rtol * 1e-2)
    for i, single in enumerate(alone):
        assert int(batch.nfe[i]) == int(single.nfe)
        torch.testing.assert_close(batch.y1[i], single.y1[0], rtol=1e-12, atol=1e-14)


def test_finished_samples_are_not_evaluated():
    rows_per_call = []

    def counting(t, y):
        rows_per_call.append(y.shape[0])
        return oscillators(t, y)

    y0 = torch.tensor([[1.0, 0.0, w] for w in FREQUENCIES], dtype=torch.float64)
    solution = solve_ivp(counting, y0, (0.0, 3.0), rtol=1e-6, atol=1e-8)
    # Every evaluated row is one function evaluation of one sample, and nothing more.
    assert sum(rows_per_call) == int(solution.nfe.sum())
    assert rows_per_call[0] == len(FREQUENCIES) and rows_per_call[-1] == 1


def test_failures_stay_with_their_sample():
    y0 = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 50.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    solution = solve_ivp(
        oscillators, y0, (0.0, 3.0), rtol=1e-8, atol=1e-10, max_nfe=torch.tensor([10_000, 200, 10_000])
    )
    assert solution.status.tolist() == [Status.SUCCESS, Status.MAX_NFE, Status.SUCCESS]
    assert int(solution.nfe[1]) <= 200
    assert 0.0 < float(solution.t1[1]) < 3.0
    torch.testing.assert_close(solution.y1[[0, 2], 0], torch.cos(3.0 * y0[[0, 2], 2]), rtol=0, atol=1e-7)
    assert solution.messages()[1].startswith("max_nfe reached")


# ---- every method keeps the per-sample guarantees --------------------------------------------
from neuralode.solvers import METHODS, SolverState, Stepper, get_method  # noqa: E402

_ALL_METHODS = sorted(METHODS)


def _method_kwargs(name: str, dtype) -> dict:
    """Tolerances per sample for adaptive methods; per-sample spans do the mixing otherwise."""
    if METHODS[name].adaptive:
        low_order = METHODS[name].order <= 2
        rtol = torch.tensor([1e-3, 1e-5, 1e-4] if low_order else [1e-3, 1e-8, 1e-5], dtype=dtype)
        return dict(rtol=rtol, atol=rtol * 1e-2)
    return dict(step_size=0.05, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", _ALL_METHODS)
def test_every_method_solves_each_sample_as_if_alone(method):
    y0 = torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.0, 3.0], [0.2, 1.0, 1.5]], dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.8, 1.3], dtype=torch.float64)
    rows_per_call = []

    def counting(t, y):
        rows_per_call.append(y.shape[0])
        return oscillators(t, y)

    batch, alone = _alone_vs_batch(counting, y0, (0.0, t1), method=method, **_method_kwargs(method, torch.float64))
    assert batch.success.all()
    assert sum(rows_per_call[: len(rows_per_call)]) == int(batch.nfe.sum()) + sum(int(s.nfe) for s in alone)
    for i, single in enumerate(alone):
        assert int(batch.nfe[i]) == int(single.nfe), i
        assert int(batch.steps[i]) == int(single.steps), i
        assert int(batch.rejected[i]) == int(single.rejected), i
        torch.testing.assert_close(batch.y1[i], single.y1[0], rtol=0, atol=0)


def _step(stepper, func, state, done: dict):
    """One step; finished rows move from the state to ``done``."""
    state, _ = stepper.step(func, state)
    finished = state.status != int(Status.RUNNING)
    for row in finished.nonzero().squeeze(1).tolist():
        done[int(state.sample_id[row])] = (state.y[row], int(state.nfe[row]), int(state.steps[row]))
    keep = (~finished).nonzero().squeeze(1)
    return state.select(keep) if keep.numel() else None


@pytest.mark.parametrize("method", _ALL_METHODS)
def test_parked_rows_resume_bit_identically(method):
    """Rows that leave the batch (select) and come back later (cat) carry all their solver
    state with them: multistep history, FSAL stage, controller memory."""
    from neuralode.solvers import ConstantController

    solver = get_method(method)
    stepper = Stepper(solver, None if solver.adaptive else ConstantController(0.05))
    y0 = torch.tensor([[1.0, 0.0, w] for w in (0.5, 3.0, 1.5, 2.0)], dtype=torch.float64)
    t0, t1 = torch.zeros(4, dtype=torch.float64), torch.full((4,), 3.0, dtype=torch.float64)
    tol = torch.full((4,), 1e-5 if solver.order <= 2 else 1e-8, dtype=torch.float64)
    straight, resumed = {}, {}
    state = stepper.init(oscillators, y0, t0, t1, t1, tol, tol)
    while state is not None:
        state = _step(stepper, oscillators, state, straight)

    state = stepper.init(oscillators, y0, t0, t1, t1, tol, tol)
    for _ in range(4):
        state = _step(stepper, oscillators, state, resumed)
    odd = state.sample_id % 2 == 1
    parked, running = state.select(odd.nonzero().squeeze(1)), state.select((~odd).nonzero().squeeze(1))
    for _ in range(3):
        running = _step(stepper, oscillators, running, resumed) if running is not None else None
    state = SolverState.cat([parked] + ([running] if running is not None else []))
    while state is not None:
        state = _step(stepper, oscillators, state, resumed)
    assert resumed.keys() == straight.keys() == {0, 1, 2, 3}
    for sample, (y, nfe, steps) in straight.items():
        assert resumed[sample][1:] == (nfe, steps)
        torch.testing.assert_close(resumed[sample][0], y, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "implicit_adams"])
def test_interpolated_outputs_events_and_jumps_are_per_sample(method):
    y0 = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 4.0], [0.5, 0.0, 2.0]], dtype=torch.float64)
    t_eval = torch.tensor([[0.3, 0.9, 1.7], [0.1, 0.2, 0.5], [0.3, 0.6, 1.9]], dtype=torch.float64)
    jumps = torch.tensor([[0.5], [0.25], [1.2]], dtype=torch.float64)

    def first_zero_of_x(t, y):
        return y[:, 0]

    kwargs = _method_kwargs(method, torch.float64)
    batch, alone = _alone_vs_batch(
        oscillators,
        y0,
        (0.0, 2.0),
        t_eval=t_eval,
        jump_t=jumps,
        interpolate=True,
        event_fn=first_zero_of_x,
        method=method,
        **kwargs,
    )
    for i, single in enumerate(alone):
        assert int(batch.nfe[i]) == int(single.nfe), i
        assert bool(batch.event[i]) and bool(single.event[0])
        torch.testing.assert_close(batch.t1[i], single.t1[0], rtol=0, atol=0)
        torch.testing.assert_close(batch.ys[:, i], single.ys[:, 0], rtol=0, atol=0, equal_nan=True)
    # x = A cos(w t) first crosses zero at pi / (2 w); outputs after the event are NaN.
    torch.testing.assert_close(
        batch.t1, torch.pi / (2 * y0[:, 2]), rtol=1e-5 if METHODS[method].adaptive else 1e-3, atol=0
    )
    assert torch.isnan(batch.ys[2:, 1]).all() and torch.isfinite(batch.ys[:2, 1]).all()


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun", "rk4", "implicit_adams", "gl4"])
def test_max_nfe_is_a_hard_cap(method):
    """No sample reports more NFE than its budget, initial evaluations included: what would
    exceed it is not started. Tight budgets end with MAX_NFE, generous ones succeed."""
    budgets = torch.tensor([1, 2, 3, 7, 8, 9, 20, 50, 100_000])
    y0 = torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64).expand(len(budgets), 3).contiguous()
    kwargs = {} if METHODS[method].adaptive else {"step_size": 0.1}
    solution = solve_ivp(oscillators, y0, (0.0, 1.0), method=method, rtol=1e-3, atol=1e-3, max_nfe=budgets, **kwargs)
    assert bool((solution.nfe <= budgets).all()), solution.nfe.tolist()
    assert int(solution.status[-1]) == Status.SUCCESS
    short = solution.status[:-1] != int(Status.SUCCESS)
    assert all(Status(int(s)) == Status.MAX_NFE for s in solution.status[:-1][short])
    # A budget that cannot pay for the initial evaluations and one step starts nothing.
    assert int(solution.nfe[0]) == 0 and int(solution.status[0]) == Status.MAX_NFE


def test_max_nfe_one_at_tol_1e3_evaluates_nothing():
    calls = []
    solution = solve_ivp(
        lambda t, y: calls.append(1) or -y, torch.ones(1, 2), (0.0, 1.0), rtol=1e-3, atol=1e-3, max_nfe=1
    )
    assert int(solution.status) == Status.MAX_NFE and int(solution.nfe) == 0 and not calls


def test_tuple_states_per_sample():
    """A tuple of [B, ...] tensors is solved as one state per sample; results come back as
    tuples, and each sample still gets what it would alone."""

    def func(t, state):
        x, w = state  # x' = -k x per sample, w rotates
        return -x * w[:, :1, 0], torch.stack([w[..., 1], -w[..., 0]], -1)

    x0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    w0 = torch.tensor([[[0.5, 0.0]], [[3.0, 0.0]]], dtype=torch.float64)
    t_eval = torch.tensor([0.5, 1.0], dtype=torch.float64)
    batch = solve_ivp(func, (x0, w0), (0.0, 1.0), t_eval=t_eval, rtol=1e-9, atol=1e-11)
    assert isinstance(batch.y1, tuple) and batch.y1[0].shape == (2, 1) and batch.y1[1].shape == (2, 1, 2)
    assert batch.ys[1].shape == (2, 2, 1, 2)
    torch.testing.assert_close(batch.y1[1][:, 0, 0], w0[:, 0, 0] * torch.cos(torch.tensor(1.0, dtype=torch.float64)))
    for i in range(2):
        alone = solve_ivp(func, (x0[i : i + 1], w0[i : i + 1]), (0.0, 1.0), t_eval=t_eval, rtol=1e-9, atol=1e-11)
        assert int(alone.nfe) == int(batch.nfe[i])
        torch.testing.assert_close(alone.y1[0][0], batch.y1[0][i], rtol=0, atol=0)
