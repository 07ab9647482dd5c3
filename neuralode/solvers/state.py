"""The per-sample solver state.

Every field is a tensor whose first dimension is the sample, so a batch of running samples is
just rows: finished samples leave by :meth:`SolverState.select` and new ones join by
:meth:`SolverState.cat`, between any two steps. That includes the method's own state (an FSAL
derivative, a multistep history) and the step-size controller's (the last error), so a row
that leaves and joins again resumes bit-identically. That is all the server's continuous
batching needs from the core.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class SolverState:
    t: Tensor  # [B] current time of each sample
    y: Tensor  # [B, *S] current state
    dt: Tensor  # [B] signed step to try next (±inf: step straight to t_stop)
    t_stop: Tensor  # [B] the next time a step must land on exactly (a stop or t_end)
    t_end: Tensor  # [B]
    rtol: Tensor  # [B]
    atol: Tensor  # [B]
    nfe: Tensor  # [B] int64 function evaluations so far
    steps: Tensor  # [B] int64 accepted steps
    rejected: Tensor  # [B] int64 rejected steps
    max_nfe: Tensor  # [B] int64 budget: no step starts that could exceed it
    status: Tensor  # [B] int64, a neuralode.solvers.status.Status
    sample_id: Tensor  # [B] int64, the caller's name for each row; carried along untouched
    solver: dict[str, Tensor]  # the method's rows, e.g. "f0" (FSAL), "history" (multistep)
    controller: dict[str, Tensor]  # the step-size controller's rows, e.g. "prev_error"
    jump: Tensor | None = None  # [B] bool: f is discontinuous at t_stop (None: nowhere)
    after_jump: Tensor | None = None  # [B] bool: the row sits on a discontinuity it landed on

    @property
    def batch_size(self) -> int:
        return self.t.shape[0]

    def select(self, index: Tensor) -> SolverState:
        """The rows ``index`` (a 1-D long tensor), in that order."""

        def rows(value):
            if isinstance(value, dict):
                return {key: v.index_select(0, index) for key, v in value.items()}
            return None if value is None else value.index_select(0, index)

        return SolverState(**{f.name: rows(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(states: list[SolverState]) -> SolverState:
        """Stack the rows of several states of the same solve configuration."""
        if len(states) == 1:
            return states[0]
        merged: dict[str, Any] = {}
        for f in fields(SolverState):
            values = [getattr(s, f.name) for s in states]
            if isinstance(values[0], dict):
                keys = set(values[0])
                if any(set(v) != keys for v in values):
                    raise ValueError(f"cannot merge states whose {f.name} rows differ in kind")
                merged[f.name] = {key: torch.cat([v[key] for v in values], 0) for key in values[0]}
            elif any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError(f"cannot merge states that differ in whether {f.name} is set")
                merged[f.name] = None
            else:
                merged[f.name] = torch.cat(values, 0)
        return SolverState(**merged)


@dataclass(frozen=True)
class StepRecord:
    """What one attempted step did, for observers: dense output, events, the adjoint's
    parameter quadrature, callbacks.

    The step started from ``(t, y)``; ``stage_t[i]`` and ``stage_y[i]`` are the inputs at which
    stage ``i`` was evaluated (for explicit RK methods stage 0 is the start), ``ks[i]`` its
    value, ``f0`` the derivative at the start, ``y1`` the proposed new state at ``t1``,
    ``dt`` the signed step tried, ``accepted`` the per-sample decision and ``error_finite`` whether its
    error estimate (or, without one, the new state) was finite. Rows are those of the state the
    step was given.
    """

    t: Tensor
    y: Tensor
    dt: Tensor
    t1: Tensor
    accepted: Tensor
    error_finite: Tensor
    stage_t: list[Tensor]
    stage_y: list[Tensor]
    ks: list[Tensor]
    f0: Tensor
    y1: Tensor

    def select(self, index: Tensor) -> StepRecord:
        """The rows ``index``."""

        def rows(value):
            return (
                [v.index_select(0, index) for v in value] if isinstance(value, list) else value.index_select(0, index)
            )

        return StepRecord(**{f.name: rows(getattr(self, f.name)) for f in fields(self)})
