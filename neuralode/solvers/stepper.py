"""One attempted step for every sample of a batch, each with its own t, dt and tolerance.

:class:`Stepper` is the single mechanism under ``solve_ivp``, ``odeint``, the adjoint and the
server's engine: ``init`` prepares rows, ``step`` advances all rows by one attempted step. It
composes a :class:`~.solver.Solver` (the method) with a
:class:`~.controller.StepSizeController` and owns what is common to every method: landing on
stops, the NFE and step limits, statuses and callbacks. A step makes no host–device
synchronisation unless discontinuities are declared; callers check ``state.status`` when they
choose to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from ..precision import full_precision
from .controller import ConstantController, Norm, PIController, StepSizeController
from .solver import Func, Perturbation, Solver, evaluate, per_row, rows_of, scaled_error_norm
from .state import SolverState, StepRecord
from .status import Status

__all__ = ["DEFAULT_MAX_STEPS", "Func", "Norm", "StepCallbacks", "Stepper", "rms_norm"]

_NO_LIMIT = torch.iinfo(torch.int64).max
DEFAULT_MAX_STEPS = 100_000
"""Attempts per sample unless told otherwise: a finite default turns a hopeless solve (a NaN
wall next to the trajectory, say) into a MAX_STEPS status instead of a hang."""
_LANDING_SLACK = 1.01


def rms_norm(scaled: Tensor) -> Tensor:
    """Root mean square over each sample's own elements (one pass over them)."""
    rows = per_row(scaled)
    norm, root = torch.linalg.vector_norm(rows, dim=1), math.sqrt(rows.shape[1])
    return norm.div(root) if norm.requires_grad else norm.div_(root)  # in place unless autograd needs it


@dataclass(frozen=True)
class StepCallbacks:
    """Observers of every attempted step, per sample: ``step(t, y, dt)`` before it and
    ``decided(t, y, dt, accepted)`` after the controller's decision (``accepted`` ``[B]``)."""

    step: Callable[[Tensor, Tensor, Tensor], None] | None = None
    decided: Callable[[Tensor, Tensor, Tensor, Tensor], None] | None = None


