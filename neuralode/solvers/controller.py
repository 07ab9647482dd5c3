"""Step-size control, per sample: the controller protocol and its two implementations.

A controller chooses each row's first step (``init``) and, after every attempted step,
whether to accept it and how large the next one is (``adapt``). Its memory (the PI
controller's last error) lives in rows of the solver state like everything else.

:class:`PIController` (Gustafsson; Hairer & Wanner II, IV.2): the next step is
``dt * safety * err**(-(icoeff + pcoeff)/k) * prev_err**(pcoeff/k)``, clamped to
``[min_factor, max_factor]``, where ``err`` is the scaled error norm of the step just tried
(accept when ``err <= 1``), ``prev_err`` that of the last accepted step and ``k`` the order of
the error estimate plus one. The proportional term damps the step-size oscillation of pure
integral control. After a rejection the step may only shrink, and the integral term alone
decides by how much. The defaults are Hairer's DOPRI5 code (beta = 0.04 for k = 5); on the
ODE-Net they take the same NFE as torchdiffeq's I controller (``pcoeff=0, icoeff=1``) at
tol 1e-3 with fewer rejections on the classic test problems.

:class:`ConstantController`: fixed steps (or straight from stop to stop), accepted unless the
new state is not finite, which no smaller step of the same size could cure.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .solver import Func, Solver, evaluate, per_row, rows_of

Norm = Callable[[Tensor], Tensor]
"""Maps scaled errors ``[B, *S]`` to one norm per sample ``[B]``."""


@dataclass(frozen=True)
class Decision:
    accept: Tensor  # [B] bool
    dt: Tensor  # [B] signed step to try next
    rows: dict[str, Tensor]  # the controller's rows after this step
    stuck: Tensor  # [B] bool: the row cannot make progress (step size underflow, non-finite)


class StepSizeController(ABC):
    adaptive: bool
    """Whether ``adapt`` reads the error estimate (and so needs a method that has one)."""

    @abstractmethod
    def init_cost(self, first_step: Tensor | float | None) -> int:
        """Evaluations ``init`` makes beyond ``f(t0, y0)``."""

    def needs_f0(self, first_step: Tensor | float | None) -> bool:
        return False

    @abstractmethod
    def init(
        self,
        solver: Solver,
        func: Func,
        t0: Tensor,
        y0: Tensor,
        f0: Tensor | None,
        direction: Tensor,
        rtol: Tensor,
        atol: Tensor,
        norm: Norm,
        first_step: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Each row's first step (signed) and the controller's rows."""

    @abstractmethod
    def adapt(
        self, error: Tensor | None, y1: Tensor, t: Tensor, dt: Tensor, planned: Tensor, rows: dict[str, Tensor], k: int
    ) -> Decision:
        """Decide on the step ``dt`` just tried from ``t`` (``planned`` is the step the row had
        planned before it was shortened to land on a stop). ``error`` is the scaled error norm
        per row (``None`` for a non-adaptive controller), ``k`` the order of the error
        estimate plus one."""


