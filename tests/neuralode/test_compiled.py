"""CompiledDynamics: f compiled by torch.compile per padded batch size (a bounded, counted set),
each kept only where it measured faster; answers within float32 rounding of eager f, so a
solve takes the same steps."""

import pytest
import torch

from neuralode import solve_ivp
from neuralode.compiled import CompiledDynamics, padded_size
from neuralode.models.odenet import ODEFunc


def test_padded_sizes_are_powers_of_two_capped_by_the_largest_batch():
    assert [padded_size(rows, 8) for rows in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert padded_size(6, 6) == 6 and padded_size(5, 6) == 6 and padded_size(9, 8) == 9


@pytest.fixture(scope="module")
def func() -> ODEFunc:
    torch.manual_seed(0)
    return ODEFunc(16).eval()


def test_each_padded_size_is_compiled_once_and_answers_as_eager_f(func):
    heard = []
    compiled = CompiledDynamics(func, max_rows=8, on_compile=heard.append)
    with torch.no_grad():
        for rows in (3, 4, 7, 3, 8):  # padded to 4, 4, 8, 4, 8
            z, t = torch.randn(rows, 16, 6, 6), torch.rand(rows)
            out = compiled(t, z)
            assert out.shape == z.shape
            torch.testing.assert_close(out, func(t, z), rtol=1e-5, atol=1e-5)
    assert compiled.compiles == 2 and sorted(size.rows for size in heard) == [4, 8]
    assert all(size.precision == "float32" and size.compile_seconds > 0 for size in heard)


def test_training_a_scalar_time_or_an_oversized_batch_run_f_itself(func):
    compiled = CompiledDynamics(func, max_rows=4)
    z = torch.randn(2, 16, 6, 6, requires_grad=True)
    out = compiled(torch.rand(2), z)  # autograd records: eager, differentiable
    out.sum().backward()
    assert z.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(compiled(torch.tensor(0.5), z), func(torch.tensor(0.5), z), rtol=0, atol=0)
        big = torch.randn(6, 16, 6, 6)
        torch.testing.assert_close(compiled(torch.rand(6), big).shape, big.shape)
    assert compiled.compiles == 0


def test_a_per_sample_solve_through_compiled_f_takes_eager_fs_steps(func):
    compiled = CompiledDynamics(func, max_rows=8)
    z = torch.randn(6, 16, 6, 6)
    with torch.no_grad():
        eager = solve_ivp(func, z, (0.0, 1.0), rtol=1e-3, atol=1e-3)
        fused = solve_ivp(compiled, z, (0.0, 1.0), rtol=1e-3, atol=1e-3)
    assert fused.nfe.tolist() == eager.nfe.tolist()
    torch.testing.assert_close(fused.y1, eager.y1, rtol=1e-4, atol=1e-4)
    assert 1 <= compiled.compiles <= 4  # 6 rows padded to 8, and the sizes rows that finish first leave


def test_every_padded_size_compiles_in_a_worker_thread_beyond_dynamos_default_limit():
    """Dynamo's recompile limit (8 graphs per function) is a thread-local setting: a server's
    worker thread compiling 10 sizes once fell back to eager f for the 9th and 10th."""
    import threading

    from torch._dynamo.utils import counters

    def func(t, y):
        return y * 2 + t[:, None]

    compiled = CompiledDynamics(func, max_rows=512)
    counters.clear()

    def serve() -> None:
        with torch.no_grad():
            for k in range(10):
                rows = 1 << k
                torch.testing.assert_close(compiled(torch.ones(rows), torch.ones(rows, 3)), torch.full((rows, 3), 3.0))

    worker = threading.Thread(target=serve)
    worker.start()
    worker.join(300)
    assert counters["stats"]["unique_graphs"] == 10 and compiled.compiles == 10
