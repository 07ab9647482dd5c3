"""The public per-sample entry point, :func:`solve_ivp`, and the solve both entry points share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from ..precision import in_precision, precision_dtype
from .adjoint import IDENTITY, AdjointConfig, BackwardStats, ForwardSolve, OutputLayout, PartsNorm, adjoint_solve
from .controller import ConstantController, StepSizeController
from .events import EventFn, EventTracker, event_gradient
from .integrate import Trajectory, integrate
from .methods import SCIPY_METHOD, get_method
from .problem import Problem, Tolerance, prepare_problem, stops_between
from .scipy_solve import ScipyMethod, scipy_integrate
from .solver import INTERPOLANTS, Func, Solver
from .status import Status, raise_for_status
from .stepper import DEFAULT_MAX_STEPS, Norm, StepCallbacks, Stepper, rms_norm
from .tuples import State, TupleLayout


@dataclass(frozen=True)
class Solution:
    y1: State  # [B, *S] state at t1 (where it stopped, for failed samples; at the event, with one)
    ys: State | None  # [T, B, *S] states at t_eval, when asked for (NaN where never reached)
    t1: Tensor  # [B] time each sample reached (differentiable at events)
    nfe: Tensor  # [B] function evaluations
    steps: Tensor  # [B] accepted steps
    rejected: Tensor  # [B] rejected steps
    status: Tensor  # [B] Status codes
    backward: BackwardStats | None = None  # adjoint solves only
    event: Tensor | None = None  # [B] bool: stopped at its event (solves with event_fn only)

    @property
    def success(self) -> Tensor:
        return self.status == int(Status.SUCCESS)

    def messages(self) -> list[str]:
        return [Status(int(code)).message for code in self.status.tolist()]

    def raise_for_status(self) -> Solution:
        raise_for_status(self.status)
        return self


def resolve_method(method: str | Solver | ScipyMethod | None) -> Solver | ScipyMethod:
    if isinstance(method, ScipyMethod):
        return method
    if method == SCIPY_METHOD:
        return ScipyMethod()
    return get_method(method)


def resolve_interpolant(interpolate: bool | str | None) -> str | None:
    if interpolate is None or interpolate is False:
        return None
    if interpolate is True:
        return "method"
    if interpolate not in INTERPOLANTS:
        raise ValueError(f"interpolate must be a bool or one of {INTERPOLANTS}, got {interpolate!r}")
    return interpolate


def build_stepper(
    method: Solver,
    *,
    step_size: float | None,
    controller: StepSizeController | None,
    first_step,
    max_steps: int,
    norm: Norm | None,
    perturb: bool,
    callbacks: StepCallbacks | None,
    interpolant: str | None,
) -> Stepper:
    """The stepper a solve asks for, with its arguments checked."""
    if step_size is not None:
        if controller is not None:
            raise ValueError("give step_size or controller, not both")
        controller = ConstantController(step_size)
    if controller is None and not method.adaptive:
        controller = ConstantController()
    if first_step is not None and controller is not None and not controller.adaptive:
        raise ValueError(f"first_step applies to adaptive step control; {method.name} runs with fixed steps")
    if norm is not None and not callable(norm):
        raise TypeError("norm must be a callable mapping [B, ...] scaled errors to [B] norms")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    extra = 1 if interpolant is not None and method.needs_f1(interpolant) else 0
    return Stepper(
        method,
        controller,
        max_steps=max_steps,
        norm=norm or rms_norm,
        perturb=perturb,
        callbacks=callbacks,
        extra_step_cost=extra,
    )


def solve(
    func: Func,
    problem: Problem,
    method: Stepper | ScipyMethod,
    *,
    interpolant: str | None,
    event_fn: EventFn | None,
    adjoint: AdjointConfig | None,
    layout: OutputLayout = IDENTITY,
) -> tuple[Tensor, Trajectory, EventTracker | None]:
    """The solve behind :func:`solve_ivp` and ``odeint``: outputs (in ``layout``), the
    trajectory and the event tracker."""
    batch, device = problem.y0.shape[0], problem.y0.device
    scipy = method if isinstance(method, ScipyMethod) else None
    stepper = None if isinstance(method, ScipyMethod) else method
    if scipy is not None and event_fn is not None:
        raise ValueError("scipy_solver does not support event_fn")
    points, jumps = problem.points, problem.jumps
    controller = None if stepper is None else stepper.controller
    fixed_grid = (
        controller is not None and not controller.adaptive and cast(ConstantController, controller).step_size is None
    )
    if problem.n_eval and (interpolant is None or (fixed_grid and points is None)):
        # Outputs are stops: steps land on them exactly.
        outputs = problem.times[:, : problem.n_eval]
        points = outputs if points is None else torch.cat([points, outputs], 1)
        if jumps is not None:
            jumps = torch.cat([jumps, torch.zeros_like(outputs, dtype=torch.bool)], 1)
        interpolant = None
    if fixed_grid and not bool(torch.isfinite(problem.t1).all()):
        raise ValueError("a solve without an end time (an event's) needs step_size for a fixed-step method")
    stops, stop_jumps = stops_between(problem.t0, problem.t1, points, jumps)
    events = EventTracker(event_fn, batch, device) if event_fn is not None else None

    if adjoint is not None:
        forward = ForwardSolve(func, stepper, adjoint, problem, stops, stop_jumps, interpolant, events, layout, scipy)
        outputs, trajectory = adjoint_solve(forward)
        return outputs, trajectory, events
    if scipy is not None:
        trajectory = scipy_integrate(func, problem.y0, problem.t0, problem.times, problem.rtol, problem.atol, scipy)
    else:
        assert stepper is not None  # scipy is None
        state = stepper.init(
            func,
            problem.y0,
            problem.t0,
            stops[:, 0],
            problem.t1,
            problem.rtol,
            problem.atol,
            first_step=problem.first_step,
            max_nfe=problem.max_nfe,
            jump=None if stop_jumps is None else stop_jumps[:, 0],
        )
        trajectory = integrate(
            stepper, func, state, problem.times, stops, stop_jumps, interpolant=interpolant, events=events
        )
    return layout.present(trajectory.ys, problem.y0), trajectory, events


def solve_ivp(
    func: Func,
    y0: State,
    t_span: tuple[float | Tensor, float | Tensor],
    *,
    t_eval: Tensor | None = None,
    method: str | Solver | ScipyMethod = "dopri5",
    rtol: Tolerance = 1e-7,
    atol: Tolerance = 1e-9,
    first_step: float | Tensor | None = None,
    step_size: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_nfe: int | Tensor | None = None,
    controller: StepSizeController | None = None,
    norm: Norm | None = None,
    interpolate: bool | str = False,
    step_t: Tensor | None = None,
    jump_t: Tensor | None = None,
    perturb: bool = False,
    event_fn: EventFn | None = None,
    callbacks: StepCallbacks | None = None,
    adjoint: bool = False,
    adjoint_params: Iterable[Tensor] | None = None,
    adjoint_method: str | Solver | ScipyMethod | None = None,
    adjoint_rtol: Tolerance | None = None,
    adjoint_atol: Tolerance | None = None,
    adjoint_norm: str | PartsNorm = "seminorm",
    precision: str | torch.dtype | None = None,
) -> Solution:
    """Solve ``dy/dt = func(t, y)`` for each sample along dim 0 of ``y0`` on its own.

    Every sample has its own time, step size, error norm (RMS over its own elements),
    accept/reject decision, tolerance (``rtol``/``atol`` floats or ``[B]`` tensors), time span
    (``t_span`` entries floats or ``[B]`` tensors) and limits, so a batch gives each sample the
    result and step counts of solving it alone. ``func(t, y)`` receives ``t`` of shape ``[B]``
    and must treat samples independently. ``t_eval`` (``[T]`` or ``[B, T]``, strictly beyond
    t0 and not beyond t1) adds output times: steps land on them exactly, or with
    ``interpolate`` (``True`` for the method's own dense output, or ``"linear"``/``"cubic"``)
    the steps go their own way and the outputs are interpolated.

    ``step_t`` and ``jump_t`` (``[P]`` or ``[B, P]``) are times steps must end on; at
    ``jump_t`` func is discontinuous, so it is evaluated just before and just after them.
    ``perturb`` does that at every step's ends (fixed steps across a discontinuous func).
    ``event_fn(t, y) -> [B]`` ends each sample where it first changes sign (``t_span[1]`` may
    then be infinite); ``Solution.t1`` is then the event time, differentiable.

    Failures are reported per sample in ``Solution.status``, not raised; call
    ``raise_for_status()`` to raise. ``norm`` maps scaled errors ``[B, *S]`` to one norm per
    sample (default: RMS), e.g. to leave constant parts of an augmented state out of error
    control. With ``adjoint=True`` gradients come from the adjoint method (O(1) memory in the
    number of steps); otherwise autograd backpropagates through the solver's operations.

    ``y0`` may be a tuple of ``[B, ...]`` tensors: ``func``, ``norm``, ``event_fn`` and the
    callbacks then see tuples, ``y1`` and ``ys`` are tuples, and the default norm is the
    largest RMS of the parts, per sample.

    ``precision`` (``"bfloat16"``) evaluates ``func`` in that precision under autocast, in the
    forward solve and the adjoint's alike; the state, the stages' accumulation, the error norm
    and step control stay in ``y0``'s dtype (:mod:`neuralode.precision`).
    """
    dtype = precision_dtype(precision)
    layout = TupleLayout.of(y0, batched=True)
    if adjoint and adjoint_params is None and isinstance(func, nn.Module):
        adjoint_params = tuple(func.parameters())  # before func is wrapped below
    if layout.shapes is not None:
        func, norm, event_fn, callbacks = _flat_tuple(layout, func, norm, event_fn, callbacks)
        y0 = layout.flatten(y0)
    func = in_precision(func, dtype)
    solver = resolve_method(method)
    interpolant = resolve_interpolant(interpolate)
    y0 = cast(Tensor, y0)  # a tensor, or the tuple's flattening
    problem = prepare_problem(
        y0,
        t_span,
        t_eval,
        rtol,
        atol,
        first_step,
        max_nfe,
        step_t=step_t,
        jump_t=jump_t,
        unbounded=event_fn is not None,
    )
    if isinstance(solver, ScipyMethod):
        stepping = (step_size, controller, first_step, callbacks, step_t, jump_t)
        if perturb or any(option is not None for option in stepping):
            raise ValueError("scipy_solver takes only rtol, atol and its own options (ScipyMethod)")
        stepper: Stepper | ScipyMethod = solver
    else:
        stepper = build_stepper(
            solver,
            step_size=step_size,
            controller=controller,
            first_step=first_step,
            max_steps=max_steps,
            norm=norm,
            perturb=perturb,
            callbacks=callbacks,
            interpolant=interpolant,
        )

    config = None
    if adjoint:
        config = AdjointConfig.build(
            func,
            stepper,
            problem,
            adjoint_params=adjoint_params,
            method=None if adjoint_method is None else resolve_method(adjoint_method),
            rtol=adjoint_rtol,
            atol=adjoint_atol,
            norm=adjoint_norm,
            stats=BackwardStats(),
        )
    outputs, trajectory, events = solve(
        func, problem, stepper, interpolant=interpolant, event_fn=event_fn, adjoint=config
    )
    y1, t1 = outputs[-1], trajectory.t_reached
    if events is not None:
        t1, y1 = event_gradient(func, events, t1, y1, torch.arange(y1.shape[0], device=y1.device))
    return Solution(
        y1=layout.unflatten(y1),
        ys=layout.unflatten(outputs[: problem.n_eval]) if problem.n_eval else None,
        t1=t1,
        nfe=trajectory.nfe,
        steps=trajectory.steps,
        rejected=trajectory.rejected,
        status=trajectory.status,
        backward=None if config is None else config.stats,
        event=trajectory.event,
    )


def _flat_tuple(layout: TupleLayout, func, norm, event_fn, callbacks):
    """The user's functions of tuple states, as functions of the flat ``[B, N]`` state."""
    if norm is not None and not callable(norm):
        raise TypeError("norm must be a callable mapping the scaled error (a tuple here) to [B] norms")

    def flat_func(t: Tensor, y: Tensor) -> Tensor:
        return layout.flatten(func(t, layout.unflatten(y)), "func's output")

    def mixed_norm(scaled: Tensor) -> Tensor:
        return torch.stack([rms_norm(part) for part in layout.unflatten(scaled)]).amax(0)

    flat_norm = mixed_norm if norm is None else (lambda scaled: norm(layout.unflatten(scaled)))
    flat_event = None if event_fn is None else (lambda t, y: event_fn(t, layout.unflatten(y)))
    flat_callbacks = None
    if callbacks is not None:
        step, decided = callbacks.step, callbacks.decided
        flat_callbacks = StepCallbacks(
            step=None if step is None else (lambda t, y, dt: step(t, layout.unflatten(y), dt)),
            decided=None if decided is None else (lambda t, y, dt, ok: decided(t, layout.unflatten(y), dt, ok)),
        )
    return flat_func, flat_norm, flat_event, flat_callbacks
