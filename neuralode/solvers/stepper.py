"""One explicit RK step for every sample of a batch, each with its own t, dt and tolerance.

:class:`Stepper` is the single mechanism under ``solve_ivp``, ``odeint``, the adjoint and the
server's engine: ``init`` prepares rows, ``step`` advances all rows by one attempted step. A
step makes no host–device synchronisation; callers check ``state.status`` when they choose to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .controller import PIController
from .state import SolverState, StepRecord
from .status import Status
from .tableau import Method, get_method

Func = Callable[[Tensor, Tensor], Tensor]
"""Per-sample dynamics: ``func(t, y)`` with ``t`` of shape ``[B]`` and ``y`` of ``[B, *S]``."""

Norm = Callable[[Tensor], Tensor]
"""Maps scaled errors ``[B, *S]`` to one norm per sample ``[B]``."""

_NO_LIMIT = torch.iinfo(torch.int64).max
DEFAULT_MAX_STEPS = 100_000
"""Attempts per sample unless told otherwise: a finite default turns a hopeless solve (a NaN
wall next to the trajectory, say) into a MAX_STEPS status instead of a hang."""
_LANDING_SLACK = 1.01


def rms_norm(scaled: Tensor) -> Tensor:
    """Root mean square over each sample's own elements."""
    return scaled.square().flatten(1).mean(1).sqrt()


