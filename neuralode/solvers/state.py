"""The per-sample solver state.

Every field is a tensor whose first dimension is the sample, so a batch of running samples is
just rows: finished samples leave by :meth:`SolverState.select` and new ones join by
:meth:`SolverState.cat`, between any two steps. That is all the server's continuous batching
needs from the core.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class SolverState:
    t: Tensor  # [B] current time of each sample
    y: Tensor  # [B, *S] current state
    dt: Tensor  # [B] signed step to try next (±inf: step straight to t_stop)
    t_stop: Tensor  # [B] the next time a step must land on exactly (an output time or t_end)
    t_end: Tensor  # [B]
    rtol: Tensor  # [B]
    atol: Tensor  # [B]
    k1: Tensor | None  # [B, *S] f(t, y), carried for FSAL methods
    prev_error: Tensor  # [B] error norm of the last accepted step (PI control)
    error_finite: Tensor  # [B] bool: the last error estimate was finite
    nfe: Tensor  # [B] int64 function evaluations so far
    steps: Tensor  # [B] int64 accepted steps
    rejected: Tensor  # [B] int64 rejected steps
    max_nfe: Tensor  # [B] int64 budget: no step starts that would exceed it
    status: Tensor  # [B] int64, a neuralode.solvers.status.Status
    sample_id: Tensor  # [B] int64, the caller's name for each row; carried along untouched

    @property
    def batch_size(self) -> int:
        return self.t.shape[0]

    def select(self, index: Tensor) -> SolverState:
        """The rows ``index`` (a 1-D long tensor), in that order."""
        return SolverState(
            **{
                f.name: None if (v := getattr(self, f.name)) is None else v.index_select(0, index)
                for f in fields(self)
            }
        )

    @staticmethod
    def cat(states: list[SolverState]) -> SolverState:
        """Stack the rows of several states of the same solve configuration."""
        if len(states) == 1:
            return states[0]
        merged = {}
        for f in fields(SolverState):
            values = [getattr(s, f.name) for s in states]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError(f"cannot merge states that differ in whether {f.name} is set")
                merged[f.name] = None
            else:
                merged[f.name] = torch.cat(values, 0)
        return SolverState(**merged)


@dataclass(frozen=True)
class StepRecord:
    """What one attempted step did, for observers such as the adjoint's parameter quadrature.

    ``stage_t[i]`` and ``stage_y[i]`` are the inputs at which stage ``i`` was evaluated (stage 0
    is the step's start point), ``dt`` the signed step tried, ``accepted`` the per-sample
    decision and ``error_finite`` whether its error estimate was finite (when it is, all of
    the row's stages were). Rows are those of the state the step was given.
    """

    t: Tensor
    dt: Tensor
    accepted: Tensor
    error_finite: Tensor
    stage_t: list[Tensor]
    stage_y: list[Tensor]
