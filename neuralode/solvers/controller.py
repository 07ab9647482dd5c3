"""Step-size control, per sample.

A PI controller (Gustafsson; Hairer & Wanner II, IV.2): the next step is
``dt * safety * err**(-(icoeff + pcoeff)/k) * prev_err**(pcoeff/k)``, clamped to
``[min_factor, max_factor]``, where ``err`` is the scaled error norm of the step just tried
(accept when ``err <= 1``), ``prev_err`` that of the last accepted step and ``k`` the order of
the error estimate plus one. The proportional term damps the step-size oscillation of pure
integral control. After a rejection the step may only shrink, and the integral term alone
decides by how much. The defaults are Hairer's DOPRI5 code (beta = 0.04 for k = 5); on the
ODE-Net they take the same NFE as torchdiffeq's I controller (``pcoeff=0, icoeff=1``) at
tol 1e-3 with fewer rejections on the classic test problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PIController:
    pcoeff: float = 0.2
    icoeff: float = 0.65
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 < self.safety <= 1.0:
            raise ValueError(f"safety must be in (0, 1], got {self.safety}")
        if not 0.0 < self.min_factor < 1.0 < self.max_factor:
            raise ValueError("need 0 < min_factor < 1 < max_factor")
        if self.icoeff <= 0.0 or self.pcoeff < 0.0:
            raise ValueError("need icoeff > 0 and pcoeff >= 0")

    def decide(
        self, error: Tensor, prev_error: Tensor, dt: Tensor, k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample: accept or not, the next step size, and the error to remember.

        ``error``, ``prev_error`` and ``dt`` have shape ``[B]``; ``k`` is the order of the
        local error estimate plus one. A non-finite error counts as a rejection that shrinks
        the step as much as allowed.
        """
        finite = torch.isfinite(error)
        accept = finite & (error <= 1.0)
        # A zero error would make the power infinite; the max_factor clamp is what applies.
        err = torch.where(finite, error, torch.ones_like(error)).clamp_min(1e-10)
        prev = prev_error.clamp_min(1e-10)
        accepted_factor = err.pow(-(self.icoeff + self.pcoeff) / k) * prev.pow(self.pcoeff / k)
        rejected_factor = err.pow(-1.0 / k)
        factor = self.safety * torch.where(accept, accepted_factor, rejected_factor)
        upper = torch.where(accept, torch.full_like(factor, self.max_factor), torch.ones_like(factor))
        factor = torch.minimum(factor.clamp_min(self.min_factor), upper)
        factor = torch.where(finite, factor, torch.full_like(factor, self.min_factor))
        next_prev_error = torch.where(accept, err, prev_error)
        return accept, dt * factor, next_prev_error
