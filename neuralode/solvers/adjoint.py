"""The adjoint method (Chen et al. 2018, Algorithm 1), per sample.

The forward solve keeps only the states at the output times. Backward, from the last output
time to t0, integrates the augmented system

    dz/dt = f(z, t),    da/dt = -a·∂f/∂z,    d(dL/dθ)/dt = -a·∂f/∂θ

with vector–Jacobian products, so memory does not grow with the number of steps. At each
output time the incoming cotangent is added to ``a`` and ``z`` is reset to the forward value.
Gradients with respect to the output times and t0 come from ``f`` at those points.

Two ways to carry dL/dθ:

``norm="seminorm"`` (any batch size, Runge–Kutta methods): θ is left out of the state and out
of error control (Kidger et al. 2021, "Hey, that's not an ODE"). The integral is a quadrature
over the accepted steps with the method's own weights: after each step a single batched
vector–Jacobian product, whose cotangents carry each sample's ``b_i * dt`` (zero for rejected
samples), adds the stages' share. No per-sample copy of dL/dθ is made.

``norm="full"`` or a callable (one sample, which is what ``odeint_adjoint`` solves): θ joins
the state, as in torchdiffeq. The error norm then sees the parts ``(t, z, a, *θ)`` — ``t`` is
always 0 here, since time gradients are not integrated — and is the largest RMS of z, a and
each parameter for ``"full"``, or whatever the callable returns.

Per-sample solving is sound only when f treats samples independently (no BatchNorm or
anything else that mixes rows); the adjoint needs it as much as the forward solve does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from .controller import ConstantController, PIController, StepSizeController
from .integrate import EventTracker, Trajectory, integrate
from .problem import Problem, stops_between
from .scipy_solve import ScipyMethod, scipy_integrate
from .solver import Func, Solver, per_row, rows_of
from .state import StepRecord
from .status import SolverError, Status
from .stepper import StepCallbacks, Stepper, rms_norm

NORMS = ("seminorm", "full")

PartsNorm = Callable[[tuple[Tensor, ...]], Tensor]
"""An adjoint error norm over the parts ``(t, z, a, *θ)`` of one sample's augmented state."""


@dataclass
class BackwardStats:
    """Per-sample cost of the adjoint's backward solve, filled in when backward runs."""

    nfe: Tensor | None = None
    steps: Tensor | None = None
    rejected: Tensor | None = None


class OutputLayout(NamedTuple):
    """How the solve's outputs ``[T, B, *S]`` are presented: optionally with ``y0`` as a first
    row, then reshaped (``odeint`` shows one sample as ``[len(t), *shape]``)."""

    prepend_y0: bool
    shape: tuple[int, ...] | None

    def present(self, ys: Tensor, y0: Tensor) -> Tensor:
        out = torch.cat([y0[None], ys], 0) if self.prepend_y0 else ys
        return out if self.shape is None else out.reshape(self.shape)

    def cotangents(self, grad: Tensor, ys: Tensor) -> tuple[Tensor, Tensor | None]:
        """The cotangent of ``ys`` and, when it was prepended, of ``y0`` directly."""
        grad = grad.reshape(ys.shape[0] + self.prepend_y0, *ys.shape[1:])
        return (grad[1:], grad[0]) if self.prepend_y0 else (grad, None)


IDENTITY = OutputLayout(False, None)