def _rows(v: Tensor, like: Tensor) -> Tensor:
    """View a per-sample ``[B]`` tensor so it broadcasts against ``like`` (``[B, *S]``)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _weighted_sum(coefficients: Sequence[float], ks: Sequence[Tensor]) -> Tensor | None:
    """``sum_j coefficients[j] * ks[j]`` skipping zero coefficients, in few memory passes."""
    total = None
    for coefficient, k in zip(coefficients, ks):
        if coefficient == 0.0:
            continue
        # In place on a tensor this function made: safe for autograd, one memory pass less.
        total = k * coefficient if total is None else total.add_(k, alpha=coefficient)
    return total


def _advance(y: Tensor, dt_rows: Tensor, coefficients: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    increment = _weighted_sum(coefficients, ks)
    return y if increment is None else torch.addcmul(y, dt_rows, increment)


@dataclass(frozen=True)
class Stepper:
    """A solve configuration shared by all rows: the method, step control and limits.

    ``step_size`` switches to fixed steps (any method, adaptive ones included); with
    ``step_size=None`` a fixed-step method steps straight from one output time to the next.
    """

    method: Method
    controller: PIController = field(default_factory=PIController)
    step_size: float | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    norm: Norm = rms_norm

    @staticmethod
    def create(method: str | Method = "dopri5", **kwargs) -> Stepper:
        return Stepper(get_method(method) if isinstance(method, str) else method, **kwargs)

    @property
    def adaptive(self) -> bool:
        return self.method.adaptive and self.step_size is None

    @property
    def evaluations_per_step(self) -> int:
        return self.method.tableau.stages - (1 if self.method.tableau.fsal else 0)

    # ----------------------------------------------------------------------------------------
    def init(
        self,
        func: Func,
        y0: Tensor,
        t0: Tensor,
        t_stop: Tensor,
        t_end: Tensor,
        rtol: Tensor,
        atol: Tensor,
        *,
        first_step: Tensor | None = None,
        max_nfe: Tensor | None = None,
        sample_id: Tensor | None = None,
    ) -> SolverState:
        """Rows ready to step: evaluates f(t0, y0) (FSAL or initial-step heuristic) and picks
        each sample's first step. Inputs are per-sample tensors already validated by the
        caller; func's output shape is checked here, on its first call."""
        batch = y0.shape[0]
        direction = torch.sign(t_end - t0)
        nfe = torch.zeros(batch, dtype=torch.int64, device=y0.device)
        needs_f0 = self.method.tableau.fsal or (self.adaptive and first_step is None)
        f0 = None
        if needs_f0:
            f0 = _evaluate(func, t0, y0)
            nfe += 1
        if self.adaptive:
            if first_step is not None:
                dt = direction * first_step
            else:
                dt = self._initial_step(func, t0, y0, f0, direction, rtol, atol)
                nfe += 1
        elif self.step_size is not None:
            dt = direction * self.step_size
        else:
            dt = direction * torch.inf
        status = torch.full((batch,), int(Status.RUNNING), dtype=torch.int64, device=y0.device)
        finite = torch.ones(batch, dtype=torch.bool, device=y0.device)
        if f0 is not None:
            finite = torch.isfinite(f0).flatten(1).all(1)
            status = torch.where(finite, status, int(Status.NON_FINITE))
        state = SolverState(
            t=t0,
            y=y0,
            dt=dt.detach(),
            t_stop=t_stop,
            t_end=t_end,
            rtol=rtol,
            atol=atol,
            k1=f0 if self.method.tableau.fsal else None,
            prev_error=torch.ones_like(t0),
            error_finite=finite,
            nfe=nfe,
            steps=torch.zeros_like(nfe),
            rejected=torch.zeros_like(nfe),
            max_nfe=max_nfe if max_nfe is not None else torch.full_like(nfe, _NO_LIMIT),
            status=status,
            sample_id=sample_id if sample_id is not None else torch.arange(batch, device=y0.device),
        )
        return self._apply_limits(state)

    @torch.no_grad()
    def _initial_step(
        self, func: Func, t0: Tensor, y0: Tensor, f0: Tensor, direction: Tensor, rtol: Tensor, atol: Tensor
    ) -> Tensor:
        """Hairer, Nørsett & Wanner I, II.4: a first step whose local error is about the
        tolerance, judged from the sizes of y0, f0 and a finite-difference of f."""
        scale = _rows(atol, y0) + y0.abs() * _rows(rtol, y0)
        d0 = self.norm(y0 / scale)
        d1 = self.norm(f0 / scale)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
        y1 = torch.addcmul(y0, _rows(direction * h0, y0), f0)
        f1 = _evaluate(func, t0 + direction * h0, y1)
        d2 = self.norm((f1 - f0) / scale) / h0
        d12 = torch.maximum(d1, d2)
        h1 = torch.where(
            d12 <= 1e-15,
            torch.clamp_min(h0 * 1e-3, 1e-6),
            (0.01 / d12.clamp_min(1e-30)).pow(1.0 / self.method.order),
        )
        h = torch.minimum(100 * h0, h1)
        return direction * torch.where(torch.isfinite(h), h, h0)

    # ----------------------------------------------------------------------------------------
    def step(self, func: Func, state: SolverState) -> tuple[SolverState, StepRecord]:
        """Attempt one step on every row; accepted rows advance, rejected rows retry with a
        smaller dt next time. Rows that are not RUNNING must not be passed in."""
        tableau = self.method.tableau
        t, y = state.t, state.y
        remaining = state.t_stop - t
        # Stretch a step by up to 1% to land on the stop rather than leave a sliver (as in
        # Hairer's DOPRI5); this also absorbs rounding in fixed steps that add up to a stop.
        lands = state.dt.abs() * _LANDING_SLACK >= remaining.abs()
        dt = torch.where(lands, remaining, state.dt)
        dt_rows = _rows(dt, y)

        stage_t = [t]
        stage_y = [y]
        ks = [state.k1 if tableau.fsal else _evaluate(func, t, y)]
        for i in range(1, tableau.stages):
            t_i = t + tableau.c[i] * dt
            y_i = _advance(y, dt_rows, tableau.a[i - 1], ks)
            stage_t.append(t_i)
            stage_y.append(y_i)
            ks.append(_evaluate(func, t_i, y_i))
        y_new = stage_y[-1] if tableau.fsal else _advance(y, dt_rows, tableau.b, ks)
        t_new = torch.where(lands, state.t_stop, t + dt)

        with torch.no_grad():
            if self.adaptive:
                error = self._error_norm(y, y_new, dt, ks, state)
                accepted, dt_next, prev_error = self.controller.decide(
                    error, state.prev_error, dt, self.method.error_exponent_order
                )
                error_finite = torch.isfinite(error)
            else:
                accepted = torch.isfinite(y_new).flatten(1).all(1)
                error_finite = accepted
                dt_next, prev_error = state.dt, state.prev_error

        accepted_rows = _rows(accepted, y)
        succeeded = accepted & lands & (state.t_stop == state.t_end)
        status = torch.where(succeeded, int(Status.SUCCESS), state.status)
        if not self.adaptive:
            status = torch.where(accepted, status, int(Status.NON_FINITE))
        new_state = SolverState(
            t=torch.where(accepted, t_new, t),
            y=torch.where(accepted_rows, y_new, y),
            dt=dt_next,
            t_stop=state.t_stop,
            t_end=state.t_end,
            rtol=state.rtol,
            atol=state.atol,
            k1=torch.where(accepted_rows, ks[-1], state.k1) if tableau.fsal else None,
            prev_error=prev_error,
            error_finite=error_finite,
            nfe=state.nfe + self.evaluations_per_step,
            steps=state.steps + accepted,
            rejected=state.rejected + ~accepted,
            max_nfe=state.max_nfe,
            status=status,
            sample_id=state.sample_id,
        )
        record = StepRecord(
            t=t, dt=dt, accepted=accepted, error_finite=error_finite, stage_t=stage_t, stage_y=stage_y
        )
        return self._apply_limits(new_state), record

    def _error_norm(self, y: Tensor, y_new: Tensor, dt: Tensor, ks: list[Tensor], state: SolverState) -> Tensor:
        estimate = _weighted_sum(self.method.tableau.b_err, ks)
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(_rows(state.rtol, y)).add_(_rows(state.atol, y))
        return dt.abs() * self.norm(estimate.div_(scale))

    def _apply_limits(self, state: SolverState) -> SolverState:
        """Stop running rows that may not take another step, with the reason why."""
        running = state.status == int(Status.RUNNING)
        status = state.status
        out_of_steps = running & (state.steps + state.rejected >= self.max_steps)
        status = torch.where(out_of_steps, int(Status.MAX_STEPS), status)
        out_of_nfe = running & (state.nfe + self.evaluations_per_step > state.max_nfe)
        status = torch.where(out_of_nfe & ~out_of_steps, int(Status.MAX_NFE), status)
        if self.adaptive:
            eps = torch.finfo(state.y.dtype).eps
            min_dt = 10 * eps * torch.maximum(state.t.abs(), state.t_end.abs())
            too_small = running & ~out_of_steps & ~out_of_nfe & (state.dt.abs() < min_dt)
            reason = torch.where(state.error_finite, int(Status.STEP_SIZE_UNDERFLOW), int(Status.NON_FINITE))
            status = torch.where(too_small, reason, status)
        state.status = status
        return state


def _evaluate(func: Func, t: Tensor, y: Tensor) -> Tensor:
    out = func(t, y)
    if not isinstance(out, Tensor):
        raise TypeError(f"func must return a tensor, got {type(out).__name__}")
    if out.shape != y.shape:
        raise ValueError(f"func returned shape {tuple(out.shape)}, but the state has shape {tuple(y.shape)}")
    if out.dtype != y.dtype:
        raise ValueError(f"func returned dtype {out.dtype}, but the state has dtype {y.dtype}")
    return out
