"""Kinetic-energy and Jacobian regularisation of neural ODEs (Finlay et al. 2020, RNODE).

Training adds ``λ_K·K + λ_J·J`` to the loss, with ``K = ∫‖f‖² dt / D`` (kinetic energy)
and ``J = ∫‖∂f/∂z‖²_F dt / D`` (the Jacobian's Frobenius norm), both per state dimension D as
RNODE's code averages them, so one λ means the same for the 2-D CNF and the 2,304-D ODE-Net.
Straighter, smoother trajectories let an adaptive solver take fewer, longer steps, which is
what a served model pays for.

Both integrals ride along in the same solve, forward and in the adjoint: the per-sample state
gets two last columns ``[K, J]`` with ``dK/dt = ‖f‖²/D`` and ``dJ/dt`` the Jacobian term.
Where that term is a Hutchinson estimate ``‖εᵀ ∂f/∂z‖²/D`` (unbiased for ``‖∂f/∂z‖²_F/D``
when ``E[εεᵀ] = I``), the noise ε sits in the state as constant columns too: each sample draws it
once, it stays fixed for its whole solve and travels with the sample however the batch
shrinks. Error control leaves the integral and noise columns out, so regularised training
takes the steps the model's own state asks for.

A CNF may also weigh ``C = ∫ (d tr(∂f/∂z)/dt)² dt``, the squared rate at which the log-density's
rate changes along a trajectory (its total time derivative, ∂/∂t plus the drift along f; a
second-order term in the spirit of Kelly et al. 2020). K and J straighten z, but the
log-density l, which a CNF's error control also covers, keeps bending where the flow compresses
or spreads mass; on 8gaussians that bend, not z's, is what rejects a step over the whole span.
C rides along as a third integral column, present only when its weight is set, so runs
without it solve exactly the state they always did.

A CNF may also weigh ``E``, the solver's own verdict on one step over the whole span: the scaled
local error estimate that step control accepts at ≤ 1 (Pal et al., ICML 2021, regularise a
solver's error estimates the same way). K, J and C shape the dynamics in the hope that the
solver will take longer steps; E asks for it directly, for a model whose solves try the whole
span first (``--first-step``). It is no integral: trial steps beside the training solve, one
back from the data end and one forward from base draws (a CNF is served both ways), whose
gradients come by backprop through their stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NOISES = ("rademacher", "gaussian")
INTEGRALS = 2
"""The integral columns every regularised state ends with: K and J (C comes after them when set)."""


@dataclass(frozen=True)
class Regularisation:
    """The weights λ_K (``kinetic``), λ_J (``jacobian``) and, for CNFs, λ_C
    (``density_curvature``) and λ_E (``local_error``); zero switches a term off."""

    kinetic: float = 0.0
    jacobian: float = 0.0
    density_curvature: float = 0.0
    local_error: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kinetic", "jacobian", "density_curvature", "local_error"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"the {name} weight must be finite and >= 0, got {value}")

    @property
    def active(self) -> bool:
        """Whether the solve integrates the regularisers' columns (E needs none)."""
        return self.kinetic > 0 or self.jacobian > 0 or self.density_curvature > 0

    @property
    def columns(self) -> int:
        """How many integral columns a regularised state ends with: K, J and C if it is set."""
        return INTEGRALS + (self.density_curvature > 0)

    def penalty(self, integrals: Tensor) -> Tensor:
        """The loss term λ_K·K + λ_J·J (+ λ_C·C), averaged over the batch (``integrals``:
        ``[B, columns]``)."""
        means = integrals.mean(0)
        penalty = self.kinetic * means[0] + self.jacobian * means[1]
        return penalty + self.density_curvature * means[2] if self.density_curvature > 0 else penalty

    def card(self) -> dict:
        card = {"kinetic": self.kinetic, "jacobian": self.jacobian}
        optional = {"density_curvature": self.density_curvature, "local_error": self.local_error}
        return card | {name: weight for name, weight in optional.items() if weight > 0}


def draw_noise(like: Tensor, kind: str, generator: torch.Generator | None) -> Tensor:
    """Hutchinson probe vectors shaped like ``like``: Rademacher (±1) or standard normal."""
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return noise.sign() if kind == "rademacher" else noise


def mean_square(v: Tensor) -> Tensor:
    """‖v_b‖²/D for each sample b of D elements."""
    return v.flatten(1).square().mean(1)


def hutchinson_jacobian(f: Tensor, z: Tensor, noise: Tensor, *, create_graph: bool) -> Tensor:
    """‖εᵀ ∂f/∂z‖²/D per sample, one vector–Jacobian product; ``f`` must have a graph to ``z``."""
    (vjp,) = torch.autograd.grad(f, z, noise, create_graph=create_graph, retain_graph=True)
    return mean_square(vjp)


def rate_columns(
    kinetic: Tensor | None, jacobian: Tensor | None, like: Tensor, density_curvature: Tensor | None = None
) -> Tensor:
    """``[B, 2]`` rates for the integral columns, ``[B, 3]`` with a density-curvature rate; a
    term switched off (None) integrates zero."""
    zeros = like.new_zeros(like.shape[0])
    rates = [zeros if kinetic is None else kinetic, zeros if jacobian is None else jacobian]
    return torch.stack(rates if density_curvature is None else [*rates, density_curvature], 1)


def integrals_of(y1: Tensor, forward: bool, columns: int = INTEGRALS) -> Tensor:
    """The positive integrals ``[B, columns]`` from a final augmented state (negated for a
    solve that ran backwards in time, whose columns accumulate -∫)."""
    integrals = y1[:, -columns:]
    return integrals if forward else -integrals
