"""The solver interface: what a method is, independent of step-size control.

A :class:`Solver` takes one step of size ``dt`` from ``(t, y)`` for every row of a batch and
proposes the new state, a local error estimate (when it has one) and the rows of its own
per-sample state (an FSAL derivative, a multistep history) for the case the step is accepted.
Whether it is accepted, and what the next ``dt`` is, is the step-size controller's business
(:mod:`.controller`); limits, landing on stops and statuses are the :class:`~.stepper.Stepper`'s.
diffrax's ``AbstractSolver`` is the model: ``init`` prepares the solver's state, ``step``
advances it.

Everything is per row: a row's step depends only on that row's inputs, so a batch gives each
sample what it would get alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .state import StepRecord

Func = Callable[[Tensor, Tensor], Tensor]
"""Per-sample dynamics: ``func(t, y)`` with ``t`` of shape ``[B]`` and ``y`` of ``[B, *S]``."""

INTERPOLANTS = ("method", "linear", "cubic")
"""Dense output between the ends of a step: the method's own interpolant, linear, or cubic
Hermite through (y0, f0, y1, f1)."""


@dataclass(frozen=True)
class Perturbation:
    """Rows whose first stage is evaluated just after ``t`` and whose stages at the end of the
    step just before it, in the direction of integration: one-sided evaluations next to a
    discontinuity of ``func`` in time (torchdiffeq's ``perturb`` and ``jump_t``). Each field
    is ``[B]`` bool, or a plain bool for all rows."""

    after_start: Tensor | bool
    before_end: Tensor | bool


@dataclass
class Attempt:
    """What :meth:`Solver.step` proposes. ``ks[i]`` is ``func(stage_t[i], stage_y[i])``, ``f0``
    the derivative at the step's start (stage 0 of an explicit RK method)."""

    y1: Tensor
    error: Tensor | None  # local error estimate (unscaled, per element), None without one
    nfe: int | Tensor  # evaluations made, for every row or per row [B]
    stage_t: list[Tensor]
    stage_y: list[Tensor]
    ks: list[Tensor]
    f0: Tensor
    rows: dict[str, Tensor]  # the solver's per-sample state after the step, if it is accepted


class Solver(ABC):
    """One integration method, stepping every row of a batch at once.

    Subclasses set ``name``, ``order`` (of the propagated solution), ``error_order`` (of the
    embedded solution the error estimate compares it with; ``None`` for fixed-step methods), ``fsal`` and
    ``quadrature`` (weights of ``stage_y`` that integrate a function over the step, used by
    the adjoint's parameter quadrature; ``None`` when the stages are not a quadrature rule).
    """

    name: str
    order: int
    error_order: int | None = None
    fsal: bool = False
    quadrature: tuple[float, ...] | None = None
    taped_stages: tuple[int, ...] = ()
    """Stages evaluated by the step itself, in order, once each, on every row: the adjoint can
    reuse their graphs. Empty when the step evaluates in another pattern (iterations)."""

    @property
    def adaptive(self) -> bool:
        """Whether the method has an error estimate, so an adaptive controller can drive it."""
        return self.error_order is not None

    @property
    def error_exponent(self) -> int:
        """``k`` with the error estimate scaling like ``dt**k``: the local error of the lower
        of the two solutions it compares (the controller's ``err**(-1/k)``)."""
        if self.error_order is None:
            raise ValueError(f"{self.name} has no error estimate; it runs with fixed steps")
        return min(self.order, self.error_order) + 1

    @property
    def needs_f0(self) -> bool:
        """Whether :meth:`init` needs ``func(t0, y0)``."""
        return self.fsal

    def init(self, func: Func, t0: Tensor, y0: Tensor, f0: Tensor | None) -> dict[str, Tensor]:
        """The solver's per-sample state for rows starting at ``(t0, y0)``."""
        return {"f0": cast(Tensor, f0)} if self.fsal else {}  # an FSAL method needs_f0: given

    @abstractmethod
    def step_cost(self, rows: dict[str, Tensor] | None) -> int | Tensor:
        """The most evaluations the next step of each row can make (an int for all rows; ``rows``
        None: a fresh row)."""

    @abstractmethod
    def step(
        self,
        func: Func,
        t: Tensor,
        y: Tensor,
        dt: Tensor,
        t1: Tensor,
        rows: dict[str, Tensor],
        perturbation: Perturbation | None,
        rtol: Tensor,
        atol: Tensor,
    ) -> Attempt:
        """One step of size ``dt`` (signed, per row) from ``(t, y)`` to ``t1``; ``rtol`` and
        ``atol`` are the rows' tolerances, for methods that iterate."""

    def needs_f1(self, interpolant: str) -> bool:
        """Whether ``interpolant`` needs ``func(t1, y1)`` beyond the step's own stages."""
        return interpolant == "cubic"

    def interpolate(self, record: StepRecord, theta: Tensor, interpolant: str, f1: Tensor | None) -> Tensor:
        """The state at ``t + theta * dt`` (``theta`` ``[B]`` in [0, 1]) of the step ``record``."""
        y0, y1, dt = record.y, record.y1, rows_of(record.dt, record.y1)
        th = rows_of(theta, y1)
        if interpolant == "linear":
            return torch.lerp(y0, y1, th)
        f0 = record.f0
        if interpolant == "cubic":
            return hermite(y0, y1, dt * f0, dt * cast(Tensor, f1), th)  # given where needs_f1
        # The quadratic through (y0, f0, y1): as accurate as the low-order methods that use it.
        return y0 + th * dt * f0 + th * th * (y1 - y0 - dt * f0)


def hermite(y0: Tensor, y1: Tensor, hf0: Tensor, hf1: Tensor, theta: Tensor) -> Tensor:
    """Cubic Hermite interpolation on [0, 1] from values and (step-scaled) derivatives."""
    one_minus = 1 - theta
    return (
        y0
        + theta * theta * (3 - 2 * theta) * (y1 - y0)
        + theta * one_minus * one_minus * hf0
        - theta * theta * one_minus * hf1
    )


def rows_of(v: Tensor, like: Tensor) -> Tensor:
    """View a per-sample ``[B]`` tensor so it broadcasts against ``like`` (``[B, *S]``)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def per_row(values: Tensor) -> Tensor:
    """``[B, *S] -> [B, N]``: each row's elements, for reductions per sample (also for S = ())."""
    return values.reshape(values.shape[0], -1)


def scaled_error_norm(
    y: Tensor, y1: Tensor, error: Tensor, dt: Tensor, rtol: Tensor, atol: Tensor, norm: Callable[[Tensor], Tensor]
) -> Tensor:
    """Step control's measure of a step from ``y`` to ``y1`` with local error estimate ``error``
    (per element, before the factor ``dt``): ``|dt| * norm(error / (atol + rtol * max(|y|, |y1|)))``
    per row; at most 1 is accepted. Divides ``error`` in place unless autograd needs it."""
    scale = torch.maximum(y.abs(), y1.abs()).mul_(rows_of(rtol, y)).add_(rows_of(atol, y))
    scaled = error.div(scale) if error.requires_grad else error.div_(scale)
    return dt.abs() * norm(scaled)


def evaluate(func: Func, t: Tensor, y: Tensor) -> Tensor:
    """``func(t, y)``, with an error naming the problem if it returns the wrong thing."""
    out = func(t, y)
    if not isinstance(out, Tensor):
        raise TypeError(f"func must return a tensor, got {type(out).__name__}")
    if out.shape != y.shape:
        raise ValueError(f"func returned shape {tuple(out.shape)}, but the state has shape {tuple(y.shape)}")
    if out.dtype != y.dtype:
        raise ValueError(f"func returned dtype {out.dtype}, but the state has dtype {y.dtype}")
    return out


def evaluate_rows(func: Func, t: Tensor, y: Tensor, mask: Tensor, fallback: Tensor) -> Tensor:
    """``func`` on the rows where ``mask`` is set only; the other rows keep ``fallback``.
    Costs one host–device synchronisation (to find the rows)."""
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return fallback
    if index.numel() == mask.shape[0]:
        return evaluate(func, t, y)
    values = evaluate(func, t.index_select(0, index), y.index_select(0, index))
    return fallback.index_put((index,), values)


def nudged(t: Tensor, towards: Tensor, mask: Tensor | bool | None) -> Tensor:
    """``t``, moved to the next representable time towards ``towards`` on the rows in
    ``mask`` (a ``[B]`` bool, or a bool for all rows)."""
    if mask is None or mask is False:
        return t
    if mask is True:
        return torch.nextafter(t, towards)
    return torch.where(mask, torch.nextafter(t, towards), t)