@dataclass(frozen=True)
class Stepper:
    """A solve configuration shared by all rows: the method, step control and limits.

    ``controller`` defaults to :class:`PIController` for methods with an error estimate and
    to :class:`ConstantController` (straight from stop to stop) for the others; a
    ``ConstantController(step_size)`` gives any method fixed steps. ``perturb`` evaluates each
    step's first stage just after its start and its stages at the end just before it (for
    ``func`` discontinuous at the steps' ends). ``extra_step_cost`` reserves evaluations per
    step that the caller makes (an interpolant's), so ``max_nfe`` stays a hard cap.
    """

    method: Solver
    controller: StepSizeController | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    norm: Norm = rms_norm
    perturb: bool = False
    callbacks: StepCallbacks | None = None
    extra_step_cost: int = 0
    _k: int = field(init=False, repr=False, compare=False)  # the controller's error exponent

    @property
    def control(self) -> StepSizeController:
        """``controller``, or the default that construction put in its place: never None."""
        return cast(StepSizeController, self.controller)

    def __post_init__(self) -> None:
        if self.controller is None:
            default = PIController() if self.method.adaptive else ConstantController()
            object.__setattr__(self, "controller", default)
        if self.control.adaptive and not self.method.adaptive:
            raise ValueError(f"{self.method.name} has no error estimate: it needs fixed steps (step_size)")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        object.__setattr__(self, "_k", self.method.error_exponent if self.method.adaptive else 1)

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
        jump: Tensor | None = None,
    ) -> SolverState:
        """Rows ready to step: evaluates f(t0, y0) where the method or the first-step heuristic
        needs it and picks each sample's first step. A row whose ``max_nfe`` cannot pay for
        these evaluations and its first step is not started (status MAX_NFE, NFE 0). Inputs are
        per-sample tensors already validated by the caller; func's output is checked here, on
        its first call."""
        batch = y0.shape[0]
        device = y0.device
        sample_id = sample_id if sample_id is not None else torch.arange(batch, device=device)
        budget = max_nfe if max_nfe is not None else torch.full((batch,), _NO_LIMIT, dtype=torch.int64, device=device)
        needs_f0 = self.method.needs_f0 or self.control.needs_f0(first_step)
        if max_nfe is not None:
            first_cost = self.start_cost(first_step) + self._step_cost(None, None)
            affordable = budget >= first_cost
            if not bool(affordable.all()):
                return self._init_affordable(
                    func, y0, t0, t_stop, t_end, rtol, atol, first_step, budget, sample_id, jump, affordable
                )

        direction = torch.sign(t_end - t0)
        nfe = torch.zeros(batch, dtype=torch.int64, device=device)
        f0 = None
        precise = full_precision(func)  # f0 and the first-step rule's difference: no bf16 rounding
        if needs_f0:
            f0 = evaluate(precise, t0, y0)
            nfe += 1
        dt, controller_rows = self.control.init(
            self.method, precise, t0, y0, f0, direction, rtol, atol, self.norm, first_step
        )
        nfe += self.control.init_cost(first_step)
        status = torch.full((batch,), int(Status.RUNNING), dtype=torch.int64, device=device)
        if f0 is not None:
            status = torch.where(torch.isfinite(per_row(f0)).all(1), status, int(Status.NON_FINITE))
        state = SolverState(
            t=t0,
            y=y0,
            dt=dt.detach(),
            t_stop=t_stop,
            t_end=t_end,
            rtol=rtol,
            atol=atol,
            nfe=nfe,
            steps=torch.zeros_like(nfe),
            rejected=torch.zeros_like(nfe),
            max_nfe=budget,
            status=status,
            sample_id=sample_id,
            solver=self.method.init(func, t0, y0, f0),
            controller=controller_rows,
            jump=jump,
            after_jump=None if jump is None else torch.zeros_like(jump),
        )
        return self._apply_limits(state)

    def _init_affordable(
        self, func, y0, t0, t_stop, t_end, rtol, atol, first_step, budget, sample_id, jump, affordable
    ):
        """Start only the rows whose budget pays for the initial evaluations and a first step;
        the others get a state that records they never started."""
        started, unstarted = affordable.nonzero().squeeze(1), (~affordable).nonzero().squeeze(1)

        def pick(value, index):
            return None if value is None else value.index_select(0, index)

        parts, order = [], []
        if started.numel():
            parts.append(
                self.init(
                    func,
                    *(pick(v, started) for v in (y0, t0, t_stop, t_end, rtol, atol)),
                    first_step=pick(first_step, started),
                    max_nfe=budget[started],
                    sample_id=sample_id[started],
                    jump=pick(jump, started),
                )
            )
            order.append(started)
        y0_, t0_ = y0[unstarted], t0[unstarted]
        nothing = torch.zeros(unstarted.numel(), dtype=torch.int64, device=y0.device)
        f0 = torch.zeros_like(y0_) if self.method.needs_f0 else None
        # A first step given to the controller makes it evaluate nothing: only its rows are wanted.
        direction = torch.sign(t_end[unstarted] - t0_)
        _, controller_rows = self.control.init(
            self.method,
            func,
            t0_,
            y0_,
            f0,
            direction,
            rtol[unstarted],
            atol[unstarted],
            self.norm,
            torch.ones_like(t0_),
        )
        parts.append(
            SolverState(
                t=t0_,
                y=y0_,
                dt=torch.zeros_like(t0_),
                t_stop=t_stop[unstarted],
                t_end=t_end[unstarted],
                rtol=rtol[unstarted],
                atol=atol[unstarted],
                nfe=nothing,
                steps=nothing.clone(),
                rejected=nothing.clone(),
                max_nfe=budget[unstarted],
                status=torch.full_like(nothing, int(Status.MAX_NFE)),
                sample_id=sample_id[unstarted],
                solver=self.method.init(func, t0_, y0_, f0),
                controller=controller_rows,
                jump=pick(jump, unstarted),
                after_jump=None if jump is None else torch.zeros_like(jump[unstarted]),
            )
        )
        order.append(unstarted)
        return SolverState.cat(parts).select(torch.cat(order).argsort())

    # ----------------------------------------------------------------------------------------
    def step(self, func: Func, state: SolverState) -> tuple[SolverState, StepRecord]:
        """Attempt one step on every row; accepted rows advance, rejected rows retry with a
        smaller dt next time. Rows that are not RUNNING must not be passed in."""
        t, y = state.t, state.y
        remaining = state.t_stop - t
        # Stretch a step by up to 1% to land on the stop rather than leave a sliver (as in
        # Hairer's DOPRI5); this also absorbs rounding in fixed steps that add up to a stop.
        lands = state.dt.abs() * _LANDING_SLACK >= remaining.abs()
        dt = torch.where(lands, remaining, state.dt)
        t1 = torch.where(lands, state.t_stop, t + dt)
        perturbation = None
        if self.perturb:
            perturbation = Perturbation(after_start=True, before_end=True)
        elif state.jump is not None:
            after_jump = cast(Tensor, state.after_jump)  # set wherever jump is
            perturbation = Perturbation(after_start=after_jump, before_end=lands & state.jump)
        callbacks = self.callbacks
        if callbacks is not None and callbacks.step is not None:
            callbacks.step(t, y, dt)

        attempt = self.method.step(func, t, y, dt, t1, state.solver, perturbation, state.rtol, state.atol)

        with torch.no_grad():
            error = self._error_norm(y, attempt, dt, state) if self.control.adaptive else None
            decision = self.control.adapt(error, attempt.y1, t, dt, state.dt, state.controller, self._k)
        accepted = decision.accept
        error_finite = torch.isfinite(error) if error is not None else accepted
        if callbacks is not None and callbacks.decided is not None:
            callbacks.decided(t, y, dt, accepted)

        accepted_rows = rows_of(accepted, y)
        new_state = SolverState(
            t=torch.where(accepted, t1, t),
            y=torch.where(accepted_rows, attempt.y1, y),
            dt=decision.dt,
            t_stop=state.t_stop,
            t_end=state.t_end,
            rtol=state.rtol,
            atol=state.atol,
            nfe=state.nfe + attempt.nfe,
            steps=state.steps + accepted,
            rejected=state.rejected + ~accepted,
            max_nfe=state.max_nfe,
            status=state.status,
            sample_id=state.sample_id,
            solver={
                key: torch.where(rows_of(accepted, old), attempt.rows[key], old) for key, old in state.solver.items()
            },
            controller=decision.rows,
            jump=state.jump,
            after_jump=None
            if state.jump is None
            else torch.where(accepted, lands & state.jump, cast(Tensor, state.after_jump)),
        )
        record = StepRecord(
            t=t,
            y=y,
            dt=dt,
            t1=t1,
            accepted=accepted,
            error_finite=error_finite,
            stage_t=attempt.stage_t,
            stage_y=attempt.stage_y,
            ks=attempt.ks,
            f0=attempt.f0,
            y1=attempt.y1,
        )
        # Every row was RUNNING; the last reason that applies wins.
        status = self._limited(new_state)
        failure = torch.where(error_finite, int(Status.STEP_SIZE_UNDERFLOW), int(Status.NON_FINITE))
        status = torch.where(decision.stuck, failure, status)
        status = torch.where(accepted & lands & (state.t_stop == state.t_end), int(Status.SUCCESS), status)
        new_state.status = status
        return new_state, record

    def _error_norm(self, y: Tensor, attempt, dt: Tensor, state: SolverState) -> Tensor:
        return scaled_error_norm(y, attempt.y1, attempt.error, dt, state.rtol, state.atol, self.norm)

    def start_cost(self, first_step: Tensor | float | None = None) -> int:
        """Evaluations :meth:`init` makes per row: ``f(t0, y0)`` where needed and the
        controller's first-step heuristic. Only whether ``first_step`` is given counts (a
        tensor of rows' first steps, or one for all)."""
        needs_f0 = self.method.needs_f0 or self.control.needs_f0(first_step)
        return int(needs_f0) + self.control.init_cost(first_step)

    def step_cost(self) -> int:
        """The most evaluations one step of a fresh row can make (without discontinuities)."""
        return int(self._step_cost(None, None))

    def _step_cost(self, solver_rows: dict[str, Tensor] | None, after_jump: Tensor | None) -> int | Tensor:
        """The most evaluations the next step can make, including a re-evaluated first stage
        of an FSAL method next to a discontinuity."""
        cost = self.method.step_cost(solver_rows) + self.extra_step_cost
        if self.method.fsal and self.perturb:
            return cost + 1
        if self.method.fsal and after_jump is not None:
            return cost + after_jump.long()
        return cost

    def _apply_limits(self, state: SolverState) -> SolverState:
        """Stop running rows that may not take another step, with the reason why."""
        state.status = torch.where(state.status == int(Status.RUNNING), self._limited(state), state.status)
        return state

    def _limited(self, state: SolverState) -> Tensor:
        """RUNNING, or the limit that stops the row before its next step (MAX_STEPS first)."""
        cost = self._step_cost(state.solver, state.after_jump)
        status = torch.where(state.nfe + cost > state.max_nfe, int(Status.MAX_NFE), int(Status.RUNNING))
        return torch.where(state.steps + state.rejected >= self.max_steps, int(Status.MAX_STEPS), status)
