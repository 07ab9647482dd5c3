"""f evaluated in bfloat16 while the solver's state and step control stay float32: against
scipy, per sample, under the adjoint, and on the real MNIST test digits."""

import numpy as np
import pytest
import torch
from torch import nn

from neuralode.models import ODEFunc
from neuralode.precision import in_precision, precision_dtype
from neuralode.solvers import Status, StepCallbacks, solve_ivp


class Linear(nn.Module):
    """dy/dt = A y with a fixed A: its exact solution comes from scipy, outside our code."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.3]]))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.a.T


def test_bfloat16_dynamics_keep_the_state_float32_and_meet_a_loose_tolerance_against_scipy():
    from scipy.integrate import solve_ivp as scipy_solve_ivp

    func, y0 = Linear(), torch.tensor([[1.0, 0.5], [-0.3, 2.0]])
    a = func.a.detach().double().numpy()
    for tol in (1e-1, 1e-2):
        solution = solve_ivp(func, y0, (0.0, 2.0), rtol=tol, atol=tol, precision="bfloat16")
        assert solution.y1.dtype == torch.float32 and bool((solution.status == Status.SUCCESS).all())
        for row, start in enumerate(y0.double().numpy()):
            exact = scipy_solve_ivp(lambda t, y: a @ y, (0.0, 2.0), start, rtol=1e-12, atol=1e-12).y[:, -1]
            # bfloat16 has 8 bits of mantissa (relative rounding 2^-9 = 0.002): far below these tolerances.
            assert np.abs(solution.y1[row].detach().double().numpy() - exact).max() < 10 * tol * (
                1 + np.abs(exact).max()
            )


def test_the_first_step_rule_sees_no_bfloat16_rounding():
    """Hairer's rule divides a difference of f by a tiny step; in bfloat16 the rounding swamps
    it and the first step shrinks (14 NFE became 20 at tol 1e-1). f(t0, y0) and the rule's
    probe run in the state's precision, so the first step is float32's."""
    func, y0 = Linear(), torch.tensor([[1.0, 0.5], [-0.3, 2.0]])

    def first_steps(precision, tol):
        steps = []
        record = StepCallbacks(decided=lambda t, y, dt, accepted: steps.append(dt.detach().clone()))
        solve_ivp(func, y0, (0.0, 2.0), rtol=tol, atol=tol, precision=precision, callbacks=record)
        return steps[0]

    for tol in (1e-1, 1e-2, 1e-3):
        assert torch.equal(first_steps("bfloat16", tol), first_steps(None, tol))


def test_f_runs_in_bfloat16_and_answers_in_the_state_dtype():
    seen = []

    def func(t, y):
        out = nn.functional.linear(y, torch.eye(2))  # autocast runs linear in bfloat16
        seen.append(out.dtype)
        return out

    solution = solve_ivp(func, torch.ones(3, 2), (0.0, 1.0), rtol=1e-2, atol=1e-2, precision="bfloat16")
    # f(t0, y0) and the first-step rule's probe in float32 (below), every stage after in bfloat16
    assert seen[:2] == [torch.float32] * 2 and set(seen[2:]) == {torch.bfloat16}
    assert solution.y1.dtype == torch.float32
    solve_ivp(func, torch.ones(3, 2), (0.0, 1.0), rtol=1e-2, atol=1e-2, precision="float32")
    assert seen[-1] == torch.float32


def test_unknown_precisions_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown precision 'float8'; known are float32, bfloat16"):
        solve_ivp(Linear(), torch.ones(1, 2), (0.0, 1.0), precision="float8")
    with pytest.raises(ValueError, match="cannot be evaluated in torch.float16"):
        precision_dtype(torch.float16)
    assert precision_dtype("float32") is None and precision_dtype(None) is None
    assert in_precision(torch.sin, None) is torch.sin


def test_a_batch_in_bfloat16_gives_each_sample_its_nfe_and_result_alone():
    torch.manual_seed(0)
    func = ODEFunc(16).eval()
    z = torch.randn(6, 16, 6, 6)
    tol = torch.tensor([1e-1, 1e-2, 1e-3, 1e-1, 1e-2, 1e-3])
    with torch.no_grad():
        batch = solve_ivp(func, z, (0.0, 1.0), rtol=tol, atol=tol, precision="bfloat16")
        for i in range(len(z)):
            alone = solve_ivp(
                func, z[i : i + 1], (0.0, 1.0), rtol=tol[i : i + 1], atol=tol[i : i + 1], precision="bfloat16"
            )
            assert int(alone.nfe[0]) == int(batch.nfe[i]), i
            # bf16 kernels may block a batch differently from one sample: equal up to bf16 rounding
            torch.testing.assert_close(alone.y1[0], batch.y1[i], rtol=2e-2, atol=2e-2)


def test_adjoint_gradients_under_bfloat16_match_float32_and_finite_differences():
    torch.manual_seed(1)
    func = ODEFunc(8)
    z = torch.randn(4, 8, 6, 6)

    def loss_and_grads(precision):
        func.zero_grad()
        y1 = solve_ivp(func, z, (0.0, 1.0), rtol=1e-3, atol=1e-3, adjoint=True, precision=precision).y1
        loss = (y1**2).mean()
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in func.parameters()])

    loss32, grad32 = loss_and_grads("float32")
    loss16, grad16 = loss_and_grads("bfloat16")
    # The documented bound (docs/solvers.md, "Precision"): within 10% of float32's gradient.
    assert float((grad16 - grad32).norm() / grad32.norm()) < 0.1
    assert float(nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.99
    # Against a central difference of the float32 loss along the bf16 gradient's direction.
    direction = grad16 / grad16.norm()
    eps = 1e-2
    with torch.no_grad():
        params = list(func.parameters())
        sizes = [p.numel() for p in params]

        def loss_at(sign):
            for p, step in zip(params, torch.split(sign * eps * direction, sizes)):
                p.add_(step.view_as(p))
            value = float((solve_ivp(func, z, (0.0, 1.0), rtol=1e-7, atol=1e-7).y1 ** 2).mean())
            for p, step in zip(params, torch.split(sign * eps * direction, sizes)):
                p.sub_(step.view_as(p))
            return value

        slope = (loss_at(1) - loss_at(-1)) / (2 * eps)
    assert abs(float(grad16 @ direction) - slope) < 0.05 * abs(slope)
    assert abs(loss16 - loss32) < 0.01 * loss32


@pytest.mark.parametrize(("first_step", "nfe_slack"), [(1.0, 0.03), (None, 0.15)])
def test_bfloat16_on_real_mnist_gives_the_test_error_of_float32_at_loose_tolerances(
    mnist_test_digits, first_step, nfe_slack
):
    """The shipped ODE-Net, tried over the whole span first (as ``tune --first-step 1`` serves
    it): bfloat16 takes float32's steps. Under Hairer's rule (the shipped card) its rounding
    reaches the error estimates of later steps: the same labels at up to 15% more NFE (measured
    on these 300 digits, 2026-12-07: 17.1 against 19.4 at tol 1e-1, 20.5 against 22.1 at 1e-2)."""
    from neuralode.checkpoint import load_checkpoint

    images, labels = mnist_test_digits
    x = torch.from_numpy(images[:300]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(np.asarray(labels[:300])).long()
    model = load_checkpoint("checkpoints/odenet-mnist.pt", overrides={"first_step": first_step}).model
    with torch.no_grad():
        for tol in (1e-1, 1e-2):
            logits32, solution32 = model(x, rtol=tol, atol=tol, precision="float32")
            logits16, solution16 = model(x, rtol=tol, atol=tol, precision="bfloat16")
            assert logits16.dtype == torch.float32
            errors32 = int((logits32.argmax(1) != y).sum())
            assert abs(int((logits16.argmax(1) != y).sum()) - errors32) <= 1  # 1 in 300 is 0.33 points
            assert int((logits16.argmax(1) != logits32.argmax(1)).sum()) <= 2
            nfe32, nfe16 = float(solution32.nfe.double().mean()), float(solution16.nfe.double().mean())
            assert nfe32 <= nfe16 * (1 + nfe_slack) and nfe16 <= nfe32 * (1 + nfe_slack), (tol, nfe32, nfe16)


@pytest.mark.parametrize("kinetic", [0.0, 0.01])
def test_odenet_trains_in_bfloat16_with_gradients_nearer_float32s_than_another_batch(mnist_test_digits, kinetic):
    """Training's forward (``forward_regularised``, what ``python -m training odenet
    --precision bfloat16`` runs) from a fresh initialisation: the downsampling, f and the head
    in bfloat16, the adjoint's backward solve too. The loss is float32's, and bfloat16 moves the
    gradient far less than drawing another batch does (measured: 0.18-0.23 of its norm against
    1.0-1.45, cosine 0.97-0.98; the downsampling's share the most, as it is reached through
    every bfloat16 layer), with and without a regulariser's rates in the state."""
    from neuralode.models import ODENet, Regularisation

    images, labels = mnist_test_digits
    x = torch.from_numpy(images[:16]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(np.asarray(labels[:16])).long()
    torch.manual_seed(0)
    model = ODENet(tol=1e-3).train()  # as training starts
    regularisation = Regularisation(kinetic=kinetic)
    seen = []
    model.block.func.register_forward_hook(lambda module, args, out: seen.append(out.dtype))

    def loss_and_gradient(rows: slice, precision: str) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        logits, solution, integrals = model.forward_regularised(x[rows], regularisation, precision=precision)
        loss = nn.functional.cross_entropy(logits, y[rows]) + regularisation.penalty(integrals)
        loss.backward()
        assert logits.dtype == torch.float32 and int(solution.nfe.min()) > 0
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])

    batch, other = slice(0, 8), slice(8, 16)
    loss32, grad32 = loss_and_gradient(batch, "float32")
    _, grad_other = loss_and_gradient(other, "float32")
    assert set(seen) == {torch.float32}
    seen.clear()
    loss16, grad16 = loss_and_gradient(batch, "bfloat16")
    assert torch.bfloat16 in seen  # f ran in bfloat16
    assert abs(loss16 - loss32) < 0.01 * loss32
    assert float((grad16 - grad32).norm()) < float((grad_other - grad32).norm()) / 3
    assert float(nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.95
