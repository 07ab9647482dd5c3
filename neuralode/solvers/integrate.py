"""The integrate loop and the public per-sample entry point, :func:`solve_ivp`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .controller import PIController
from .state import SolverState, StepRecord
from .status import Status, raise_for_status
from .stepper import DEFAULT_MAX_STEPS, Func, Norm, Stepper, rms_norm
from .tableau import get_method

Tolerance = float | Tensor


@dataclass
class Trajectory:
    """What :func:`integrate` returns, rows indexed by ``sample_id``.

    ``stops[k]`` is the state at ``schedule[:, k]``; the last stop is the end time, or for a
    sample that failed, its state where it stopped (``t_reached``). Stops never reached are NaN.
    """

    stops: Tensor  # [T, B, *S]
    t_reached: Tensor  # [B]
    nfe: Tensor
    steps: Tensor
    rejected: Tensor
    status: Tensor


def integrate(
    stepper: Stepper,
    func: Func,
    state: SolverState,
    schedule: Tensor,
    on_step: Callable[[StepRecord], None] | None = None,
) -> Trajectory:
    """Step every row of ``state`` through its stops ``schedule[sample_id]`` (``[B, T]``, the
    last column the end time) until it succeeds or fails.

    Finished rows leave the batch at once, so f is only ever evaluated on running samples.
    Costs one host–device synchronisation per step (the check for finished rows).
    """
    batch, n_stops = schedule.shape
    y = state.y
    stops = y.new_full((n_stops, batch, *y.shape[1:]), torch.nan)
    stop_index = torch.zeros(batch, dtype=torch.int64, device=y.device)
    t_reached = torch.empty_like(state.t)
    counters = {name: torch.zeros(batch, dtype=torch.int64, device=y.device) for name in ("nfe", "steps", "rejected", "status")}

    while True:
        done = state.status != int(Status.RUNNING)
        reached = state.t == state.t_stop
        if bool((done | reached).any()):
            ids = state.sample_id
            rows = reached.nonzero().squeeze(1)
            if rows.numel():
                k = stop_index[ids[rows]]
                stops.index_put_((k, ids[rows]), state.y[rows])
                stop_index.index_put_((ids[rows],), k + 1)
                moving_on = rows[~done[rows]]
                if moving_on.numel():
                    next_stop = schedule[ids[moving_on], stop_index[ids[moving_on]]]
                    state.t_stop = state.t_stop.index_put((moving_on,), next_stop)
            rows = done.nonzero().squeeze(1)
            if rows.numel():
                finished = ids[rows]
                # The last stop is y1: the end state, or where a failed sample stopped. A sample
                # whose t_eval ends at t1 in a batch where others' do not has t1 twice in its
                # schedule; this write covers the second.
                stops.index_put_((torch.full_like(finished, n_stops - 1), finished), state.y[rows])
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
    return Trajectory(stops=stops, t_reached=t_reached, **counters)


# --------------------------------------------------------------------------------------------
@dataclass
class BackwardStats:
    """Per-sample cost of the adjoint's backward solve, filled in when backward runs."""

    nfe: Tensor | None = None
    steps: Tensor | None = None
    rejected: Tensor | None = None


@dataclass(frozen=True)
class Solution:
    y1: Tensor  # [B, *S] state at t1 (where it stopped, for failed samples)
    ys: Tensor | None  # [T, B, *S] states at t_eval, when asked for (NaN where never reached)
    t1: Tensor  # [B] time each sample reached
    nfe: Tensor  # [B] function evaluations
    steps: Tensor  # [B] accepted steps
    rejected: Tensor  # [B] rejected steps
    status: Tensor  # [B] Status codes
    backward: BackwardStats | None = None  # adjoint solves only

    @property
    def success(self) -> Tensor:
        return self.status == int(Status.SUCCESS)

    def messages(self) -> list[str]:
        return [Status(int(code)).message for code in self.status.tolist()]

    def raise_for_status(self) -> Solution:
        raise_for_status(self.status)
        return self


