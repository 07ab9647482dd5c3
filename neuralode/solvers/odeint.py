"""torchdiffeq-compatible entry points: switch with one import.

``odeint(func, y0, t)`` treats ``y0`` as one system (one step size and one error norm for the
whole state), exactly like torchdiffeq; it is the per-sample solve on a batch of one. For
per-sample step control along a batch dimension, use :func:`~.ivp.solve_ivp`.

torchdiffeq's semantics here: ``y0`` a tensor of any shape (a scalar too) or a tuple of
tensors; ``func(t, y)`` with a scalar ``t``; outputs at the times ``t`` interpolated from the
steps (adaptive methods, fixed steps given by ``step_size`` or ``grid_constructor``) or landed
on (fixed-step methods without either, whose grid is ``t``); ``options`` as torchdiffeq names
them; step callbacks read from attributes of ``func``; terminal events with ``event_fn``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from .adams import Adams
from .adjoint import AdjointConfig, BackwardStats, OutputLayout, PartsNorm
from .controller import PIController
from .events import event_gradient
from .implicit import ImplicitRK
from .ivp import build_stepper, resolve_interpolant, resolve_method, solve
from .methods import method_names
from .problem import landing_points, prepare_problem
from .scipy_solve import ScipyMethod
from .solver import Solver
from .status import raise_for_status
from .stepper import DEFAULT_MAX_STEPS, StepCallbacks
from .tuples import State, TupleLayout

OdeFunc = Callable[[Tensor, State], State]

_COMMON_OPTIONS = {"norm", "max_num_steps", "perturb", "step_t", "jump_t", "grid_points", "interp", "step_size"}
_OPTIONS = {
    "adaptive": _COMMON_OPTIONS | {"first_step", "min_step", "max_step", "safety", "ifactor", "dfactor"},
    "fixed": _COMMON_OPTIONS | {"grid_constructor"},
    "adams": _COMMON_OPTIONS | {"grid_constructor", "max_order", "max_iters"},
    "implicit": _COMMON_OPTIONS | {"grid_constructor", "max_iters"},
    "scipy": {"norm", "solver", "min_step", "max_step"},
}
_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


def odeint(
    func: OdeFunc,
    y0: State,
    t: Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str | None = None,
    options: dict | None = None,
    event_fn: Callable[[Tensor, State], Tensor] | None = None,
) -> State | tuple[Tensor, State]:
    """Solve ``dy/dt = func(t, y)`` (``t`` a scalar tensor) and return the states at the 1-D
    times ``t`` (increasing or decreasing), shaped ``[len(t), *y0.shape]`` (a tuple of those
    for a tuple ``y0``). With ``event_fn`` (``len(t) == 2``; ``t[1]`` only gives the
    direction) the solve ends where ``event_fn(t, y)`` first changes sign, and
    ``(event_t, [y0, y(event_t)])`` is returned, the event time differentiable. Raises
    :class:`SolverError` if the solve fails. See docs/solvers.md for ``options``."""
    return _odeint(func, y0, t, rtol, atol, method, options, event_fn, adjoint=None)


def odeint_adjoint(
    func: OdeFunc,
    y0: State,
    t: Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str | None = None,
    options: dict | None = None,
    event_fn: Callable[[Tensor, State], Tensor] | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
    adjoint_params: Iterable[Tensor] | None = None,
) -> State | tuple[Tensor, State]:
    """:func:`odeint` with gradients by the adjoint method, in memory independent of the
    number of steps. ``adjoint_params`` defaults to ``func.parameters()``; the backward solve
    uses ``adjoint_method``/``adjoint_options`` (default: the forward's, without ``norm``), and
    ``adjoint_options["norm"]`` is ``"seminorm"`` (parameters out of error control), a callable
    on the parts ``(t, y, adj_y, *adj_params)`` (``t`` always 0 here), or absent (all parts)."""
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError("func must be an nn.Module, or adjoint_params must be given (adjoint_params=() for none)")
    if adjoint_method is not None and adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "adjoint_method differs from method, so adjoint_options cannot be inferred from options: pass them"
        )
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    params = tuple(cast(nn.Module, func).parameters() if adjoint_params is None else adjoint_params)  # checked above
    adjoint = _AdjointRequest(
        params=tuple(p for p in params if p.requires_grad),
        rtol=rtol if adjoint_rtol is None else adjoint_rtol,
        atol=atol if adjoint_atol is None else adjoint_atol,
        method=method if adjoint_method is None else adjoint_method,
        options=dict(adjoint_options),
    )
    return _odeint(func, y0, t, rtol, atol, method, options, event_fn, adjoint=adjoint)


def odeint_event(
    func: OdeFunc,
    y0: State,
    t0: Tensor,
    *,
    event_fn: Callable[[Tensor, State], Tensor],
    reverse_time: bool = False,
    odeint_interface: Callable = odeint,
    **kwargs,
) -> tuple[Tensor, State]:
    """Solve from ``t0`` until ``event_fn(t, y)`` changes sign (backwards in time with
    ``reverse_time``): ``(event_t, [y0, y(event_t)])``, with gradients to the event time."""
    t0 = torch.as_tensor(t0).reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _AdjointRequest:
    params: tuple[Tensor, ...]
    rtol: float
    atol: float
    method: str | None
    options: dict


def _rms(x: Tensor) -> Tensor:
    return x.abs().pow(2).mean().sqrt()


def _mixed_norm(parts: tuple[Tensor, ...]) -> Tensor:
    """torchdiffeq's norm over a tuple: the largest RMS of its parts."""
    return torch.stack([_rms(part) for part in parts]).amax() if parts else torch.zeros(())


def _as_norm(value) -> Tensor:
    return torch.as_tensor(value).reshape(1)


def _odeint(func, y0, t, rtol, atol, method, options, event_fn, adjoint: _AdjointRequest | None):
    layout = TupleLayout.of(y0, batched=False)
    flat_y0 = layout.flatten(y0)
    if not flat_y0.is_floating_point():
        raise ValueError(f"y0 must have a floating-point dtype, got {flat_y0.dtype}")
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError("t must be a floating-point tensor of output times")
    t = t.to(flat_y0.device)
    if t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor of output times, got shape {tuple(t.shape)}")
    if t.shape[0] > 1:
        steps = t[1:] > t[:-1]
        if not (bool(steps.all()) or bool((t[1:] < t[:-1]).all())):
            raise ValueError("t must be strictly increasing or decreasing")
    if event_fn is not None and t.shape[0] != 2:
        raise ValueError(f"with event_fn, t must be [t0, t1] (t1 gives the direction), got len(t) = {t.shape[0]}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, Tensor) and (tol.dim() > 0 or tol.requires_grad):
            raise ValueError(f"{name} must be a number (per-element tolerances are not supported)")
        if not isinstance(tol, (Tensor, int, float)):
            raise ValueError(f"{name} must be a number, got {type(tol).__name__}")

    solve_method, settings = _settings(func, flat_y0, t, layout, method, options, "options")
    backward = None
    if adjoint is not None:
        step_options = {key: value for key, value in adjoint.options.items() if key != "norm"}
        backward = _settings(
            func,
            flat_y0,
            t.flip(0),
            layout,
            adjoint.method,
            step_options,
            "adjoint_options",
            callback_suffix="_adjoint",
        )

    if t.shape[0] == 1 and event_fn is None:
        return y0[None] if layout.shapes is None else tuple(part[None] for part in y0)

    def batched(t_batch: Tensor, y_batch: Tensor) -> Tensor:
        out = func(t_batch[0], layout.unflatten(y_batch[0]))
        return layout.flatten(out, "func's output")[None]

    batched_event = None
    if event_fn is not None:

        def batched_event(t_batch: Tensor, y_batch: Tensor) -> Tensor:
            return torch.as_tensor(event_fn(t_batch[0], layout.unflatten(y_batch[0]))).reshape(1, -1)

    t_span = (t[0], t[-1]) if event_fn is None else (t[0], torch.sign(t[1] - t[0]) * torch.inf)
    problem = prepare_problem(
        flat_y0[None],
        t_span,
        t[1:] if event_fn is None else None,
        rtol,
        atol,
        settings.first_step,
        None,
        step_t=settings.step_t,
        jump_t=settings.jump_t,
        unbounded=event_fn is not None,
    )
    config = None
    if adjoint is not None:
        assert backward is not None  # made with adjoint
        backward_method, backward_settings = backward
        points, jumps = landing_points(backward_settings.step_t, backward_settings.jump_t, problem.y0)
        config = AdjointConfig.build(
            batched,
            solve_method,
            problem,
            adjoint_params=adjoint.params,
            rtol=adjoint.rtol,
            atol=adjoint.atol,
            norm=_adjoint_norm(layout, adjoint.options.get("norm"), settings.state_norm),
            stats=BackwardStats(),
            backward=backward_method,
            callbacks=backward_settings.callbacks,
            points=points,
            jumps=jumps,
        )
    n_out = t.shape[0]
    out_layout = OutputLayout(prepend_y0=True, shape=(n_out, *flat_y0.shape))
    outputs, trajectory, events = solve(
        batched,
        problem,
        solve_method,
        interpolant=settings.interpolant,
        event_fn=batched_event,
        adjoint=config,
        layout=out_layout,
    )
    raise_for_status(trajectory.status)
    if events is None:
        return layout.unflatten(outputs)
    event_t, y_event = event_gradient(
        batched,
        events,
        trajectory.t_reached,
        outputs[-1][None],
        torch.zeros(1, dtype=torch.int64, device=outputs.device),
    )
    solution = torch.cat([outputs[:-1], y_event], 0)
    return event_t[0].to(t.dtype), layout.unflatten(solution)


@dataclass(frozen=True)
class _Settings:
    """torchdiffeq's options, translated."""

    first_step: float | None
    step_t: Tensor | None
    jump_t: Tensor | None
    interpolant: str | None
    callbacks: StepCallbacks | None
    state_norm: Callable[[Tensor], Tensor]  # on one sample's (unbatched) state


def _settings(func, y0: Tensor, t: Tensor, layout: TupleLayout, method, options, name: str, callback_suffix: str = ""):
    """The method (a Stepper, or a ScipyMethod) and the other settings that ``options`` ask for."""
    options = dict(options or {})
    if method is None:
        method = "dopri5"
    if not isinstance(method, str) or method not in method_names():
        known = ", ".join(method_names())
        raise ValueError(f"unknown method {method!r}: choose one of {known}")
    solver = resolve_method(method)
    kind = _kind(solver)
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"{name}: {sorted(unknown)} do not apply to {method}; it takes {sorted(_OPTIONS[kind])}")

    user_norm = options.get("norm")
    if user_norm is not None and not callable(user_norm):
        raise TypeError(f"{name}['norm'] must be a callable")
    if user_norm is None:
        state_norm = (
            _rms if layout.shapes is None else (lambda y: _mixed_norm(cast(tuple[Tensor, ...], layout.unflatten(y))))
        )
    else:
        state_norm = user_norm if layout.shapes is None else (lambda y: user_norm(layout.unflatten(y)))

    def norm(scaled: Tensor) -> Tensor:
        return _as_norm(state_norm(scaled[0])).to(scaled.dtype)

    callbacks = _callbacks(func, layout, solver, callback_suffix)
    if isinstance(solver, ScipyMethod):  # kind "scipy"
        scipy = ScipyMethod(
            options.get("solver", "LSODA"), options.get("min_step", 0.0), options.get("max_step", torch.inf)
        )
        return scipy, _Settings(None, None, None, None, None, state_norm)

    solver = _with_solver_options(solver, options)
    step_size, grid = options.get("step_size"), options.get("grid_constructor")
    step_t = options.get("step_t", options.get("grid_points"))
    if "step_t" in options and "grid_points" in options:
        raise ValueError(f"{name}: step_t and grid_points are the same option; give one")
    if grid is not None:
        if step_size is not None:
            raise ValueError(f"{name}: step_size and grid_constructor are mutually exclusive")
        grid_points = torch.as_tensor(grid(func, layout.unflatten(y0), t), dtype=t.dtype, device=t.device)
        if grid_points.dim() != 1 or grid_points[0] != t[0] or grid_points[-1] != t[-1]:
            raise ValueError("grid_constructor must return a 1-D grid from t[0] to t[-1]")
        inner = grid_points[1:-1]
        step_t = inner if step_t is None else torch.cat([torch.as_tensor(step_t).reshape(-1).to(inner), inner])
    controller = None
    if kind == "adaptive" and step_size is None:
        controller = PIController(
            safety=options.get("safety", 0.9),
            min_factor=options.get("dfactor", 0.2),
            max_factor=options.get("ifactor", 10.0),
            min_step=float(options.get("min_step", 0.0)),
            max_step=float(options.get("max_step", torch.inf)),
        )
    interpolant = resolve_interpolant(
        options.get("interp", "method" if solver.adaptive and step_size is None else "linear")
    )
    stepper = build_stepper(
        solver,
        step_size=step_size,
        controller=controller,
        first_step=options.get("first_step"),
        max_steps=options.get("max_num_steps", DEFAULT_MAX_STEPS),
        norm=norm,
        perturb=bool(options.get("perturb", False)),
        callbacks=callbacks,
        interpolant=interpolant,
    )
    return stepper, _Settings(
        options.get("first_step"), step_t, options.get("jump_t"), interpolant, callbacks, state_norm
    )


def _kind(solver: Solver | ScipyMethod) -> str:
    if isinstance(solver, ScipyMethod):
        return "scipy"
    if isinstance(solver, Adams):
        return "adams"
    if isinstance(solver, ImplicitRK):
        return "implicit"
    return "adaptive" if solver.adaptive else "fixed"


def _with_solver_options(solver: Solver, options: dict) -> Solver:
    method_options = {key: options[key] for key in ("max_order", "max_iters") if key in options}
    if not method_options:
        return solver
    return cast(Adams | ImplicitRK, solver).with_options(**method_options)  # the only kinds that take them


def _callbacks(func, layout: TupleLayout, solver, suffix: str) -> StepCallbacks | None:
    """torchdiffeq's step callbacks, read from attributes of ``func``; a method that cannot
    call one warns, as torchdiffeq does."""
    found = {name: getattr(func, name + suffix) for name in _CALLBACKS if callable(getattr(func, name + suffix, None))}
    if not found:
        return None
    supported = (
        set() if isinstance(solver, ScipyMethod) else (set(_CALLBACKS) if solver.adaptive else {"callback_step"})
    )
    unsupported = set(found) - supported
    if unsupported:
        warnings.warn(f"method {solver.name!r} does not support callbacks {sorted(unsupported)}", stacklevel=4)
    found = {name: callback for name, callback in found.items() if name in supported}
    if not found:
        return None
    step, accept, reject = (found.get(name) for name in _CALLBACKS)
    # The forward solve shows the user's state; the adjoint's, its augmented state.
    user_state = layout.unflatten if not suffix else (lambda y: y)

    def on_step(t, y, dt):
        step(t[0], user_state(y[0]), dt[0])

    def on_decision(t, y, dt, accepted):
        callback = accept if bool(accepted[0]) else reject
        if callback is not None:
            callback(t[0], user_state(y[0]), dt[0])

    return StepCallbacks(step=on_step if step else None, decided=on_decision if accept or reject else None)


def _adjoint_norm(layout: TupleLayout, requested, state_norm) -> PartsNorm:
    """torchdiffeq's adjoint norms over the parts (t, y, adj_y, *adj_params)."""
    if requested is None or requested == "full":

        def default_adjoint_norm(parts: tuple[Tensor, ...]) -> Tensor:
            t, y, adj_y, *adj_params = parts
            return max(
                t.abs(), _as_norm(state_norm(y))[0], _as_norm(state_norm(adj_y))[0], _mixed_norm(tuple(adj_params))
            )

        return default_adjoint_norm
    if requested == "seminorm":

        def adjoint_seminorm(parts: tuple[Tensor, ...]) -> Tensor:
            t, y, adj_y, *_ = parts
            return max(t.abs(), _as_norm(state_norm(y))[0], _as_norm(state_norm(adj_y))[0])

        return adjoint_seminorm
    if not callable(requested):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm', 'full' or a callable, got {requested!r}")
    if layout.shapes is None:
        return requested

    def tuple_adjoint_norm(parts: tuple[Tensor, ...]) -> Tensor:
        t, y, adj_y, *adj_params = parts
        return requested((t, *layout.unflatten(y), *layout.unflatten(adj_y), *adj_params))

    return tuple_adjoint_norm