@dataclass(frozen=True)
class AdjointConfig:
    params: tuple[Tensor, ...]
    stepper: Stepper | None  # for the backward solve (None: scipy does it)
    rtol: Tensor  # [B]
    atol: Tensor  # [B]
    norm: str | PartsNorm
    stats: BackwardStats
    points: Tensor | None = None  # [B, P] landing points of the backward solve
    jumps: Tensor | None = None
    scipy: ScipyMethod | None = None  # scipy for the backward solve, instead of the stepper

    @staticmethod
    def build(
        func: Func,
        forward: Stepper | ScipyMethod,
        problem: Problem,
        *,
        adjoint_params: Iterable[Tensor] | None,
        method: Solver | ScipyMethod | None = None,
        rtol: float | Tensor | None,
        atol: float | Tensor | None,
        norm: str | PartsNorm,
        stats: BackwardStats,
        backward: Stepper | ScipyMethod | None = None,
        callbacks: StepCallbacks | None = None,
        points: Tensor | None = None,
        jumps: Tensor | None = None,
    ) -> AdjointConfig:
        """The backward solve's configuration: ``backward`` if given, else the forward one
        with ``method`` (default: the forward method)."""
        if not (callable(norm) or norm in NORMS):
            raise ValueError(f"adjoint norm must be one of {NORMS} or a callable, got {norm!r}")
        batch = problem.y0.shape[0]
        if norm != "seminorm" and batch != 1:
            raise ValueError(
                "adjoint norm 'full' (or a callable) puts dL/dθ under error control, which needs one shared "
                f"step sequence; it supports a single sample, got {batch}. Use 'seminorm'."
            )
        if adjoint_params is None:
            params: tuple[Tensor, ...] = tuple(func.parameters()) if isinstance(func, nn.Module) else ()
        else:
            params = tuple(adjoint_params)
        if backward is None:
            if isinstance(method, ScipyMethod) or (method is None and isinstance(forward, ScipyMethod)):
                backward = method or forward
            elif isinstance(forward, ScipyMethod):
                backward = Stepper(cast(Solver, method))  # neither None nor scipy here
            else:
                backward = forward if method is None else _with_method(forward, method)
        scipy = backward if isinstance(backward, ScipyMethod) else None
        quadrature = not isinstance(backward, ScipyMethod) and backward.method.quadrature is not None
        if norm == "seminorm" and params and not quadrature:
            name = backward.name if isinstance(backward, ScipyMethod) else backward.method.name
            raise ValueError(
                f"adjoint norm 'seminorm' integrates dL/dθ by the method's quadrature, which {name} "
                "does not have; use a Runge–Kutta adjoint_method, or norm 'full' for one sample"
            )
        stepper = (
            None if isinstance(backward, ScipyMethod) else replace(backward, callbacks=callbacks, extra_step_cost=0)
        )

        def tolerance(value, default: Tensor) -> Tensor:
            if value is None:
                return default
            tensor = torch.as_tensor(value, dtype=default.dtype, device=default.device).expand(batch)
            if not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
                raise ValueError("adjoint_rtol and adjoint_atol must be finite and > 0")
            return tensor

        return AdjointConfig(
            params=params,
            stepper=stepper,
            rtol=tolerance(rtol, problem.rtol),
            atol=tolerance(atol, problem.atol),
            norm=norm,
            stats=stats,
            points=problem.points if points is None else points,
            jumps=problem.jumps if points is None else jumps,
            scipy=scipy,
        )


def _with_method(forward: Stepper, method) -> Stepper:
    """The forward configuration with another method; the controller follows its kind."""
    controller: StepSizeController = forward.control
    if controller.adaptive and not method.adaptive:
        controller = ConstantController()
    elif not controller.adaptive and cast(ConstantController, controller).step_size is None and method.adaptive:
        controller = PIController()
    return replace(forward, method=method, controller=controller)


@dataclass(frozen=True)
class ForwardSolve:
    """What the forward solve needs besides the differentiable inputs."""

    func: Func
    stepper: Stepper | None  # None: scipy does the forward solve
    config: AdjointConfig
    problem: Problem
    stops: Tensor
    stop_jumps: Tensor | None
    interpolant: str | None
    events: EventTracker | None
    layout: OutputLayout
    scipy: ScipyMethod | None = None  # the forward solve by scipy instead of the stepper


class _Inputs(NamedTuple):
    """The arguments of :class:`_AdjointSolve`, in order (the parameters follow them)."""

    solve: ForwardSolve
    y0: Tensor
    t0: Tensor
    times: Tensor


def adjoint_solve(solve: ForwardSolve) -> tuple[Tensor, Trajectory]:
    """The forward solve under the adjoint: its outputs in ``solve.layout`` and the rest."""
    problem = solve.problem
    ys, t_reached, nfe, steps, rejected, status, event = _AdjointSolve.apply(
        *_Inputs(solve, problem.y0, problem.t0, problem.times), *solve.config.params
    )
    trajectory = Trajectory(ys, t_reached, nfe, steps, rejected, status, event if solve.events else None)
    return ys, trajectory