def solve_ivp(
    func: Func,
    y0: Tensor,
    t_span: tuple[float | Tensor, float | Tensor],
    *,
    t_eval: Tensor | None = None,
    method: str = "dopri5",
    rtol: Tolerance = 1e-7,
    atol: Tolerance = 1e-9,
    first_step: float | Tensor | None = None,
    step_size: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_nfe: int | Tensor | None = None,
    controller: PIController | None = None,
    norm: Norm | None = None,
    adjoint: bool = False,
    adjoint_params: Iterable[Tensor] | None = None,
    adjoint_method: str | None = None,
    adjoint_rtol: Tolerance | None = None,
    adjoint_atol: Tolerance | None = None,
    adjoint_norm: str = "seminorm",
) -> Solution:
    """Solve ``dy/dt = func(t, y)`` for each sample along dim 0 of ``y0`` on its own.

    Every sample has its own time, step size, error norm (RMS over its own elements),
    accept/reject decision, tolerance (``rtol``/``atol`` floats or ``[B]`` tensors), time span
    (``t_span`` entries floats or ``[B]`` tensors) and limits, so a batch gives each sample the
    result and step counts of solving it alone. ``func(t, y)`` receives ``t`` of shape ``[B]``
    and must treat samples independently. ``t_eval`` (``[T]`` or ``[B, T]``, strictly beyond
    t0 and not beyond t1) adds output times; steps land on them exactly.

    Failures are reported per sample in ``Solution.status``, not raised; call
    ``raise_for_status()`` to raise. ``norm`` maps scaled errors ``[B, *S]`` to one norm per
    sample (default: RMS), e.g. to leave constant parts of an augmented state out of error
    control. With ``adjoint=True`` gradients come from the adjoint
    method (O(1) memory in the number of steps); otherwise autograd backpropagates through
    the solver's operations.
    """
    method_ = get_method(method)
    if not method_.adaptive and step_size is None and first_step is not None:
        raise ValueError(f"first_step applies to adaptive methods; {method} needs step_size")
    problem = prepare_problem(y0, t_span, t_eval, rtol, atol, first_step, max_nfe)
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if norm is not None and not callable(norm):
        raise TypeError("norm must be a callable mapping [B, ...] scaled errors to [B] norms")
    stepper = Stepper(
        method_, controller or PIController(), step_size=step_size, max_steps=max_steps, norm=norm or rms_norm
    )

    backward = None
    if adjoint:
        from .adjoint import AdjointConfig, adjoint_solve

        backward = BackwardStats()
        config = AdjointConfig.build(
            func,
            stepper,
            problem,
            adjoint_params=adjoint_params,
            method=adjoint_method,
            rtol=adjoint_rtol,
            atol=adjoint_atol,
            norm=adjoint_norm,
            stats=backward,
        )
        trajectory = adjoint_solve(func, stepper, problem, config)
    else:
        state = stepper.init(
            func,
            problem.y0,
            problem.t0,
            problem.schedule[:, 0],
            problem.schedule[:, -1],
            problem.rtol,
            problem.atol,
            first_step=problem.first_step,
            max_nfe=problem.max_nfe,
        )
        trajectory = integrate(stepper, func, state, problem.schedule)

    stops = trajectory.stops
    return Solution(
        y1=stops[-1],
        ys=stops[: problem.n_eval] if problem.n_eval else None,
        t1=trajectory.t_reached,
        nfe=trajectory.nfe,
        steps=trajectory.steps,
        rejected=trajectory.rejected,
        status=trajectory.status,
        backward=backward,
    )


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """Validated per-sample inputs: everything as ``[B]`` (or ``[B, T]``) tensors on y0's
    device and dtype. Time tensors keep their autograd history."""

    y0: Tensor
    t0: Tensor
    schedule: Tensor  # [B, T] stops; last column is t1
    n_eval: int  # leading columns of schedule that are user-requested outputs
    rtol: Tensor
    atol: Tensor
    first_step: Tensor | None
    max_nfe: Tensor | None


