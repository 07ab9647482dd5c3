"""GraphedDynamics: the same f, replayed from CUDA graphs where that is possible."""

import pytest
import torch

from neuralode import solve_ivp
from neuralode.cuda_graphs import GraphedDynamics
from neuralode.models.odenet import ODEFunc


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