class _AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, solve: ForwardSolve, y0, t0, times, *params):
        problem, stepper = solve.problem, solve.stepper
        with torch.no_grad():
            if solve.scipy is not None:
                out = scipy_integrate(solve.func, y0, t0, times, problem.rtol, problem.atol, solve.scipy)
            else:
                assert stepper is not None  # scipy is None
                state = stepper.init(
                    solve.func,
                    y0,
                    t0,
                    solve.stops[:, 0],
                    times[:, -1],
                    problem.rtol,
                    problem.atol,
                    first_step=problem.first_step,
                    max_nfe=problem.max_nfe,
                    jump=None if solve.stop_jumps is None else solve.stop_jumps[:, 0],
                )
                out = integrate(
                    stepper,
                    solve.func,
                    state,
                    times,
                    solve.stops,
                    solve.stop_jumps,
                    interpolant=solve.interpolant,
                    events=solve.events,
                )
        ctx.solve = solve
        # Read at backward time, so it can be swapped in between (torchdiffeq's tests do).
        ctx.adjoint_options = {"norm": solve.config.norm}
        ctx.save_for_backward(y0, t0, times, out.ys, out.status, out.t_reached, *params)
        event = out.event if out.event is not None else torch.zeros_like(out.status, dtype=torch.bool)
        ctx.mark_non_differentiable(out.t_reached, out.nfe, out.steps, out.rejected, out.status, event)
        return solve.layout.present(out.ys, y0), out.t_reached, out.nfe, out.steps, out.rejected, out.status, event

    @staticmethod
    def backward(ctx, grad_out, *_):
        solve = ctx.solve
        func, config = solve.func, solve.config
        y0, t0, times, ys, status, t_reached, *params = ctx.saved_tensors
        if not bool((status == int(Status.SUCCESS)).all()):
            raise SolverError(status, context="cannot backpropagate through a failed forward solve")
        needs = _Inputs(*ctx.needs_input_grad[: len(_Inputs._fields)])
        param_needs = ctx.needs_input_grad[len(_Inputs._fields) :]
        needs_t = needs.t0 or needs.times
        trainable = [p for p, need in zip(params, param_needs) if need]
        grad_ys, grad_y0_direct = solve.layout.cotangents(grad_out, ys)

        norm = ctx.adjoint_options["norm"]
        if norm == "seminorm":
            dynamics = _SeminormDynamics(func, trainable, config.stepper)
        else:
            dynamics = _StateDynamics(func, trainable, config.stepper, y0, norm)
        batch, n_times = times.shape
        # The last output is where each sample stopped: its end time, or its event.
        times = torch.cat([times[:, :-1], t_reached[:, None]], 1)
        direction = torch.sign(times[:, -1] - t0)
        stats = _StatsSum(batch, y0.device)
        grad_times = torch.zeros_like(times) if needs_t else None
        a = torch.zeros_like(y0)
        with torch.no_grad():
            for k in reversed(range(n_times)):
                # Outputs beyond an event were never reached: nothing flows from them, and an
                # event time's own gradient is the event's business (events.event_gradient).
                reached = direction * times[:, k] <= direction * t_reached
                a = a + torch.where(rows_of(reached, a), grad_ys[k], torch.zeros_like(a))
                if needs_t:
                    moves = reached if k < n_times - 1 or solve.events is None else reached & ~solve.events.hit
                    f_k = func(times[:, k], torch.where(rows_of(reached, a), ys[k], y0))
                    grad_times[:, k] = torch.where(moves, _dot(grad_ys[k], f_k), 0.0)
                    stats.nfe += 1
                t_to = times[:, k - 1] if k else t0
                t_from = torch.where(reached, times[:, k], t_to)
                a = dynamics.solve(ys[k], a, t_from, t_to, config, stats)
            grad_t0 = None
            if needs_t:
                grad_t0 = -_dot(a, func(t0, y0))
                stats.nfe += 1
        stats.publish(config.stats)
        grad_y0 = a if grad_y0_direct is None else a + grad_y0_direct

        param_grads = iter(dynamics.param_grads())
        grads_params = [next(param_grads) if need else None for need in param_needs]
        grads = _Inputs(solve=None, y0=grad_y0, t0=grad_t0, times=grad_times)
        return (*grads, *grads_params)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return per_row(u * v).sum(1)


def _vjp(output: Tensor, inputs: Sequence[Tensor], cotangent: Tensor, retain_graph: bool = False) -> list[Tensor]:
    """Vector–Jacobian product, with zeros for inputs the output does not depend on."""
    if not output.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(output, inputs, cotangent, allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


class _StatsSum:
    def __init__(self, batch: int, device: torch.device) -> None:
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)
        self.nfe, self.steps, self.rejected = zeros, zeros.clone(), zeros.clone()

    def add(self, rows: Tensor, trajectory: Trajectory, extra_nfe_per_step: int) -> None:
        attempts = trajectory.steps + trajectory.rejected
        self.nfe = self.nfe.index_add(0, rows, trajectory.nfe + extra_nfe_per_step * attempts)
        self.steps = self.steps.index_add(0, rows, trajectory.steps)
        self.rejected = self.rejected.index_add(0, rows, trajectory.rejected)

    def publish(self, into: BackwardStats) -> None:
        into.nfe, into.steps, into.rejected = self.nfe, self.steps, self.rejected