def prepare_problem(
    y0: Tensor,
    t_span: tuple[float | Tensor, float | Tensor],
    t_eval: Tensor | None,
    rtol: Tolerance,
    atol: Tolerance,
    first_step: float | Tensor | None,
    max_nfe: int | Tensor | None,
) -> Problem:
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise ValueError(f"y0 must have a floating-point dtype, got {y0.dtype}")
    if y0.dim() < 1 or y0.shape[0] == 0:
        raise ValueError(f"y0 must have shape [B, ...] with B >= 1 samples, got {tuple(y0.shape)}")
    if not bool(torch.isfinite(y0).all()):
        bad = int(torch.isfinite(y0).flatten(1).all(1).logical_not().nonzero()[0])
        raise ValueError(f"y0 contains NaN or Inf (first at sample {bad})")
    batch = y0.shape[0]

    def per_sample(value, name: str, *, positive: bool) -> Tensor:
        tensor = torch.as_tensor(value, dtype=y0.dtype, device=y0.device)
        if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.shape[0] != batch):
            raise ValueError(f"{name} must be a number or a tensor of shape [{batch}], got shape {tuple(tensor.shape)}")
        tensor = tensor.expand(batch)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} must be finite, got {_first_bad(tensor, ~torch.isfinite(tensor))}")
        if positive and not bool((tensor > 0).all()):
            raise ValueError(f"{name} must be > 0, got {_first_bad(tensor, tensor <= 0)}")
        return tensor

    if not (isinstance(t_span, (tuple, list)) and len(t_span) == 2):
        raise ValueError("t_span must be a pair (t0, t1)")
    t0 = per_sample(t_span[0], "t_span[0]", positive=False)
    t1 = per_sample(t_span[1], "t_span[1]", positive=False)
    if not bool((t0 != t1).all()):
        raise ValueError(f"t_span must have t0 != t1 (sample {int((t0 == t1).nonzero()[0])} has t0 == t1)")
    direction = torch.sign(t1 - t0)

    schedule, n_eval = t1[:, None], 0
    if t_eval is not None:
        t_eval = torch.as_tensor(t_eval, dtype=y0.dtype, device=y0.device)
        if t_eval.dim() == 1:
            t_eval = t_eval.expand(batch, -1)
        if t_eval.dim() != 2 or t_eval.shape[0] != batch or t_eval.shape[1] == 0:
            raise ValueError(f"t_eval must have shape [T] or [{batch}, T] with T >= 1, got {tuple(t_eval.shape)}")
        if not bool(torch.isfinite(t_eval).all()):
            raise ValueError("t_eval must be finite")
        along = direction[:, None] * t_eval
        if not bool((along.diff(dim=1) > 0).all()):
            raise ValueError("t_eval must be strictly monotone in the direction of integration")
        if not bool((along[:, 0] > direction * t0).all()):
            raise ValueError("t_eval must lie strictly after t0 (y0 is the state at t0)")
        if not bool((along[:, -1] <= direction * t1).all()):
            raise ValueError("t_eval must not go beyond t1")
        n_eval = t_eval.shape[1]
        schedule = t_eval if bool((t_eval[:, -1] == t1).all()) else torch.cat([t_eval, t1[:, None]], 1)

    first = None if first_step is None else per_sample(first_step, "first_step", positive=True)
    budget = None
    if max_nfe is not None:
        budget = torch.as_tensor(max_nfe, dtype=torch.int64, device=y0.device).expand(batch)
        if not bool((budget >= 1).all()):
            raise ValueError(f"max_nfe must be >= 1, got {int(budget.min())}")
    return Problem(
        y0=y0,
        t0=t0,
        schedule=schedule,
        n_eval=n_eval,
        rtol=per_sample(rtol, "rtol", positive=True),
        atol=per_sample(atol, "atol", positive=True),
        first_step=first,
        max_nfe=budget,
    )


def _first_bad(values: Tensor, bad: Tensor) -> str:
    index = int(bad.nonzero()[0])
    return f"{float(values[index])} (sample {index})"