@dataclass(frozen=True)
class PIController(StepSizeController):
    pcoeff: float = 0.2
    icoeff: float = 0.65
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    min_step: float = 0.0
    """Steps never shrink below this, and a step this short is accepted whatever its error
    (torchdiffeq's ``min_step``)."""
    max_step: float = math.inf

    adaptive = True

    def __post_init__(self) -> None:
        if not 0.0 < self.safety <= 1.0:
            raise ValueError(f"safety must be in (0, 1], got {self.safety}")
        if not 0.0 < self.min_factor < 1.0 < self.max_factor:
            raise ValueError("need 0 < min_factor < 1 < max_factor")
        if self.icoeff <= 0.0 or self.pcoeff < 0.0:
            raise ValueError("need icoeff > 0 and pcoeff >= 0")
        if not 0.0 <= self.min_step <= self.max_step or not self.max_step > 0.0:
            raise ValueError(f"need 0 <= min_step <= max_step and max_step > 0, got {self.min_step}, {self.max_step}")

    def decide(self, error: Tensor, prev_error: Tensor, dt: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample: accept or not, the next step size, and the error to remember.

        ``error``, ``prev_error`` and ``dt`` have shape ``[B]``; ``k`` is the order of the
        local error estimate plus one. A non-finite error counts as a rejection that shrinks
        the step as much as allowed.
        """
        accept = error <= 1.0  # False for NaN and inf too
        # NaN counts as an infinite error, whose factor (0) the min_factor clamp raises; a zero
        # error would make the power infinite, so the max_factor clamp is what applies.
        err = error.nan_to_num(nan=math.inf).clamp_min_(1e-10)
        growth, shrink = row_pows(err, -(self.icoeff + self.pcoeff) / k, -1.0 / k)
        factor = torch.where(accept, growth, shrink)
        if self.pcoeff:  # prev_error is an accepted (so finite, clamped) error or the initial 1
            factor = factor.mul_(torch.where(accept, row_pows(prev_error, self.pcoeff / k)[0], 1.0))
        upper = err.new_full((), self.max_factor).where(accept, 1.0)
        factor = factor.mul_(self.safety).clamp_min_(self.min_factor).minimum(upper)
        return accept, dt * factor, torch.where(accept, err, prev_error)

    def init_cost(self, first_step: Tensor | float | None) -> int:
        return 0 if first_step is not None else 1

    def needs_f0(self, first_step: Tensor | float | None) -> bool:
        return first_step is None

    def init(self, solver, func, t0, y0, f0, direction, rtol, atol, norm, first_step):
        if first_step is not None:
            dt = direction * first_step
        else:
            dt = initial_step(solver.error_exponent, func, t0, y0, f0, direction, rtol, atol, norm)
        return self._clamp(dt), {"prev_error": torch.ones_like(t0)}

    def adapt(self, error, y1, t, dt, planned, rows, k):
        accept, dt_next, prev_error = self.decide(error, rows["prev_error"], dt, k)
        if self.min_step > 0.0:
            accept = accept | (dt.abs() <= self.min_step)
        dt_next = self._clamp(dt_next)
        eps = torch.finfo(dt.dtype).eps
        stuck = dt_next.abs() < 2 * eps * torch.maximum(t.abs(), (t + dt).abs())
        return Decision(accept, dt_next, {"prev_error": prev_error}, stuck)

    def _clamp(self, dt: Tensor) -> Tensor:
        if self.min_step == 0.0 and self.max_step == math.inf:
            return dt
        return torch.copysign(dt.abs().clamp(self.min_step, self.max_step), dt)


@dataclass(frozen=True)
class ConstantController(StepSizeController):
    """Steps of ``step_size``; with ``None``, each step goes straight to the row's next stop."""

    step_size: float | None = None

    adaptive = False

    def __post_init__(self) -> None:
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")

    def init_cost(self, first_step: Tensor | float | None) -> int:
        return 0

    def init(self, solver, func, t0, y0, f0, direction, rtol, atol, norm, first_step):
        size = math.inf if self.step_size is None else self.step_size
        return direction * size, {}

    def adapt(self, error, y1, t, dt, planned, rows, k):
        finite = torch.isfinite(per_row(y1)).all(1)
        return Decision(finite, planned, rows, ~finite)


def row_pows(x: Tensor, *exponents: float) -> tuple[Tensor, ...]:
    """``x ** exponent`` for each exponent, for ``[B]`` per-sample values, rounded alike in
    every row.

    On the CPU a contiguous tensor's ``pow`` runs vectorised except for the last few elements,
    and the two kernels round differently, so a row's step size would depend on its place in the
    batch. A strided copy takes the scalar kernel for every element."""
    if x.device.type != "cpu":
        return tuple(x.pow(e) for e in exponents)
    strided = x.new_empty(x.shape[0], 2)[:, 0].copy_(x)
    return tuple(strided.pow(e) for e in exponents)


@torch.no_grad()
def initial_step(
    k: int, func: Func, t0: Tensor, y0: Tensor, f0: Tensor, direction: Tensor, rtol: Tensor, atol: Tensor, norm: Norm
) -> Tensor:
    """Hairer, Nørsett & Wanner I, II.4: a first step whose local error is about the
    tolerance, judged from the sizes of y0, f0 and a finite difference of f (1 evaluation);
    ``k`` is the exponent of the local error (torchdiffeq's choice, the method's order for
    most)."""
    scale = rows_of(atol, y0) + y0.abs() * rows_of(rtol, y0)
    d0 = norm(y0 / scale)
    d1 = norm(f0 / scale)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
    y1 = torch.addcmul(y0, rows_of(direction * h0, y0), f0)
    f1 = evaluate(func, t0 + direction * h0, y1)
    d2 = norm((f1 - f0) / scale) / h0
    d12 = torch.maximum(d1, d2)
    h1 = torch.where(
        d12 <= 1e-15,
        torch.clamp_min(h0 * 1e-3, 1e-6),
        row_pows(0.01 / d12.clamp_min(1e-30), 1.0 / k)[0],
    )
    h = torch.minimum(100 * h0, h1)
    return direction * torch.where(torch.isfinite(h), h, h0)
