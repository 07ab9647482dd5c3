"""The kinetic, Jacobian and density-curvature regularisers: their integrals against scipy
quadrature along scipy trajectories (the curvature by finite differences of the trace along
them), the Hutchinson estimate against the exact Frobenius norm, and gradients through the
regularised adjoint solve against direct backprop and finite differences."""

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.integrate import solve_ivp as scipy_solve_ivp

from neuralode.models import (
    CNF,
    ConcatConv2d,
    ConcatSquashMLP,
    ODEBlock,
    ODEFunc,
    ODENet,
    PlanarDynamics,
    Regularisation,
)
from neuralode.models.cnf import standard_normal_log_prob
from neuralode.models.regularisation import draw_noise, hutchinson_jacobian

BOTH = Regularisation(kinetic=0.7, jacobian=0.3)
ALL = Regularisation(kinetic=0.7, jacobian=0.3, density_curvature=0.2)


class SmoothFunc(torch.nn.Module):
    """A small image-shaped f(t, z) = tanh(ConcatConv(tanh(ConcatConv(z)))): smooth, so adjoint
    and direct gradients agree to the solver's tolerance (ReLU's kinks would blur that)."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv1, self.conv2 = ConcatConv2d(channels, 4), ConcatConv2d(4, channels)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv2(t, torch.tanh(self.conv1(t, z))))


def _cnf(tol: float = 1e-10, dynamics: str = "concatsquash", trace: str = "exact") -> CNF:
    torch.manual_seed(0)
    net = PlanarDynamics(2, width=6) if dynamics == "planar" else ConcatSquashMLP(2, (16, 16))
    return CNF(net, 2, tol=tol, trace=trace).double()


def _block(tol: float = 1e-10) -> ODEBlock:
    torch.manual_seed(0)
    return ODEBlock(SmoothFunc(), rtol=tol, atol=tol).double()


def _trajectory(f, z0: np.ndarray, t0: float, t1: float):
    """z(t) by scipy's DOP853 at rtol 1e-12 as a dense interpolant: the outside oracle."""
    solution = scipy_solve_ivp(
        lambda t, z: f(t, z), (t0, t1), z0, method="DOP853", rtol=1e-12, atol=1e-14, dense_output=True
    )
    assert solution.success, solution.message
    return solution.sol


def _quadrature(integrand, t0: float, t1: float) -> float:
    value, error = quad(integrand, min(t0, t1), max(t0, t1), epsabs=1e-13, epsrel=1e-11, limit=200)
    assert error < 1e-9
    return value


