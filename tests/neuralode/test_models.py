"""Model shapes, sizes, per-sample independence, and the CNF's density bookkeeping."""

import pytest
import torch

from neuralode.models import (
    CNF,
    MLP,
    ConcatSquashMLP,
    ODENet,
    PlanarDynamics,
    PlanarFlow,
    ResNet,
    build_model,
    count_parameters,
)


@pytest.mark.parametrize(
    "model, low, high",
    [(ODENet(), 0.20e6, 0.22e6), (ResNet(), 0.55e6, 0.62e6), (MLP(), 0.23e6, 0.25e6)],
    ids=["odenet", "resnet", "mlp"],
)
def test_classifiers_have_the_papers_sizes_and_shapes(model, low, high):
    assert low <= count_parameters(model) <= high
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        out = model(images)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (3, 10)


def test_odenet_downsamples_to_64x6x6_and_reports_per_sample_stats():
    model = ODENet().eval()
    images = torch.rand(1, 1, 28, 28).expand(4, 1, 28, 28)  # one image at four tolerances
    with torch.no_grad():
        assert model.downsample(images).shape == (4, 64, 6, 6)
        logits, solution = model(images, rtol=torch.tensor([1e-1, 1e-3, 1e-5, 1e-1]), atol=1e-5)
    assert solution.nfe.shape == (4,) and bool(solution.success.all())
    assert int(solution.nfe[2]) > int(solution.nfe[1]) > int(solution.nfe[0]) == int(solution.nfe[3])


