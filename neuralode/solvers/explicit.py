"""Explicit Runge–Kutta methods: one solver, any tableau.

The step is the hot path of training and serving, so it stays lean: the stages in few memory
passes, no host–device synchronisation, and nothing for perturbed evaluations unless asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor

from .solver import Attempt, Func, Perturbation, Solver, evaluate, evaluate_rows, nudged, rows_of, scaled_error_norm
from .state import StepRecord
from .tableau import ButcherTableau


def weighted_sum(coefficients: Sequence[float], ks: Sequence[Tensor]) -> Tensor | None:
    """``sum_j coefficients[j] * ks[j]`` skipping zero coefficients, in few memory passes."""
    total = None
    for coefficient, k in zip(coefficients, ks):
        if coefficient == 0.0:
            continue
        # In place on a tensor this function made: safe for autograd, one memory pass less.
        total = k * coefficient if total is None else total.add_(k, alpha=coefficient)
    return total


def advance(y: Tensor, dt_rows: Tensor, coefficients: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """``y + dt * sum_j coefficients[j] * ks[j]``."""
    increment = weighted_sum(coefficients, ks)
    return y if increment is None else torch.addcmul(y, dt_rows, increment)


def explicit_stages(
    func: Func,
    tableau: ButcherTableau,
    t: Tensor,
    y: Tensor,
    dt: Tensor,
    t1: Tensor,
    k1: Tensor,
    t_first: Tensor,
    before_end: Tensor | bool | None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """The stages after the first (given as ``k1``, evaluated at ``t_first``) and the new
    state. Stages at the end of the step are evaluated at ``t1`` itself, or just before it for
    the rows in ``before_end``."""
    dt_rows = rows_of(dt, y)
    stage_t, stage_y, ks = [t_first], [y], [k1]
    for i in range(1, tableau.stages):
        c = tableau.c[i]
        t_i = t + c * dt if c != 1.0 else nudged(t1, t, before_end)
        y_i = advance(y, dt_rows, tableau.a[i - 1], ks)
        stage_t.append(t_i)
        stage_y.append(y_i)
        ks.append(evaluate(func, t_i, y_i))
    y1 = stage_y[-1] if tableau.fsal else advance(y, dt_rows, tableau.b, ks)
    return stage_t, stage_y, ks, y1


class ExplicitRK(Solver):
    """An explicit Runge–Kutta method given by its tableau (adaptive when it has ``b_err``)."""

    def __init__(self, name: str, tableau: ButcherTableau, order: int, error_order: int | None = None) -> None:
        if (tableau.b_err is None) != (error_order is None):
            raise ValueError(f"{name}: error_order goes with an error estimate (b_err), and only with one")
        self.name, self.tableau, self.order, self.error_order = name, tableau, order, error_order
        self.fsal = tableau.fsal
        self.quadrature = tableau.b
        self.taped_stages = tuple(range(1 if self.fsal else 0, tableau.stages))
        self._cost = len(self.taped_stages)
        self._dense: Tensor | None = None
        self._dense_stages: tuple[int, ...] = ()
        if tableau.b_dense is not None:
            self._dense_stages = tuple(i for i, p in enumerate(tableau.b_dense) if any(p))
            degree = max(len(p) for p in tableau.b_dense)
            self._dense = torch.tensor(
                [list(p) + [0.0] * (degree - len(p)) for p in tableau.b_dense], dtype=torch.float64
            )

    def __repr__(self) -> str:
        return f"ExplicitRK({self.name!r})"

    def step_cost(self, rows: dict[str, Tensor] | None) -> int:
        return self._cost

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
        tableau = self.tableau
        nfe: int | Tensor = self._cost
        t_first = t
        if perturbation is None:
            k1 = rows["f0"] if self.fsal else evaluate(func, t, y)
        else:
            after = perturbation.after_start
            t_first = nudged(t, t1, after)
            if not self.fsal:
                k1 = evaluate(func, t_first, y)
            elif isinstance(after, Tensor):
                k1 = evaluate_rows(func, t_first, y, after, rows["f0"])
                nfe = self._cost + after.long()
            elif after:
                k1, nfe = evaluate(func, t_first, y), self._cost + 1
            else:
                k1 = rows["f0"]
        before_end = None if perturbation is None else perturbation.before_end
        stage_t, stage_y, ks, y1 = explicit_stages(func, tableau, t, y, dt, t1, k1, t_first, before_end)
        error = None
        if tableau.b_err is not None:
            with torch.no_grad():  # step control never needs gradients
                error = weighted_sum(tableau.b_err, ks)
        return Attempt(y1, error, nfe, stage_t, stage_y, ks, k1, {"f0": ks[-1]} if self.fsal else {})

    def trial_error(
        self,
        func: Func,
        t0: Tensor,
        y0: Tensor,
        t1: Tensor,
        rtol: Tensor,
        atol: Tensor,
        norm: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Each row's scaled error for one step from ``t0`` straight to ``t1``: the number step
        control accepts the step at (at most 1), differentiable. Training can then weigh how far
        a model's solves are from ending in one step, as Pal et al. (ICML 2021) weigh a solver's
        error estimates; the hot path (:meth:`step`) keeps its estimate out of autograd."""
        if self.tableau.b_err is None:
            raise ValueError(f"{self.name} has no error estimate")
        dt = t1 - t0
        k1 = evaluate(func, t0, y0)
        _, _, ks, y1 = explicit_stages(func, self.tableau, t0, y0, dt, t1, k1, t0, None)
        error = cast(Tensor, weighted_sum(self.tableau.b_err, ks))  # b_err has a nonzero weight
        return scaled_error_norm(y0, y1, error, dt, rtol, atol, norm)

    def needs_f1(self, interpolant: str) -> bool:
        return interpolant == "cubic" and not self.fsal

    def interpolate(self, record: StepRecord, theta: Tensor, interpolant: str, f1: Tensor | None) -> Tensor:
        """The tableau's continuous extension if it has one, else cubic Hermite for FSAL
        methods (f1 is their last stage), else what :class:`Solver` offers."""
        if interpolant == "method" and self._dense is not None:
            dense = self._dense.to(theta.dtype if theta.is_floating_point() else torch.float64)
            powers = torch.stack([theta ** (j + 1) for j in range(dense.shape[1])], 1)  # [R, d]
            weights = powers @ dense.to(powers.device).T  # [R, stages]
            y0 = record.y
            increment = sum(rows_of(weights[:, i], y0) * record.ks[i] for i in self._dense_stages)
            return y0 + rows_of(record.dt, y0) * increment
        if self.fsal and interpolant in ("method", "cubic"):
            return super().interpolate(record, theta, "cubic", record.ks[-1])
        return super().interpolate(record, theta, interpolant, f1)