class _Dynamics:
    """Common to both ways: solve the augmented system backwards over one interval, on the
    rows for which the interval is not empty."""

    stepper: Stepper
    extra_nfe_per_step: int
    on_step: Callable[[StepRecord], None] | None

    def pack(self, z: Tensor, a: Tensor) -> Tensor:
        raise NotImplementedError

    def unpack(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def solve(
        self, z: Tensor, a: Tensor, t_from: Tensor, t_to: Tensor, config: AdjointConfig, stats: _StatsSum
    ) -> Tensor:
        moving = (t_from != t_to).nonzero().squeeze(1)
        if moving.numel() == 0:
            return a
        everyone = moving.numel() == t_from.shape[0]
        pick: Callable[[Any], Any] = (
            (lambda v: v) if everyone else (lambda v: None if v is None else v.index_select(0, moving))
        )
        state = self.pack(pick(z), pick(a))
        out = _run(
            self.stepper,
            self,
            state,
            pick(t_from),
            pick(t_to),
            pick(config.rtol),
            pick(config.atol),
            config,
            pick(config.points),
            pick(config.jumps),
            self.on_step,
        )
        stats.add(moving, out, self.extra_nfe_per_step)
        new_a = self.unpack(out.ys[-1])
        return new_a if everyone else a.index_put((moving,), new_a)


class _SeminormDynamics(_Dynamics):
    """State ``[B, 2, *S]`` = (z, a); dL/dθ by quadrature over accepted steps.

    Each stage's graph is kept until its step is decided, then one batched VJP over the
    step's stages adds ``-b_i * dt * a_i · ∂f/∂θ`` for the accepted rows (rejected rows get
    weight zero). Stages the step did not evaluate itself once each (an FSAL method's first
    stage, an implicit method's iterated stages) are evaluated again.
    """

    def __init__(self, func: Func, params: list[Tensor], stepper: Stepper) -> None:
        self.func, self.params = func, params
        self.stepper = replace(stepper, norm=_pairwise(stepper.norm))  # seminorm: a stepper, never scipy
        self.grads = [torch.zeros_like(p) for p in params]
        method = stepper.method
        self.weights = [(i, b) for i, b in enumerate(method.quadrature or ()) if b != 0.0]
        self.taped = {stage: position for position, stage in enumerate(method.taped_stages)}
        self.extra_nfe_per_step = sum(1 for i, _ in self.weights if i not in self.taped) if params else 0
        self.on_step = self.quadrature if params else None
        self.tape: list[tuple[Tensor, Tensor]] = []  # (f, a) of the evaluations of the step in progress

    @staticmethod
    def pack(z: Tensor, a: Tensor) -> Tensor:
        return torch.stack([z, a], 1)

    @staticmethod
    def unpack(y: Tensor) -> Tensor:
        return y[:, 1]

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        z, a = y[:, 0], y[:, 1]
        keep_graph = bool(self.params)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            f = self.func(t, z)
            (vjp_z,) = _vjp(f, [z], a, retain_graph=keep_graph)
        if keep_graph:
            self.tape.append((f, a))
        return torch.stack([f.detach(), vjp_z.neg_()], 1)

    def quadrature(self, record: StepRecord) -> None:
        """Add the accepted rows' share of this step to dL/dθ, in one batched VJP."""
        tape, self.tape = self.tape, []
        batch = record.t.shape[0]
        taped = tape[-len(self.taped) :] if self.taped else []
        step = record.dt * record.accepted.to(record.dt.dtype)
        # A rejected row's stages may hold NaN, and NaN * 0 is NaN: then evaluate every stage
        # again with rejected rows moved to the (finite) start point. Taped evaluations of
        # another batch size (a re-evaluated first stage on some rows) do not count.
        reuse_graphs = (
            len(taped) == len(self.taped)
            and all(f.shape[0] == batch for f, _ in taped)
            and bool(record.error_finite.all())
        )
        keep = rows_of(record.accepted, record.y)
        outputs, cotangents = [], []
        with torch.enable_grad():
            for i, b in self.weights:
                if reuse_graphs and i in self.taped:
                    f, a = taped[self.taped[i]]
                else:
                    t_i = torch.where(record.accepted, record.stage_t[i], record.t)
                    y_i = torch.where(keep, record.stage_y[i], record.y)
                    f, a = self.func(t_i, y_i[:, 0]), y_i[:, 1]
                outputs.append(f)
                cotangents.append(a * rows_of(step * -b, a))
            grads = torch.autograd.grad(outputs, self.params, cotangents, allow_unused=True)
        for total, g in zip(self.grads, grads):
            if g is not None:
                total.add_(g)

    def param_grads(self) -> list[Tensor]:
        return self.grads


class _StateDynamics(_Dynamics):
    """State ``[1, 2D + P]`` = flat (z, a, dL/dθ), all in the state; the error norm is
    ``norm`` over the parts ``(t, z, a, *θ)`` (``t`` always 0: time gradients are not
    integrated here)."""

    extra_nfe_per_step = 0
    on_step = None

    def __init__(self, func: Func, params: list[Tensor], stepper: Stepper, y0: Tensor, norm: str | PartsNorm) -> None:
        self.func, self.params, self.shape = func, params, y0.shape
        size = y0[0].numel()
        self.sizes = [size, size, *(p.numel() for p in params)]
        self.shapes = [y0.shape[1:], y0.shape[1:], *(p.shape for p in params)]
        state_norm = rms_norm if stepper is None else stepper.norm
        parts_norm: PartsNorm
        if norm == "full":

            def parts_norm(parts: tuple[Tensor, ...]) -> Tensor:
                _, z, a, *thetas = parts
                values = [
                    state_norm(z[None])[0],
                    state_norm(a[None])[0],
                    *(rms_norm(th.reshape(1, -1))[0] for th in thetas),
                ]
                return torch.stack(values).amax()

        elif norm == "seminorm":

            def parts_norm(parts: tuple[Tensor, ...]) -> Tensor:
                _, z, a, *_ = parts
                return torch.maximum(state_norm(z[None])[0], state_norm(a[None])[0])

        else:
            parts_norm = cast(PartsNorm, norm)  # build checked: a callable
        self.parts_norm = parts_norm
        self.stepper = None if stepper is None else replace(stepper, norm=self._norm)
        self.theta = y0.new_zeros(sum(self.sizes[2:]))

    def _norm(self, scaled: Tensor) -> Tensor:
        parts = [part.view(shape) for part, shape in zip(scaled[0].split(self.sizes), self.shapes)]
        value = self.parts_norm((scaled.new_zeros(()), *parts))
        return torch.as_tensor(value, dtype=scaled.dtype, device=scaled.device).reshape(1)

    def pack(self, z: Tensor, a: Tensor) -> Tensor:
        return torch.cat([z.flatten(), a.flatten(), self.theta])[None]

    def unpack(self, y: Tensor) -> Tensor:
        _, a, self.theta = y[0].split([self.sizes[0], self.sizes[1], sum(self.sizes[2:])])
        return a.view(self.shape)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        z, a, _ = y[0].split([self.sizes[0], self.sizes[1], sum(self.sizes[2:])])
        with torch.enable_grad():
            z = z.view(self.shape).detach().requires_grad_(True)
            f = self.func(t, z)
            grads = _vjp(f, [z, *self.params], a.view(self.shape))
        return torch.cat([f.detach().flatten(), *(g.flatten().neg() for g in grads)])[None]

    def param_grads(self) -> list[Tensor]:
        return [g.view_as(p) for g, p in zip(self.theta.split(self.sizes[2:]), self.params)]


def _pairwise(norm: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The forward solve's norm applied to z and to a separately; the larger one counts."""

    def pairwise(scaled: Tensor) -> Tensor:
        return torch.maximum(norm(scaled[:, 0]), norm(scaled[:, 1]))

    return pairwise


def _run(
    stepper: Stepper,
    dynamics: Func,
    y: Tensor,
    t_from: Tensor,
    t_to: Tensor,
    rtol: Tensor,
    atol: Tensor,
    config: AdjointConfig,
    points: Tensor | None,
    jumps: Tensor | None,
    on_step: Callable[[StepRecord], None] | None,
) -> Trajectory:
    if config.scipy is not None:
        out = scipy_integrate(dynamics, y, t_from, t_to[:, None], rtol, atol, config.scipy)
    else:
        stops, stop_jumps = stops_between(t_from, t_to, points, jumps)
        state = stepper.init(
            dynamics, y, t_from, stops[:, 0], t_to, rtol, atol, jump=None if stop_jumps is None else stop_jumps[:, 0]
        )
        out = integrate(stepper, dynamics, state, t_to[:, None], stops, stop_jumps, on_step=on_step)
    if not bool((out.status == int(Status.SUCCESS)).all()):
        raise SolverError(out.status, context="the adjoint's backward solve failed")
    return out