@pytest.mark.parametrize(
    "dynamics, trace",
    [("concatsquash", "exact"), ("planar", "exact"), ("concatsquash", "hutchinson")],
    ids=["rows-of-the-exact-trace", "closed-form-trace", "hutchinson-with-the-traces-noise"],
)
def test_cnf_integrals_equal_quadratures_along_the_scipy_trajectory(dynamics, trace):
    """K, and J exactly where the Jacobian's rows are at hand; with the Hutchinson trace, J is
    the estimate with the trace's own noise, read back from the state (it never changed). C is
    the square of the trace's central difference quotient along the scipy trajectory."""
    cnf = _cnf(dynamics=dynamics, trace=trace)
    x = torch.tensor([[1.5, -0.5], [-2.0, 1.0], [0.3, 0.2]], dtype=torch.float64)
    with torch.no_grad():
        _, solution, integrals = cnf.log_prob_regularised(x, ALL, generator=torch.Generator().manual_seed(3))
    assert bool(solution.success.all())
    noise = solution.y1[:, 3:5] if trace == "hutchinson" else None

    def f(t: float, z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return cnf.dynamics(torch.tensor([t], dtype=torch.float64), torch.from_numpy(z)[None])[0].numpy()

    def jacobian(t: float, z: np.ndarray) -> torch.Tensor:
        tt = torch.tensor([t], dtype=torch.float64)
        return torch.autograd.functional.jacobian(lambda v: cnf.dynamics(tt, v[None])[0], torch.from_numpy(z))

    for i in range(len(x)):
        z = _trajectory(f, x[i].numpy(), cnf.t1, 0.0)  # data at T back to the base at 0
        kinetic = _quadrature(lambda t: float(np.mean(f(t, z(t)) ** 2)), 0.0, cnf.t1)
        if noise is None:
            frobenius = _quadrature(lambda t: float(jacobian(t, z(t)).square().sum() / 2), 0.0, cnf.t1)
        else:
            frobenius = _quadrature(lambda t: float((noise[i] @ jacobian(t, z(t))).square().sum() / 2), 0.0, cnf.t1)
        assert float(integrals[i, 0]) == pytest.approx(kinetic, rel=1e-7)
        assert float(integrals[i, 1]) == pytest.approx(frobenius, rel=1e-7)

        def trace_along(t: float) -> float:
            matrix = jacobian(t, z(t))
            return float(matrix.trace() if noise is None else noise[i] @ matrix @ noise[i])

        h = 1e-4  # the dense output reaches h past the span's ends
        curvature = _quadrature(lambda t: ((trace_along(t + h) - trace_along(t - h)) / (2 * h)) ** 2, 0.0, cnf.t1)
        assert float(integrals[i, 2]) > 1e-6
        assert float(integrals[i, 2]) == pytest.approx(curvature, rel=1e-5)


def test_cnf_sampling_integrates_the_same_regularisers_as_the_way_back():
    """Sampling runs base → data; the log-density solve of those samples runs the same path
    back: the two must integrate the same K, J and C."""
    cnf = _cnf()
    with torch.no_grad():
        x, log_q, _, forward = cnf.sample_regularised(4, ALL, generator=torch.Generator().manual_seed(0))
        log_p, _, backward = cnf.log_prob_regularised(x, ALL)
    assert bool((forward > 0).all())
    torch.testing.assert_close(forward, backward, rtol=1e-7, atol=0)
    torch.testing.assert_close(log_p, log_q, rtol=0, atol=1e-7)


def test_odeblock_noise_stays_fixed_and_its_integrals_equal_quadratures():
    """The Hutchinson noise is read back from the final state: it never changed, and the
    integrated estimate is the quadrature of ‖εᵀ ∂f/∂z‖²/D with that one ε along z(t)."""
    block = _block()
    z0 = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    size = z0[0].numel()
    with torch.no_grad():
        z1, solution, integrals = block.forward_regularised(z0, BOTH, generator=torch.Generator().manual_seed(5))
    noise = solution.y1[:, size : 2 * size]
    assert bool((noise.abs() == 1).all())  # Rademacher, exactly as drawn: its derivative is zero
    torch.testing.assert_close(
        noise, draw_noise(z0.flatten(1), "rademacher", torch.Generator().manual_seed(5)), rtol=0, atol=0
    )

    def f(t: float, z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (
                block.func(torch.tensor([t], dtype=torch.float64), torch.from_numpy(z).view(1, 2, 3, 3))
                .flatten()
                .numpy()
            )

    def jacobian(t: float, z: np.ndarray) -> torch.Tensor:
        tt = torch.tensor([t], dtype=torch.float64)
        return torch.autograd.functional.jacobian(
            lambda v: block.func(tt, v.view(1, 2, 3, 3)).flatten(), torch.from_numpy(z)
        )

    for i in range(2):
        z = _trajectory(f, z0[i].flatten().numpy(), 0.0, block.t1)
        np.testing.assert_allclose(z1[i].flatten().numpy(), z(block.t1), rtol=1e-8, atol=1e-9)
        kinetic = _quadrature(lambda t: float(np.mean(f(t, z(t)) ** 2)), 0.0, block.t1)
        estimate = _quadrature(lambda t: float((noise[i] @ jacobian(t, z(t))).square().mean()), 0.0, block.t1)
        assert float(integrals[i, 0]) == pytest.approx(kinetic, rel=1e-7)
        assert float(integrals[i, 1]) == pytest.approx(estimate, rel=1e-7)


def test_hutchinson_estimate_is_centred_on_the_exact_frobenius_norm():
    """On the real ODE-Net dynamics (4 channels, D = 144) at one (t, z): the mean of the
    estimate over N Rademacher probes is within 5 standard errors of ‖∂f/∂z‖²_F / D, with the
    standard error from the estimator's exact variance 2 Σ_{i≠j} (JJᵀ)_ij² / D²."""
    torch.manual_seed(0)
    func = ODEFunc(channels=4).double()
    z, t = torch.randn(1, 4, 6, 6, dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    exact = torch.autograd.functional.jacobian(lambda v: func(t, v.view(1, 4, 6, 6)).flatten(), z.flatten()).view(
        144, 144
    )
    gram = exact @ exact.T
    target = float(gram.trace() / 144)
    std = float((2 * (gram.square().sum() - gram.diagonal().square().sum())).sqrt() / 144)
    probes = 4000
    batch = z.expand(probes, 4, 6, 6).clone().requires_grad_(True)
    estimates = hutchinson_jacobian(
        func(t, batch), batch, draw_noise(batch, "rademacher", torch.Generator().manual_seed(1)), create_graph=False
    )
    assert float(estimates.std()) == pytest.approx(std, rel=0.1)  # really random, with the variance theory says
    assert abs(float(estimates.mean()) - target) < 5 * std / probes**0.5


def _gradients(model: torch.nn.Module, loss_fn) -> torch.Tensor:
    model.zero_grad()
    loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _finite_difference(model: torch.nn.Module, loss_fn, index: int, h: float = 1e-5) -> float:
    parameter = torch.cat([p.detach().flatten() for p in model.parameters()])
    values = []
    for sign in (1, -1):
        shifted = parameter.clone()
        shifted[index] += sign * h
        torch.nn.utils.vector_to_parameters(shifted, model.parameters())
        with torch.no_grad():
            values.append(float(loss_fn()))
    torch.nn.utils.vector_to_parameters(parameter, model.parameters())
    return (values[0] - values[1]) / (2 * h)


def _assert_gradients_agree(model, loss_of, indices):
    adjoint = _gradients(model, lambda: loss_of(True))
    direct = _gradients(model, lambda: loss_of(False))
    assert float(adjoint.abs().max()) > 0
    assert float((adjoint - direct).abs().max() / direct.abs().max()) < 1e-6
    for index in indices:
        assert float(adjoint[index]) == pytest.approx(
            _finite_difference(model, lambda: loss_of(False), index), rel=1e-5, abs=1e-9
        )


@pytest.mark.parametrize("regularisation", [BOTH, ALL], ids=["kinetic-jacobian", "with-density-curvature"])
def test_cnf_regularised_adjoint_gradients_match_backprop_and_finite_differences(regularisation):
    """With the density curvature the adjoint differentiates a derivative of the trace, itself
    a derivative of f: third order in the network."""
    cnf = _cnf()
    x = torch.tensor([[1.0, -0.5], [-0.7, 1.2]], dtype=torch.float64)

    def loss(adjoint: bool) -> torch.Tensor:
        log_p, _, integrals = cnf.log_prob_regularised(x, regularisation, adjoint=adjoint)
        return -log_p.mean() + regularisation.penalty(integrals)

    _assert_gradients_agree(cnf, loss, indices=[0, 40, 300])


def test_odeblock_regularised_adjoint_gradients_match_backprop_and_finite_differences():
    """The Jacobian term is itself a vector–Jacobian product, so these gradients are second
    order; the same seed gives adjoint and direct solves the same noise."""
    block = _block()
    z0 = torch.randn(2, 2, 3, 3, dtype=torch.float64)

    def loss(adjoint: bool) -> torch.Tensor:
        block.adjoint = adjoint
        z1, _, integrals = block.forward_regularised(z0, BOTH, generator=torch.Generator().manual_seed(2))
        return z1.square().mean() + BOTH.penalty(integrals)

    _assert_gradients_agree(block, loss, indices=[0, 50, 100])


def test_without_weights_the_regularised_forward_is_the_plain_one():
    torch.manual_seed(0)
    model = ODENet().eval()
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        plain, plain_solution = model(images)
        logits, solution, integrals = model.forward_regularised(images, Regularisation())
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    assert torch.equal(solution.nfe, plain_solution.nfe) and not bool(integrals.any())


def test_regularising_leaves_the_step_choice_to_the_models_own_state():
    """Integral and noise columns are out of error control: the regularised solve takes the
    unregularised solve's steps and reaches the same z(1)."""
    torch.manual_seed(0)
    model = ODENet().eval()
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        plain, plain_solution = model(images)
        logits, solution, integrals = model.forward_regularised(
            images, BOTH, generator=torch.Generator().manual_seed(0)
        )
    assert torch.equal(solution.nfe, plain_solution.nfe) and bool((integrals > 0).all())
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)


def test_weights_must_be_finite_and_not_negative():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kinetic weight"):
            Regularisation(kinetic=bad)


def test_density_curvature_is_a_third_column_only_when_weighed_and_only_for_a_cnf():
    assert (BOTH.columns, ALL.columns) == (2, 3)
    assert "density_curvature" not in BOTH.card() and ALL.card()["density_curvature"] == 0.2
    integrals = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    assert float(ALL.penalty(integrals)) == pytest.approx(0.7 * 2 + 0.3 * 3 + 0.2 * 4)
    with pytest.raises(ValueError, match="density_curvature weight"):
        Regularisation(density_curvature=-1.0)
    with pytest.raises(ValueError, match="ODE-Net has no log-density"):
        _block().forward_regularised(torch.zeros(1, 2, 3, 3, dtype=torch.float64), ALL)


def _scipy_span_error(cnf: CNF, start: np.ndarray, forward: bool) -> float:
    """scipy's own Dormand–Prince step (RK45's tableau and stage loop) over the whole span and
    its error norm, as RK45 computes it before accepting a step: the outside oracle."""
    from scipy.integrate import RK45
    from scipy.integrate._ivp.rk import rk_step

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return cnf.augmented(torch.tensor([t], dtype=torch.float64), torch.from_numpy(y)[None])[0].numpy()

    z = torch.from_numpy(start)[None]
    log_density = float(standard_normal_log_prob(z)[0]) if forward else 0.0
    y0 = np.array([*start, log_density])
    t0, h = (0.0, cnf.t1) if forward else (cnf.t1, -cnf.t1)
    stages = np.empty((RK45.n_stages + 1, y0.size))
    y1, _ = rk_step(fun, t0, y0, fun(t0, y0), h, RK45.A, RK45.B, RK45.C, stages)
    scale = cnf.tol + np.maximum(np.abs(y0), np.abs(y1)) * cnf.tol
    return float(np.sqrt(np.mean((stages.T @ RK45.E * h / scale) ** 2)))


@pytest.mark.parametrize("dynamics", ["concatsquash", "planar"])
@pytest.mark.parametrize("forward", [False, True], ids=["log-density", "sampling"])
def test_span_error_is_scipys_dormand_prince_error_estimate(dynamics, forward):
    cnf = _cnf(tol=1e-3, dynamics=dynamics)
    start = torch.tensor([[1.5, -0.5], [-2.0, 1.0], [0.3, 0.2]], dtype=torch.float64)
    with torch.no_grad():
        errors = cnf.span_error(start, forward=forward)
    expected = [_scipy_span_error(cnf, point.numpy(), forward) for point in start]
    assert min(expected) > 1e-4  # a step with something to estimate
    torch.testing.assert_close(errors, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)


def test_span_error_decides_whether_a_whole_span_first_step_is_accepted():
    """At most 1: the solve that tries the whole span first ends in that step (dopri5: 7 NFE);
    above 1 it is rejected and costs more."""
    torch.manual_seed(1)
    cnf = CNF(ConcatSquashMLP(2, (16, 16)), 2, tol=1e-6, first_step=1.0).double()
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    with torch.no_grad():
        errors = cnf.span_error(x, forward=False)
        _, solution = cnf.log_prob(x)
    one_step = errors <= 1
    assert 0 < int(one_step.sum()) < len(x)  # both kinds among the points
    assert bool((solution.nfe[one_step] == 7).all()) and bool((solution.nfe[~one_step] > 7).all())


def test_span_error_gradients_match_finite_differences():
    cnf = _cnf(tol=1e-3)
    x = torch.tensor([[1.0, -0.5], [-0.7, 1.2]], dtype=torch.float64)

    def loss() -> torch.Tensor:
        return cnf.span_error(x, forward=False).mean()

    gradients = _gradients(cnf, loss)
    assert float(gradients.abs().max()) > 0
    for index in (0, 40, 300):
        assert float(gradients[index]) == pytest.approx(_finite_difference(cnf, loss, index), rel=1e-6, abs=1e-10)


def test_local_error_is_a_weight_of_the_card_and_only_a_cnfs():
    weighed = Regularisation(kinetic=0.1, local_error=0.05)
    assert not Regularisation(local_error=0.05).active  # no integral columns for it
    assert weighed.card() == {"kinetic": 0.1, "jacobian": 0.0, "local_error": 0.05}
    assert "local_error" not in BOTH.card()
    with pytest.raises(ValueError, match="local_error weight"):
        Regularisation(local_error=float("nan"))
    with pytest.raises(ValueError, match="CNFs only"):
        _block().forward_regularised(torch.zeros(1, 2, 3, 3, dtype=torch.float64), weighed)
    with pytest.raises(ValueError, match="error estimate, not rk4"):
        CNF(ConcatSquashMLP(2, (4,)), 2, method="rk4").span_error(torch.zeros(1, 2), forward=False)
