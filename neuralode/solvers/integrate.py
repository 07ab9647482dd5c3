"""The integrate loop: step every row until it succeeds or fails, recording outputs.

Outputs are either landed on (they are among the stops, so a step ends exactly there) or
interpolated from the step that passes them with the method's dense output. Terminal events
end a row at the time its event function crosses zero, found on the same dense output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .events import EventTracker
from .solver import Func, evaluate, rows_of
from .state import SolverState, StepRecord
from .status import Status
from .stepper import Stepper


@dataclass
class Trajectory:
    """What :func:`integrate` returns, rows indexed by ``sample_id``.

    ``ys[k]`` is the state at ``times[:, k]``; the last one is the end time, or for a sample
    that failed or hit its event, its state where it stopped (``t_reached``). Outputs never
    reached are NaN. ``event`` says which samples stopped at their event (``None`` without one).
    """

    ys: Tensor  # [T, B, *S]
    t_reached: Tensor  # [B]
    nfe: Tensor
    steps: Tensor
    rejected: Tensor
    status: Tensor
    event: Tensor | None = None


class _StepDenseOutput:
    """The dense output of one step, for any of its rows; ``func(t1, y1)``, when the
    interpolant needs it, is evaluated once per row and counted in the row's NFE."""

    def __init__(self, stepper: Stepper, func: Func, record: StepRecord, interpolant: str) -> None:
        self.method, self.func, self.record, self.interpolant = stepper.method, func, record, interpolant
        self.needs_f1 = self.method.needs_f1(interpolant)
        self.f1: Tensor | None = None
        self.evaluated: Tensor | None = None

    def at(self, state: SolverState, rows: Tensor, t: Tensor) -> Tensor:
        sub = self.record.select(rows)
        f1 = None
        if self.needs_f1:
            if self.f1 is None or self.evaluated is None:  # set together
                self.f1 = torch.zeros_like(self.record.y1)
                self.evaluated = torch.zeros_like(self.record.accepted)
            fresh = rows[~self.evaluated[rows]]
            if fresh.numel():
                values = evaluate(
                    self.func, self.record.t1.index_select(0, fresh), self.record.y1.index_select(0, fresh)
                )
                self.f1 = self.f1.index_put((fresh,), values)
                self.evaluated = self.evaluated.index_put((fresh,), torch.ones_like(fresh, dtype=torch.bool))
                state.nfe = state.nfe.index_add(0, fresh, torch.ones_like(fresh))
            f1 = self.f1.index_select(0, rows)
        theta = ((t - sub.t) / sub.dt).clamp(0.0, 1.0)
        return self.method.interpolate(sub, theta, self.interpolant, f1)


def integrate(
    stepper: Stepper,
    func: Func,
    state: SolverState,
    times: Tensor,
    stops: Tensor | None = None,
    jumps: Tensor | None = None,
    *,
    interpolant: str | None = None,
    events: EventTracker | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> Trajectory:
    """Step every row of ``state`` until it succeeds or fails, recording its outputs at
    ``times[sample_id]`` (``[B, T]``, the last column the end time).

    ``stops`` (``[B, S]``, sorted in the direction of integration, last column the end time)
    are the times steps must land on, ``jumps`` which of them are discontinuities; without
    ``stops`` the outputs are the stops. ``interpolant`` (see :data:`~.solver.INTERPOLANTS`)
    interpolates outputs that are not stops; ``None`` means every output is a stop. The
    caller starts ``state`` with ``t_stop = stops[:, 0]`` (and ``jump = jumps[:, 0]``).

    Finished rows leave the batch at once, so f is only ever evaluated on running samples.
    Costs one host–device synchronisation per step (the check for finished rows), and more
    on steps that pass outputs or events.
    """
    batch, n_times = times.shape
    stops = times if stops is None else stops
    y = state.y
    ys = y.new_full((n_times, batch, *y.shape[1:]), torch.nan)
    n_outputs = n_times - 1  # the last column is written when a row finishes
    next_output = torch.zeros(batch, dtype=torch.int64, device=y.device)
    direction = torch.sign(times[:, -1] - state.t.new_zeros(batch).index_put((state.sample_id,), state.t))
    along_stops = direction[:, None] * stops
    t_reached = torch.empty_like(state.t)
    counters = {
        name: torch.zeros(batch, dtype=torch.int64, device=y.device) for name in ("nfe", "steps", "rejected", "status")
    }
    if events is not None:
        events.start(state)

    while True:
        done = state.status != int(Status.RUNNING)
        reached = state.t == state.t_stop
        if bool((done | reached).any()):
            ids = state.sample_id
            moving_on = (reached & ~done).nonzero().squeeze(1)
            if moving_on.numel():
                rows_ids = ids[moving_on]
                position = direction[rows_ids] * state.t[moving_on]
                k = torch.searchsorted(along_stops[rows_ids], position[:, None], right=True)[:, 0]
                k = k.clamp(max=stops.shape[1] - 1)
                state.t_stop = state.t_stop.index_put((moving_on,), stops[rows_ids, k])
                if jumps is not None:
                    state.jump = cast(Tensor, state.jump).index_put((moving_on,), jumps[rows_ids, k])  # jumps: set
            rows = done.nonzero().squeeze(1)
            if rows.numel():
                finished = ids[rows]
                ys.index_put_((torch.full_like(finished, n_times - 1), finished), state.y[rows])
                t_reached = t_reached.index_put((finished,), state.t[rows])
                for name, counter in counters.items():
                    counter.index_put_((finished,), getattr(state, name)[rows])
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                state = state.select(keep)
        state, record = stepper.step(func, state)
        if on_step is not None:
            on_step(record)
        dense = None
        if events is not None:
            dense = _StepDenseOutput(stepper, func, record, interpolant or "method")
            events.detect(state, record, dense)
        if n_outputs:
            if dense is None and interpolant is not None:
                dense = _StepDenseOutput(stepper, func, record, interpolant)
            _record_outputs(state, record, dense, times, ys, next_output, n_outputs, direction)
        # Let the step's stages go before the next step makes its own: held across it, they made
        # glibc hand memory back and fault it in again (a batch-1000 solve: 315k page faults
        # instead of 168k-189k, 1.2-1.3x slower).
        del record, dense
    return Trajectory(ys=ys, t_reached=t_reached, event=None if events is None else events.hit, **counters)


def _record_outputs(state, record, dense, times, ys, next_output, n_outputs, direction) -> None:
    """Write the outputs that the rows' accepted step reached or passed."""
    ids = state.sample_id
    while True:
        k = next_output[ids]
        t_out = times[ids, k.clamp(max=n_outputs - 1)]
        due = record.accepted & (k < n_outputs) & (direction[ids] * t_out <= direction[ids] * state.t)
        rows = due.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        t_query, landed = t_out[rows], state.y[rows]
        exact = t_query == state.t[rows]
        values = landed
        if dense is not None and not bool(exact.all()):
            values = torch.where(rows_of(exact, landed), landed, dense.at(state, rows, t_query))
        ys.index_put_((k[rows], ids[rows]), values)
        next_output.index_put_((ids[rows],), k[rows] + 1)
