"""Adams methods with a per-sample history: explicit (Adams–Bashforth) and implicit
(Adams–Bashforth–Moulton predictor–corrector), fixed step.

Each row keeps its own past derivatives, so rows that started at different times (or that
left the batch and came back) each use their own history. As in torchdiffeq, a row starts
with Kutta's 3/8-rule RK4 until it has three past derivatives, then raises its order with
every step up to ``max_order``; the implicit variant corrects the Adams–Bashforth prediction
by up to ``max_iters`` fixed-point iterations of Adams–Moulton, and when they do not converge
drops its oldest history entry (lowering the order). ``max_order`` defaults to 12 for the
implicit method, as in torchdiffeq, and to 5 for the explicit one. The coefficients assume equal steps, so
a row whose step size changes (a step shortened to land on a stop) starts over with RK4.
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from math import comb

import torch
from torch import Tensor

from .explicit import explicit_stages
from .solver import Attempt, Func, Perturbation, Solver, evaluate, nudged, per_row, rows_of
from .tableau import RK4_38_TABLEAU

_START_ORDER = 3  # rows with fewer past derivatives take an RK4 step
_SAME_STEP = 1e-4  # relative change of dt that restarts the history


def adams_coefficients(values: int, implicit: bool) -> list[float]:
    """Weights of ``f_n, f_{n-1}, …`` (explicit) or ``f_{n+1}, f_n, …`` (implicit) in the
    ``values``-point Adams formula, from the backward-difference coefficients γ_j
    (Hairer, Nørsett & Wanner I, III.1)."""
    gamma: list[Fraction] = []
    for m in range(values):
        total = sum(g / (m + 1 - j) for j, g in enumerate(gamma))
        gamma.append((Fraction(0) if implicit else Fraction(1)) - total if m else Fraction(1))
    return [float((-1) ** i * sum(gamma[j] * comb(j, i) for j in range(i, values))) for i in range(values)]


class Adams(Solver):
    fsal = False

    def __init__(self, name: str, implicit: bool, max_order: int | None = None, max_iters: int = 4) -> None:
        # torchdiffeq's max_order of 12 makes the explicit method unstable at any practical step
        # (Adams–Bashforth with 11 values is stable only for |h λ| below about 0.003).
        max_order = max_order if max_order is not None else (12 if implicit else 5)
        if not _START_ORDER + 1 <= max_order <= 20:
            raise ValueError(f"max_order must be in [{_START_ORDER + 1}, 20], got {max_order}")
        self.name, self.implicit, self.max_iters = name, implicit, max_iters
        self.order = 4  # the RK4 start; the Adams steps rise to max_order - 1 past values
        self.history = max_order - 1
        size = self.history
        self._bashforth = torch.tensor(
            [adams_coefficients(k, False) + [0.0] * (size - k) for k in range(size + 1)], dtype=torch.float64
        )
        self._moulton = torch.tensor(
            [adams_coefficients(k + 1, True) + [0.0] * (size - k) for k in range(size + 1)], dtype=torch.float64
        )

    def __repr__(self) -> str:
        return f"Adams({self.name!r})"

    def with_options(self, *, max_order: int | None = None, max_iters: int | None = None) -> Adams:
        return Adams(self.name, self.implicit, max_order or self.history + 1, max_iters or self.max_iters)

    def init(self, func: Func, t0: Tensor, y0: Tensor, f0: Tensor | None) -> dict[str, Tensor]:
        batch = y0.shape[0]
        return {
            "history": y0.new_zeros(batch, self.history, *y0.shape[1:]),
            "length": torch.zeros(batch, dtype=torch.int64, device=y0.device),
            "dt": torch.zeros_like(t0),
        }

    def step_cost(self, rows: dict[str, Tensor] | None) -> int:
        # Any step may restart with RK4 (4 evaluations) if its size differs from the last one.
        return max(1 + (RK4_38_TABLEAU.stages - 1), 1 + (self.max_iters if self.implicit else 0))

    def step(self, func, t, y, dt, t1, rows, perturbation: Perturbation | None, rtol, atol) -> Attempt:
        after = None if perturbation is None else perturbation.after_start
        before = None if perturbation is None else perturbation.before_end
        t_start = nudged(t, t1, after)
        f0 = evaluate(func, t_start, y)
        same_step = (dt - rows["dt"]).abs() <= _SAME_STEP * dt.abs()
        history = torch.cat([f0[:, None], rows["history"][:, :-1]], 1)
        length = (torch.where(same_step, rows["length"], 0) + 1).clamp(max=self.history)
        nfe = torch.ones_like(length)
        dy = torch.zeros_like(y)

        starting = length < _START_ORDER
        start_rows, adams_rows = starting.nonzero().squeeze(1), (~starting).nonzero().squeeze(1)
        if start_rows.numel():
            pick = _picker(start_rows)
            *_, y1_start = explicit_stages(
                func, RK4_38_TABLEAU, pick(t), pick(y), pick(dt), pick(t1), pick(f0), pick(t_start), pick(before)
            )
            dy = dy.index_put((start_rows,), y1_start - pick(y))
            nfe = nfe.index_put((start_rows,), nfe[start_rows] + RK4_38_TABLEAU.stages - 1)
        if adams_rows.numel():
            pick = _picker(adams_rows)
            order, past, h = length[adams_rows], history[adams_rows], rows_of(dt[adams_rows], y[adams_rows])
            bashforth = self._bashforth.to(y.dtype).to(y.device)[order]  # [R, history]
            prediction = h * _dot(bashforth, past)
            if self.implicit:
                prediction, iterations, order = self._correct(
                    func,
                    pick(y),
                    h,
                    prediction,
                    past,
                    order,
                    nudged(pick(t1), pick(t), pick(before)),
                    pick(rtol),
                    pick(atol),
                )
                nfe = nfe.index_put((adams_rows,), nfe[adams_rows] + iterations)
                length = length.index_put((adams_rows,), order)
            dy = dy.index_put((adams_rows,), prediction)
        return Attempt(
            y1=y + dy,
            error=None,
            nfe=nfe,
            stage_t=[t_start],
            stage_y=[y],
            ks=[f0],
            f0=f0,
            rows={"history": history, "length": length, "dt": dt},
        )

    def _correct(self, func, y, h, prediction, past, order, t1, rtol, atol):
        """Adams–Moulton fixed-point iterations on the rows still unconverged; rows that do not
        converge drop their oldest past derivative."""
        moulton = self._moulton.to(y.dtype).to(y.device)[order]  # [R, history + 1]
        implicit_weight = rows_of(moulton[:, 0], y)
        known = h * _dot(moulton[:, 1:], past)
        dy = prediction
        iterations = torch.zeros_like(order)
        active = torch.ones_like(order, dtype=torch.bool)
        for _ in range(self.max_iters):
            index = active.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            f = evaluate(func, t1[index], y[index] + dy[index])
            corrected = h[index] * implicit_weight[index] * f + known[index]
            scale = torch.maximum(corrected.abs(), dy[index].abs()) * rows_of(rtol[index], corrected)
            change = (corrected - dy[index]).abs() / (scale + rows_of(atol[index], corrected))
            converged = per_row(change).amax(1) < 1
            dy = dy.index_put((index,), corrected)
            iterations = iterations.index_put((index,), iterations[index] + 1)
            active = active.index_put((index,), ~converged)
        if bool(active.any()):
            warnings.warn(f"{self.name}: the corrector did not converge in {self.max_iters} iterations", stacklevel=4)
            order = torch.where(active, order - 1, order)
        return dy, iterations, order


def _dot(weights: Tensor, values: Tensor) -> Tensor:
    """``sum_i weights[r, i] * values[r, i]`` per row ``r`` (``values`` is ``[R, H, *S]``)."""
    return (weights.view(*weights.shape, *([1] * (values.dim() - 2))) * values).sum(1)


def _picker(index: Tensor):
    def pick(value):
        return value.index_select(0, index) if isinstance(value, Tensor) else value

    return pick
