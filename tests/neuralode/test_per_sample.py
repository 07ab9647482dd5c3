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
    solution = solve_ivp(oscillators, y0, (0.0, 3.0), rtol=1e-8, atol=1e-10, max_nfe=torch.tensor([10_000, 200, 10_000]))
    assert solution.status.tolist() == [Status.SUCCESS, Status.MAX_NFE, Status.SUCCESS]
    assert int(solution.nfe[1]) <= 200
    assert 0.0 < float(solution.t1[1]) < 3.0
    torch.testing.assert_close(solution.y1[[0, 2], 0], torch.cos(3.0 * y0[[0, 2], 2]), rtol=0, atol=1e-7)
    assert solution.messages()[1].startswith("max_nfe reached")
