"""GraphedDynamics and StepGraphs: the same f and the same steps, replayed from CUDA graphs
where that is possible; off the GPU, the same masked steps run eagerly."""

import pytest
import torch

from neuralode import Status, solve_ivp
from neuralode.cuda_graphs import GraphedDynamics, StepGraphs, masked_step
from neuralode.models.odenet import ODEFunc
from neuralode.solvers import Stepper, get_method


def test_without_a_gpu_or_while_recording_gradients_it_is_f_itself():
    torch.manual_seed(0)
    func = ODEFunc(8).eval()
    graphed = GraphedDynamics(func)
    z, t = torch.randn(5, 8, 6, 6), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(graphed(t, z), func(t, z), rtol=0, atol=0)
        a = solve_ivp(graphed, z, (0.0, 1.0), rtol=1e-4, atol=1e-4)
        b = solve_ivp(func, z, (0.0, 1.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.y1, b.y1, rtol=0, atol=0)
    assert graphed.captured_sizes == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_on_a_gpu_replays_match_f_at_every_batch_size():
    torch.manual_seed(0)
    func = ODEFunc(16).cuda().eval()
    graphed = GraphedDynamics(func)
    with torch.no_grad():
        for rows in (1, 3, 8, 13):
            z, t = torch.randn(rows, 16, 6, 6, device="cuda"), torch.rand(rows, device="cuda")
            torch.testing.assert_close(graphed(t, z), func(t, z), rtol=1e-5, atol=1e-5)
        z = torch.randn(37, 16, 6, 6, device="cuda")
        a = solve_ivp(graphed, z, (0.0, 1.0), rtol=1e-4, atol=1e-4)
        b = solve_ivp(func, z, (0.0, 1.0), rtol=1e-4, atol=1e-4)
    assert a.nfe.tolist() == b.nfe.tolist()
    torch.testing.assert_close(a.y1, b.y1, rtol=1e-4, atol=1e-4)
    assert {1, 4, 8, 16, 64} <= set(graphed.captured_sizes)  # padded sizes, the shrinking solve's too


def _oscillators(t, y):
    """x'' = -(1 + t/2) x - v/10: rows never interact, and plain arithmetic (no transcendental
    functions, whose vectorised and scalar CPU kernels round differently) gives every row the
    same bits in any batch."""
    x, v = y.unbind(1)
    return torch.stack([v, -(1.0 + 0.5 * t) * x - 0.1 * v], 1)


def _started(stepper, func, y0, tol, t1=10.0):
    t0 = torch.zeros(len(y0), dtype=y0.dtype)
    end = torch.full_like(t0, t1)
    return stepper.init(func, y0, t0, end, end, tol, tol, max_nfe=torch.full((len(y0),), 400, dtype=torch.int64))


@pytest.mark.parametrize("check_every", [1, 3])
def test_whole_step_graphs_give_each_row_its_own_solve_on_the_cpu_path(check_every):
    torch.manual_seed(0)
    y0 = torch.randn(13, 2, dtype=torch.float64)
    tol = torch.tensor([1e-2, 1e-5, 1e-8, 1e-3, 1e-4, 1e-6, 1e-9, 1e-2, 1e-7, 1e-3, 1e-10, 1e-5, 1e-4], dtype=y0.dtype)
    stepper = Stepper(get_method("dopri5"))
    graphs = StepGraphs(stepper, _oscillators, check_every=check_every)
    final = graphs.run(_started(stepper, _oscillators, y0, tol))
    expected = solve_ivp(_oscillators, y0, (0.0, 10.0), rtol=tol, atol=tol, max_nfe=400)

    assert final.sample_id.tolist() == list(range(13))
    assert final.nfe.tolist() == expected.nfe.tolist()  # masked steps are never counted
    assert final.steps.tolist() == expected.steps.tolist()
    assert final.rejected.tolist() == expected.rejected.tolist()
    assert final.status.tolist() == expected.status.tolist()
    assert {Status(s) for s in final.status.tolist()} == {Status.SUCCESS, Status.MAX_NFE}
    torch.testing.assert_close(final.y, expected.y1, rtol=0, atol=0)  # padded batches put rows elsewhere


def test_a_masked_step_leaves_rows_that_are_not_running_untouched():
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [2.0, -1.0]], dtype=torch.float64)
    stepper = Stepper(get_method("dopri5"))
    state = _started(stepper, _oscillators, y0, torch.full((3,), 1e-6, dtype=y0.dtype))
    state.status = torch.tensor([int(Status.RUNNING), int(Status.SUCCESS), int(Status.RUNNING)])
    stepped, accepted = masked_step(stepper, _oscillators, state)
    assert not accepted[1]
    for name in ("t", "y", "dt", "nfe", "steps", "rejected", "status"):
        assert torch.equal(getattr(stepped, name)[1], getattr(state, name)[1]), name
    assert torch.equal(stepped.solver["f0"][1], state.solver["f0"][1])
    assert stepped.nfe[0] == state.nfe[0] + 6 and stepped.nfe[2] == state.nfe[2] + 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_on_a_gpu_captured_steps_are_the_eager_masked_steps_bit_for_bit():
    torch.manual_seed(0)
    y0 = torch.randn(37, 2, dtype=torch.float64, device="cuda")
    tol = torch.logspace(-2, -9, 37, dtype=y0.dtype, device="cuda")
    stepper = Stepper(get_method("dopri5"))

    def started():
        t0 = torch.zeros(37, dtype=y0.dtype, device="cuda")
        return stepper.init(_oscillators, y0, t0, t0 + 10.0, t0 + 10.0, tol, tol)

    captured = StepGraphs(stepper, _oscillators, check_every=4).run(started())
    eager = StepGraphs(stepper, _oscillators, check_every=4, capture=False).run(started())
    expected = solve_ivp(_oscillators, y0, (0.0, 10.0), rtol=tol, atol=tol)
    assert captured.nfe.tolist() == eager.nfe.tolist() == expected.nfe.tolist()
    torch.testing.assert_close(captured.y, eager.y, rtol=0, atol=0)  # the same kernels, replayed
    torch.testing.assert_close(captured.y, expected.y1, rtol=1e-10, atol=1e-12)  # other kernels on the GPU