def test_odefunc_treats_samples_independently():
    torch.manual_seed(0)
    model = ODENet().double().eval()  # float64: batched and single convolutions agree to ~1e-15
    z = torch.randn(8, 64, 6, 6, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64)
    with torch.no_grad():
        full = model.block.func(t, z)
        other = torch.randn(8, 64, 6, 6, dtype=torch.float64)
        other[3] = z[3]
        mixed = model.block.func(torch.where(torch.arange(8) == 3, t, torch.rand(8, dtype=torch.float64)), other)
        alone = model.block.func(t[3:4], z[3:4])
    torch.testing.assert_close(mixed[3], full[3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alone[0], full[3], rtol=1e-12, atol=1e-12)


def test_odenet_prediction_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = ODENet().eval()
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        batch, batch_solution = model(images, rtol=1e-4, atol=1e-4)
        for i in range(3):
            alone, alone_solution = model(images[i : i + 1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(alone[0], batch[i], rtol=1e-4, atol=1e-5)
            assert int(alone_solution.nfe[0]) == int(batch_solution.nfe[i])


def test_registry_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="unknown model kind 'gan'"):
        build_model("gan", {})


# ---- CNFs -------------------------------------------------------------------------------
def _cnf(dynamics: str, trace: str = "exact") -> CNF:
    torch.manual_seed(1)
    net = PlanarDynamics(2, width=8) if dynamics == "planar" else ConcatSquashMLP(2, (32, 32))
    return CNF(net, 2, trace=trace).double()


@pytest.mark.parametrize("dynamics", ["concatsquash", "planar"])
def test_log_prob_of_samples_matches_their_returned_log_density(dynamics):
    cnf = _cnf(dynamics)
    with torch.no_grad():
        x, log_p, solution = cnf.sample(300, rtol=1e-8, atol=1e-10, generator=torch.Generator().manual_seed(0))
        again, back = cnf.log_prob(x, rtol=1e-8, atol=1e-10)
    assert bool(solution.success.all() & back.success.all())
    torch.testing.assert_close(again, log_p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dynamics", ["concatsquash", "planar"])
def test_density_integrates_to_one_on_a_grid(dynamics):
    cnf = _cnf(dynamics)
    extent, n = 7.0, 90
    axis = torch.linspace(-extent, extent, n, dtype=torch.float64)
    xs, ys = torch.meshgrid(axis, axis, indexing="xy")
    with torch.no_grad():
        log_p, _ = cnf.log_prob(torch.stack([xs.flatten(), ys.flatten()], 1), rtol=1e-6, atol=1e-8)
    mass = float(log_p.exp().sum() * (2 * extent / (n - 1)) ** 2)
    assert abs(mass - 1.0) < 0.02


def test_planar_trace_closed_form_matches_autograd():
    torch.manual_seed(0)
    dynamics = PlanarDynamics(2, width=5).double()
    t, z = torch.rand(7, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    f, trace = dynamics.forward_with_trace(t, z)
    exact = sum(torch.autograd.grad(f[:, i].sum(), z, retain_graph=True)[0][:, i] for i in range(2))
    torch.testing.assert_close(trace, exact, rtol=1e-12, atol=1e-12)


def test_hutchinson_estimate_is_unbiased_for_the_exact_trace():
    exact_cnf, hutchinson_cnf = _cnf("concatsquash"), _cnf("concatsquash", trace="hutchinson")
    x = torch.randn(1, 2, dtype=torch.float64).expand(4000, 2).contiguous()
    with torch.no_grad():
        exact, _ = exact_cnf.log_prob(x[:1], rtol=1e-8, atol=1e-10)
        estimates, _ = hutchinson_cnf.log_prob(x, rtol=1e-6, atol=1e-8, generator=torch.Generator().manual_seed(0))
    spread = float(estimates.std() / estimates.numel() ** 0.5)
    assert spread > 0  # the estimator really is random...
    assert abs(float(estimates.mean() - exact[0])) < 4 * spread  # ...and centred on the exact value


def test_planar_flow_log_density_matches_change_of_variables():
    torch.manual_seed(0)
    flow = PlanarFlow(2, layers=4).double()
    z0 = torch.randn(5, 2, dtype=torch.float64)
    x, log_det = flow(z0)
    jacobians = torch.stack([torch.autograd.functional.jacobian(lambda z: flow(z[None])[0][0], z) for z in z0])
    torch.testing.assert_close(log_det, torch.linalg.det(jacobians).abs().log(), rtol=1e-10, atol=1e-10)


class _Decay(torch.nn.Module):
    def forward(self, t, z):
        return -0.5 * z + 0.1 * torch.sin(3.0 * t)[:, None]


def test_a_block_given_a_first_step_tries_the_whole_span_as_scipy_does():
    """scipy's RK45 (the same Dormand–Prince pair) with ``first_step=1``: one accepted step,
    f(t0) plus six stages, 7 evaluations; Hairer's rule would spend 2 + 6 per step."""
    from scipy.integrate import solve_ivp as scipy_solve_ivp

    from neuralode.models.odenet import ODEBlock

    z0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    whole = ODEBlock(_Decay(), rtol=1e-3, atol=1e-3, first_step=1.0)
    ruled = ODEBlock(_Decay(), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        z1, solution = whole(z0)
        _, by_rule = ruled(z0)
    oracle = scipy_solve_ivp(
        lambda t, z: -0.5 * z + 0.1 * torch.sin(torch.tensor(3.0 * t)).item(),
        (0.0, 1.0),
        z0[0].numpy(),
        method="RK45",
        rtol=1e-3,
        atol=1e-3,
        first_step=1.0,
    )
    assert oracle.nfev == int(solution.nfe[0]) == 7 and int(solution.steps[0]) == 1
    torch.testing.assert_close(z1[0], torch.from_numpy(oracle.y[:, -1]), rtol=1e-12, atol=1e-12)
    assert int(by_rule.nfe[0]) >= 14


def test_a_first_step_goes_only_to_methods_that_control_their_step():
    from neuralode.solvers.accuracy import solve_settings

    model_settings = {"rtol": 1e-3, "atol": 1e-3, "method": "dopri5", "first_step": 1.0}
    assert solve_settings({}, **model_settings)["first_step"] == 1.0
    assert solve_settings({"method": "rk4"}, **model_settings)["first_step"] is None
    assert solve_settings({}, **{**model_settings, "first_step": None})["first_step"] is None
    model = ODENet(channels=8, first_step=1.0).eval()
    with torch.no_grad():  # a fixed-step call on a model with a first step: no error, fixed steps
        _, solution = model(torch.rand(2, 1, 28, 28), method="rk4")
    assert bool(solution.success.all())
