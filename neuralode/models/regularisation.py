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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NOISES = ("rademacher", "gaussian")
INTEGRALS = 2
"""The last two state columns: K and J."""


@dataclass(frozen=True)
class Regularisation:
    """The weights λ_K (``kinetic``) and λ_J (``jacobian``); zero switches a term off."""

    kinetic: float = 0.0
    jacobian: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kinetic", "jacobian"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"the {name} weight must be finite and >= 0, got {value}")

    @property
    def active(self) -> bool:
        return self.kinetic > 0 or self.jacobian > 0

    def penalty(self, integrals: Tensor) -> Tensor:
        """The loss term λ_K·K + λ_J·J, averaged over the batch (``integrals``: ``[B, 2]``)."""
        kinetic, jacobian = integrals.mean(0)
        return self.kinetic * kinetic + self.jacobian * jacobian

    def card(self) -> dict:
        return {"kinetic": self.kinetic, "jacobian": self.jacobian}


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


def rate_columns(kinetic: Tensor | None, jacobian: Tensor | None, like: Tensor) -> Tensor:
    """``[B, 2]`` rates for the integral columns; a term switched off (None) integrates zero."""
    zeros = like.new_zeros(like.shape[0])
    return torch.stack([zeros if kinetic is None else kinetic, zeros if jacobian is None else jacobian], 1)


def integrals_of(y1: Tensor, forward: bool) -> Tensor:
    """The positive integrals ``[B, 2]`` from a final augmented state (negated for a solve
    that ran backwards in time, whose columns accumulate -∫)."""
    columns = y1[:, -INTEGRALS:]
    return columns if forward else -columns
