"""Continuous normalizing flows (Chen et al. 2018, §4; FFJORD) and the discrete planar flow.

A CNF moves base samples z(0) ~ N(0, I) along dz/dt = f(t, z) to data x = z(T) and tracks
the density by d log p(z(t))/dt = -tr(∂f/∂z). Both directions integrate one augmented state
per sample, ``[z, l, ε]`` with dl/dt = -tr(∂f/∂z) and ε the Hutchinson noise (constant, so a
sample's noise stays fixed for its whole solve and travels with it through any batching):

* ``sample``: from z(0) ~ N(0, I) with l(0) = log N(z(0)) to T: x = z(T), log p(x) = l(T).
* ``log_prob``: from x at T with l(T) = 0 back to 0: log p(x) = log N(z(0)) - l(0).

The trace is exact (closed form for the planar dynamics, one autograd pass per dimension
otherwise) or Hutchinson's estimate ε·(∂f/∂z)ε, unbiased, for high dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Unpack, cast

import torch
from torch import Tensor, nn

from ..solvers import ExplicitRK, Solution, get_method, rms_norm, solve_ivp
from ..solvers.accuracy import Accuracy, solve_settings
from .regularisation import NOISES, Regularisation, draw_noise, integrals_of, mean_square, rate_columns
from .servable import Signature, Start, TensorSpec

TRACES = ("exact", "hutchinson")


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.square().sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _time_column(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-conditioned layer: ``Linear(x) * sigmoid(gate(t)) + bias(t)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = _time_column(t, x)
        return self.layer(x) * torch.sigmoid(self.gate(tt)) + self.bias(tt)


class ConcatSquashMLP(nn.Module):
    """Dynamics f(t, z): concat-squash layers with tanh in between."""

    def __init__(self, dim: int = 2, hidden: tuple[int, ...] | list[int] = (64, 64, 64)) -> None:
        super().__init__()
        sizes = [dim, *hidden, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = torch.tanh(z)
        return z


class PlanarDynamics(nn.Module):
    """The seed's planar CNF: dz/dt = (1/M) Σ_m u_m(t) tanh(w_m(t)·z + b_m(t)).

    A small hypernetwork maps t to the width-M parameters (u is gated, as in the original
    example). Its trace has a closed form: (1/M) Σ_m (1 - h_m²) u_m·w_m.
    """

    def __init__(self, dim: int = 2, width: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.dim, self.width = dim, width
        self.hyper = nn.Sequential(
            nn.Linear(1, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, width * (2 * dim + 2)),
        )

    def _parameters_at(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.hyper(_time_column(t, z))
        m, d = self.width, self.dim
        w = p[:, : m * d].reshape(-1, m, d)
        u = p[:, m * d : 2 * m * d].reshape(-1, m, d)
        gate = torch.sigmoid(p[:, 2 * m * d : 2 * m * d + m])
        b = p[:, 2 * m * d + m :]
        return w, u * gate[:, :, None], b

    def forward_with_trace(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        w, u, b = self._parameters_at(t, z)
        h = torch.tanh(torch.einsum("bmd,bd->bm", w, z) + b)
        f = torch.einsum("bm,bmd->bd", h, u) / self.width
        trace = ((1 - h.square()) * (u * w).sum(2)).sum(1) / self.width
        return f, trace

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.forward_with_trace(t, z)[0]


class CNF(nn.Module):
    """A continuous normalizing flow on R^dim with a standard normal base at t = 0."""

    def __init__(
        self,
        dynamics: nn.Module,
        dim: int,
        *,
        trace: str = "exact",
        noise: str = "rademacher",
        t1: float = 1.0,
        method: str = "dopri5",
        tol: float = 1e-5,
        first_step: float | None = None,
    ) -> None:
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.dynamics, self.dim = dynamics, dim
        self.trace, self.noise, self.t1, self.method, self.tol = trace, noise, t1, method, tol
        self.first_step = first_step  # as for ODEBlock: None is Hairer's rule

    # ---- the augmented dynamics, usable by any solver or by the server's engine ----------
    def augmented(self, t: Tensor, state: Tensor) -> Tensor:
        """d[z, l, ε]/dt = [f, -tr(∂f/∂z), 0] for each row of ``state``."""
        return self._rates(t, state, None)

    def _rates(self, t: Tensor, state: Tensor, regularisation: Regularisation | None) -> Tensor:
        """:meth:`augmented`, and with ``regularisation`` its integral columns: d[K, J]/dt =
        [‖f‖², ‖∂f/∂z‖²_F] / dim, and dC/dt = (d tr(∂f/∂z)/dt)² when the density curvature is
        weighed. The Jacobian term follows the trace: exact from the Jacobian's rows (computed
        for the exact trace anyway, or for it when the trace is closed-form), the Hutchinson
        estimate ‖εᵀ ∂f/∂z‖²/dim with the trace's own noise otherwise (as in RNODE). The
        curvature differentiates whichever trace the model uses, by z and by each row's t."""
        d = self.dim
        differentiable = torch.is_grad_enabled()  # training: keep the trace differentiable
        with_jacobian = regularisation is not None and regularisation.jacobian > 0
        with_curvature = regularisation is not None and regularisation.density_curvature > 0
        trace_graph = differentiable or with_curvature
        jacobian = curvature = None
        with torch.enable_grad():
            z = state[:, :d]
            if not (differentiable and z.requires_grad):  # e.g. a view made under no_grad has no graph
                z = z.detach().requires_grad_(True)
            if with_curvature:  # a t per row, to differentiate the trace by
                t = t.detach().to(z.dtype).reshape(-1).expand(z.shape[0]).clone().requires_grad_(True)
            if hasattr(self.dynamics, "forward_with_trace"):
                f, trace = cast(Any, self.dynamics).forward_with_trace(t, z)  # a method of some dynamics
                if with_jacobian:
                    jacobian = sum(mean_square(row) for row in _jacobian_rows(f, z, differentiable))
            elif self.trace == "exact":
                f = self.dynamics(t, z)
                rows = _jacobian_rows(f, z, trace_graph)
                trace = sum(row[:, i] for i, row in enumerate(rows))
                if with_jacobian:
                    jacobian = sum(mean_square(row) for row in rows)
            else:
                f = self.dynamics(t, z)
                noise = state[:, d + 1 : 2 * d + 1]
                (vjp,) = torch.autograd.grad(f, z, noise, create_graph=trace_graph, retain_graph=True)
                trace = (vjp * noise).sum(1)
                if with_jacobian:
                    jacobian = mean_square(vjp)
            if with_curvature:
                by_z, by_t = torch.autograd.grad(trace.sum(), (z, t), create_graph=differentiable, retain_graph=True)
                curvature = ((by_z * f).sum(1) + by_t).square()
        parts = [f, -trace[:, None]]
        if self.trace == "hutchinson":
            parts.append(torch.zeros_like(f))
        if regularisation is not None:
            parts.append(rate_columns(mean_square(f), cast(Tensor | None, jacobian), f, curvature))  # sums of tensors
        rates = torch.cat(parts, 1)
        return rates if differentiable else rates.detach()

    def error_norm(self, scaled: Tensor) -> Tensor:
        """Error control over z and l only; ε never changes."""
        return rms_norm(scaled[:, : self.dim + 1])

    def initial_state(self, z: Tensor, log_density: Tensor, generator: torch.Generator | None) -> Tensor:
        parts = [z, log_density[:, None]]
        if self.trace == "hutchinson":
            parts.append(draw_noise(z, self.noise, generator))
        return torch.cat(parts, 1)

    # ---- the two directions -------------------------------------------------------------
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        adjoint: bool = False,
        device: torch.device | str | None = None,
        **accuracy: Unpack[Accuracy],
    ) -> tuple[Tensor, Tensor, Solution]:
        """``n`` samples and their log-densities, solving each at its own tolerance."""
        state = self._base_draws(n, generator, device)
        solution = self._solve(state, (0.0, self.t1), accuracy, adjoint)
        y1 = cast(Tensor, solution.y1)  # the state is a tensor
        return y1[:, : self.dim], y1[:, self.dim], solution

    def sample_regularised(
        self,
        n: int,
        regularisation: Regularisation,
        *,
        generator: torch.Generator | None = None,
        adjoint: bool = False,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor, Solution, Tensor]:
        """:meth:`sample` at the model's tolerance, with the regularisers' integrals ``[B, 2]``
        (∫‖f‖² dt, ∫‖∂f/∂z‖²_F dt, both / dim; ``[B, 3]`` with ∫ (d tr(∂f/∂z)/dt)² dt when that
        is weighed) from the same solve."""
        state = self._with_integrals(self._base_draws(n, generator, device), regularisation)
        solution = self._solve(state, (0.0, self.t1), {}, adjoint, regularisation)
        y1 = cast(Tensor, solution.y1)  # the state is a tensor
        integrals = integrals_of(y1, forward=True, columns=regularisation.columns)
        return y1[:, : self.dim], y1[:, self.dim], solution, integrals

    def _base_draws(self, n: int, generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
        """Initial states for sampling: z(0) ~ N(0, I) with l(0) = log N(z(0))."""
        device = device or next(self.parameters()).device
        z0 = torch.randn(n, self.dim, generator=generator, device=device, dtype=next(self.parameters()).dtype)
        return self.initial_state(z0, standard_normal_log_prob(z0), generator)

    def log_prob(
        self,
        x: Tensor,
        *,
        generator: torch.Generator | None = None,
        adjoint: bool = False,
        **accuracy: Unpack[Accuracy],
    ) -> tuple[Tensor, Solution]:
        """log p(x) for each row of ``x``, integrating back to the base distribution."""
        state = self.initial_state(x, torch.zeros_like(x[:, 0]), generator)
        solution = self._solve(state, (self.t1, 0.0), accuracy, adjoint)
        return self._log_density(solution), solution

    def log_prob_regularised(
        self,
        x: Tensor,
        regularisation: Regularisation,
        *,
        generator: torch.Generator | None = None,
        adjoint: bool = False,
    ) -> tuple[Tensor, Solution, Tensor]:
        """:meth:`log_prob` at the model's tolerance, with the regularisers' integrals over [0, T]
        from the same solve (as for :meth:`sample_regularised`)."""
        state = self._with_integrals(self.initial_state(x, torch.zeros_like(x[:, 0]), generator), regularisation)
        solution = self._solve(state, (self.t1, 0.0), {}, adjoint, regularisation)
        integrals = integrals_of(cast(Tensor, solution.y1), forward=False, columns=regularisation.columns)
        return self._log_density(solution), solution, integrals

    def span_error(self, start: Tensor, *, forward: bool, generator: torch.Generator | None = None) -> Tensor:
        """Per row, the scaled error estimate of one step of the model's method over the whole
        span at the model's tolerance, from base draws ``start`` = z(0) (``forward``, as
        :meth:`sample` solves) or from data points ``start`` = x (back, as :meth:`log_prob`
        solves): at most 1 where a solve that tries the whole span first ends in that step.
        Differentiable, for the local error term of training (``Regularisation.local_error``)."""
        method = get_method(self.method)
        if not isinstance(method, ExplicitRK) or method.tableau.b_err is None:
            raise ValueError(f"the local error term needs an explicit method with an error estimate, not {self.method}")
        log_density = standard_normal_log_prob(start) if forward else torch.zeros_like(start[:, 0])
        state = self.initial_state(start, log_density, generator)
        t0, t1 = (0.0, self.t1) if forward else (self.t1, 0.0)
        tol = state.new_full((state.shape[0],), self.tol)
        return method.trial_error(
            self.augmented, torch.full_like(tol, t0), state, torch.full_like(tol, t1), tol, tol, self.error_norm
        )

    # ---- the servable-model protocol (neuralode.models.servable) ------------------------
    # "sample" integrates [z, l] from the base at 0 to T, "log_density" from the data at T back
    # to 0; rows of both share one batch (each has its own span).
    def signatures(self) -> tuple[Signature, ...]:
        points = ("float32",), (-1, self.dim)
        return (
            Signature(
                "sample",
                (
                    TensorSpec("n", ("uint32",), (), "how many points to draw"),
                    TensorSpec(
                        "seed",
                        ("uint64",),
                        (),
                        "the base draws' seed: the same seed gives the same points",
                        optional=True,
                    ),
                ),
                (
                    TensorSpec("points", *points, "samples; NaN where the item's solve failed"),
                    TensorSpec("log_density", ("float32",), (-1,), "log p of each sample"),
                ),
            ),
            Signature(
                "log_density",
                (
                    TensorSpec(
                        "points", ("float32", "float64"), (-1, self.dim), "points to evaluate; finite in float32"
                    ),
                ),
                (
                    TensorSpec(
                        "log_density", ("float32",), (-1,), "exact log p of each point; NaN where the solve failed"
                    ),
                ),
            ),
        )

    def initial_rows(self, operation: str, inputs: Mapping[str, Any], generator: torch.Generator) -> Tensor:
        """``sample``: ``n`` base draws with their log-densities; ``log_density``: the points
        with l = 0. Hutchinson noise, when the trace needs it, comes from ``generator``."""
        if operation == "sample":
            z0 = torch.randn(int(inputs["n"]), self.dim, generator=generator)
            return self.initial_state(z0, standard_normal_log_prob(z0), generator)
        x = inputs["points"]
        return self.initial_state(x, torch.zeros_like(x[:, 0]), generator)

    def encode(self, operation: str, rows: Tensor) -> Start:
        t0, t_end = (0.0, self.t1) if operation == "sample" else (self.t1, 0.0)
        t0_rows = torch.full((len(rows),), t0, dtype=rows.dtype, device=rows.device)
        return Start(rows, t0_rows, torch.full_like(t0_rows, t_end))

    def ode_dynamics(self, t: Tensor, y: Tensor) -> Tensor:
        return self.augmented(t, y)

    def decode(self, operation: str, y1: Tensor) -> dict[str, Tensor]:
        d = self.dim
        if operation == "sample":
            return {"points": y1[:, :d], "log_density": y1[:, d]}
        return {"log_density": standard_normal_log_prob(y1[:, :d]) - y1[:, d]}

    def state_size(self, operation: str) -> int:
        return self.dim + 1 + (self.dim if self.trace == "hutchinson" else 0)

    def encode_bytes(self, operation: str) -> int:
        return 0  # the rows are the initial state

    def _log_density(self, solution: Solution) -> Tensor:
        y1 = cast(Tensor, solution.y1)  # the state is a tensor
        z0, integral = y1[:, : self.dim], y1[:, self.dim]
        return standard_normal_log_prob(z0) - integral

    @staticmethod
    def _with_integrals(state: Tensor, regularisation: Regularisation) -> Tensor:
        return torch.cat([state, state.new_zeros(state.shape[0], regularisation.columns)], 1)

    def _solve(
        self,
        state: Tensor,
        t_span: tuple[float, float],
        accuracy: Accuracy,
        adjoint: bool,
        regularisation: Regularisation | None = None,
    ) -> Solution:
        return solve_ivp(
            self.augmented if regularisation is None else partial(self._rates, regularisation=regularisation),
            state,
            t_span,
            **solve_settings(accuracy, rtol=self.tol, atol=self.tol, method=self.method, first_step=self.first_step),
            norm=self.error_norm,
            adjoint=adjoint,
            adjoint_params=tuple(self.dynamics.parameters()) if adjoint else None,
        )


def _jacobian_rows(f: Tensor, z: Tensor, create_graph: bool) -> list[Tensor]:
    """Row i of ∂f/∂z for every sample, one autograd pass per dimension."""
    return [
        torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)[0]
        for i in range(f.shape[1])
    ]


class PlanarFlow(nn.Module):
    """Rezende & Mohamed (2015): K layers z ← z + û h(w·z + b), h = tanh, with û constrained
    so each layer is invertible; log|det| = log|1 + û·h'(w·z + b) w|."""

    def __init__(self, dim: int = 2, layers: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.u = nn.Parameter(torch.randn(layers, dim) * 0.1)
        self.w = nn.Parameter(torch.randn(layers, dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(layers))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Push base samples through the flow: (x, sum of log|det| over layers)."""
        log_det = torch.zeros_like(z[:, 0])
        for u, w, b in zip(self.u, self.w, self.b):
            wu = w @ u
            u_hat = u + (nn.functional.softplus(wu) - 1 - wu) * w / w.square().sum()
            pre = z @ w + b
            z = z + u_hat * torch.tanh(pre)[:, None]
            psi = (1 - torch.tanh(pre).square())[:, None] * w
            log_det = log_det + torch.log((1 + psi @ u_hat).abs() + 1e-12)
        return z, log_det

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        z0 = torch.randn(n, self.dim, generator=generator, device=self.u.device, dtype=self.u.dtype)
        x, log_det = self(z0)
        return x, standard_normal_log_prob(z0) - log_det
