"""Terminal events, per sample, and the gradient of the event time.

A row stops at the first time its event function changes sign (from its sign at t0), found
by bisection on the dense output of the step that crossed it. The event time depends on the
solution, and so on y0 and the parameters: :func:`event_gradient` gives it a gradient by the
implicit function theorem, as torchdiffeq's ``odeint_event`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
from torch import Tensor

from .solver import Func, per_row, rows_of
from .state import SolverState, StepRecord
from .status import Status

EventFn = Callable[[Tensor, Tensor], Tensor]
"""Per-sample event function: ``event_fn(t, y)`` with ``t`` ``[B]`` and ``y`` ``[B, *S]`` gives
``[B]`` (or ``[B, E]`` for several, of which the first to change sign counts)."""

_MAX_BISECTIONS = 200


class DenseOutput(Protocol):
    def at(self, state: SolverState, rows: Tensor, t: Tensor) -> Tensor:
        """The state of rows ``rows`` at times ``t`` within the step just taken."""


class EventTracker:
    """Per-sample terminal events: a row stops at the first time its event function changes
    sign from its value at t0 (with several, at the first of them to change sign)."""

    def __init__(self, event_fn: EventFn, batch: int, device: torch.device) -> None:
        self.event_fn = event_fn
        self.sign: Tensor | None = None  # [N, E] initial signs, by sample id
        self.hit = torch.zeros(batch, dtype=torch.bool, device=device)

    def _values(self, t: Tensor, y: Tensor) -> Tensor:
        values = self.event_fn(t, y)
        if not isinstance(values, Tensor) or values.shape[0] != y.shape[0] or values.dim() > 2:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"event_fn must return a tensor of shape [{y.shape[0]}] or [{y.shape[0]}, E], got {shape}")
        return values.reshape(y.shape[0], -1)

    def combined(self, t: Tensor, y: Tensor, ids: Tensor) -> Tensor:
        """Positive until the first event function changes sign, then <= 0."""
        return (self._values(t, y) * cast(Tensor, self.sign)[ids]).amin(1)  # set by start

    @torch.no_grad()
    def start(self, state: SolverState) -> None:
        values = self._values(state.t, state.y)
        self.sign = torch.sign(values).new_zeros((self.hit.shape[0], values.shape[1]))
        self.sign[state.sample_id] = torch.sign(values)
        at_start = self.combined(state.t, state.y, state.sample_id) == 0
        state.status = torch.where(at_start, int(Status.SUCCESS), state.status)
        self.hit[state.sample_id] = at_start

    def detect(self, state: SolverState, record: StepRecord, dense: DenseOutput) -> None:
        """Rows whose accepted step crossed their event end there: t and y become the event's."""
        ids = state.sample_id
        with torch.no_grad():
            crossed = record.accepted & (self.combined(state.t, state.y, ids) <= 0)
            rows = crossed.nonzero().squeeze(1)
            if rows.numel() == 0:
                return
            # Bisection on the step's dense output, down to the time resolution.
            t, dt = record.t[rows], record.dt[rows]
            lo, hi = torch.zeros_like(t), torch.ones_like(t)
            resolution = 2 * torch.finfo(t.dtype).eps * torch.maximum(t.abs(), (t + dt).abs()).clamp_min(1.0)
            for _ in range(_MAX_BISECTIONS):
                if not bool(((hi - lo) * dt.abs() > resolution).any()):
                    break
                mid = (lo + hi) / 2
                t_mid = t + mid * dt
                positive = self.combined(t_mid, dense.at(state, rows, t_mid), ids[rows]) > 0
                lo, hi = torch.where(positive, mid, lo), torch.where(positive, hi, mid)
            t_event = t + (lo + hi) / 2 * dt
        y_event = dense.at(state, rows, t_event)
        state.t = state.t.index_put((rows,), t_event)
        state.y = state.y.index_put((rows,), y_event)
        state.status = state.status.index_put((rows,), torch.full_like(rows, int(Status.SUCCESS)))
        self.hit[ids[rows]] = True


def event_gradient(
    func: Func, events: EventTracker, t_event: Tensor, y_event: Tensor, ids: Tensor
) -> tuple[Tensor, Tensor]:
    """``(t_event, y_event)`` with the event time made differentiable through ``y_event``.

    On rows that hit their event ``g(t*, y(t*)) = 0`` defines ``t*``, so a cotangent ``L_t`` of
    ``t*`` (and the share ``L_y · f`` by which ``y(t*)`` moves with ``t*``) reaches the state
    as ``-(L_t + L_y · f) / (g_t + g_y · f) · g_y``. Other rows pass through.
    """
    return _EventGradient.apply(func, events, ids, t_event, y_event)


class _EventGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, events, ids, t_event, y_event):
        ctx.func, ctx.events = func, events
        ctx.save_for_backward(ids, t_event, y_event)
        return t_event.detach().clone(), y_event.detach().clone()

    @staticmethod
    def backward(ctx, grad_t, grad_y):
        ids, t_event, y_event = ctx.saved_tensors
        hit = ctx.events.hit[ids]
        with torch.enable_grad():
            t = t_event.detach().requires_grad_(True)
            y = y_event.detach().requires_grad_(True)
            g = ctx.events.combined(t, y, ids)
            g_t, g_y = torch.autograd.grad(g.sum(), (t, y), allow_unused=True)
        g_t = torch.zeros_like(t) if g_t is None else g_t
        g_y = torch.zeros_like(y) if g_y is None else g_y
        with torch.no_grad():
            f = ctx.func(t_event, y_event)
            slope = g_t + per_row(g_y * f).sum(1)
            pull = grad_t + per_row(grad_y * f).sum(1)
            correction = rows_of(torch.where(hit, -pull / slope, torch.zeros_like(pull)), g_y) * g_y
        return None, None, None, None, grad_y + correction
