"""The adjoint method (Chen et al. 2018, Algorithm 1), per sample.

The forward solve keeps only the states at the output times. Backward, from the last output
time to t0, integrates the augmented system

    dz/dt = f(z, t),    da/dt = -a·∂f/∂z,    d(dL/dθ)/dt = -a·∂f/∂θ

with vector–Jacobian products, so memory does not grow with the number of steps. At each
output time the incoming cotangent is added to ``a`` and ``z`` is reset to the forward value.

Two ways to carry dL/dθ:

``norm="seminorm"`` (any batch size): θ is left out of the state and out of error control
(Kidger et al. 2021, "Hey, that's not an ODE"). The integral is a quadrature over the
accepted steps with the method's own weights: after each step the stages are evaluated once
more and a single batched vector–Jacobian product, whose cotangents carry each sample's
``b_i * dt`` (zero for rejected samples), adds them. No per-sample copy of dL/dθ is made.

``norm="full"`` (one sample, which is what ``odeint_adjoint`` solves): θ joins the state and
its error counts, as in torchdiffeq's default; the norm is the largest RMS of the parts z, a, θ.

Per-sample solving is sound only when f treats samples independently (no BatchNorm or
anything else that mixes rows); the adjoint needs it as much as the forward solve does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .integrate import BackwardStats, Problem, Trajectory, integrate
from .state import StepRecord
from .status import SolverError, Status
from .stepper import Func, Norm, Stepper, _rows, rms_norm
from .tableau import get_method

NORMS = ("seminorm", "full")


@dataclass(frozen=True)
class AdjointConfig:
    params: tuple[Tensor, ...]
    stepper: Stepper  # for the backward solve
    rtol: Tensor  # [B]
    atol: Tensor  # [B]
    norm: str
    stats: BackwardStats

    @staticmethod
    def build(
        func: Func,
        forward: Stepper,
        problem: Problem,
        *,
        adjoint_params: Iterable[Tensor] | None,
        method: str | None,
        rtol: float | Tensor | None,
        atol: float | Tensor | None,
        norm: str,
        stats: BackwardStats,
    ) -> AdjointConfig:
        if norm not in NORMS:
            raise ValueError(f"adjoint norm must be one of {NORMS}, got {norm!r}")
        batch = problem.y0.shape[0]
        if norm == "full" and batch != 1:
            raise ValueError(
                "adjoint norm 'full' puts dL/dθ under error control, which needs one shared "
                f"step sequence; it supports a single sample, got {batch}. Use 'seminorm'."
            )
        if adjoint_params is None:
            params = tuple(func.parameters()) if isinstance(func, nn.Module) else ()
        else:
            params = tuple(adjoint_params)
        backward_method = forward.method if method is None else get_method(method)
        stepper = replace(forward, method=backward_method)

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
        )


def adjoint_solve(func: Func, stepper: Stepper, problem: Problem, config: AdjointConfig) -> Trajectory:
    first_step = problem.first_step
    stops, t_reached, nfe, steps, rejected, status = _AdjointSolve.apply(
        func, stepper, config, first_step, problem.max_nfe, problem.rtol, problem.atol,
        problem.y0, problem.t0, problem.schedule, *config.params,
    )  # fmt: skip
    return Trajectory(stops, t_reached, nfe, steps, rejected, status)


class _AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, stepper, config, first_step, max_nfe, rtol, atol, y0, t0, schedule, *params):
        with torch.no_grad():
            state = stepper.init(
                func, y0, t0, schedule[:, 0], schedule[:, -1], rtol, atol, first_step=first_step, max_nfe=max_nfe
            )
            out = integrate(stepper, func, state, schedule)
        ctx.func, ctx.config = func, config
        ctx.save_for_backward(y0, t0, schedule, out.stops, out.status, *params)
        ctx.mark_non_differentiable(out.t_reached, out.nfe, out.steps, out.rejected, out.status)
        return out.stops, out.t_reached, out.nfe, out.steps, out.rejected, out.status

    @staticmethod
    def backward(ctx, grad_stops, *_):
        func, config = ctx.func, ctx.config
        y0, t0, schedule, stops, status, *params = ctx.saved_tensors
        if not bool((status == int(Status.SUCCESS)).all()):
            raise SolverError(status, context="cannot backpropagate through a failed forward solve")
        needs_t = ctx.needs_input_grad[8] or ctx.needs_input_grad[9]
        trainable = [p for p, needs in zip(params, ctx.needs_input_grad[10:]) if needs]

        dynamics_type = _FullNormDynamics if config.norm == "full" else _SeminormDynamics
        dynamics = dynamics_type(func, trainable, config.stepper, y0)
        batch, n_stops = schedule.shape
        stats = _StatsSum(batch, y0.device)
        grad_schedule = torch.zeros_like(schedule) if needs_t else None
        a = torch.zeros_like(y0)
        with torch.no_grad():
            for k in reversed(range(n_stops)):
                a = a + grad_stops[k]
                if needs_t:
                    grad_schedule[:, k] = _dot(grad_stops[k], func(schedule[:, k], stops[k]))
                    stats.nfe += 1
                t_to = schedule[:, k - 1] if k else t0
                a = dynamics.solve(stops[k], a, schedule[:, k], t_to, config, stats)
            grad_t0 = None
            if needs_t:
                grad_t0 = -_dot(a, func(t0, y0))
                stats.nfe += 1
        stats.publish(config.stats)

        param_grads = iter(dynamics.param_grads())
        grads_params = [next(param_grads) if needs else None for needs in ctx.needs_input_grad[10:]]
        return (None,) * 7 + (a, grad_t0, grad_schedule, *grads_params)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).flatten(1).sum(1)


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

    def add(self, trajectory: Trajectory, extra_nfe_per_step: int) -> None:
        attempts = trajectory.steps + trajectory.rejected
        self.nfe = self.nfe + trajectory.nfe + extra_nfe_per_step * attempts
        self.steps = self.steps + trajectory.steps
        self.rejected = self.rejected + trajectory.rejected

    def publish(self, into: BackwardStats) -> None:
        into.nfe, into.steps, into.rejected = self.nfe, self.steps, self.rejected


class _SeminormDynamics:
    """State ``[B, 2, *S]`` = (z, a); dL/dθ by quadrature over accepted steps.

    Each stage's graph is kept until its step is decided, then one batched VJP over the
    step's stages adds ``-b_i * dt * a_i · ∂f/∂θ`` for the accepted rows (rejected rows get
    weight zero). Only the first stage of an FSAL method, computed in an earlier step, is
    evaluated again.
    """

    def __init__(self, func: Func, params: list[Tensor], stepper: Stepper, y0: Tensor) -> None:
        self.func, self.params = func, params
        self.stepper = replace(stepper, norm=_pairwise(stepper.norm))
        self.grads = [torch.zeros_like(p) for p in params]
        self.weights = [(i, b) for i, b in enumerate(stepper.method.tableau.b) if b != 0.0]
        self.first_taped_stage = stepper.method.tableau.stages - self.stepper.evaluations_per_step
        self.tape: list[tuple[Tensor, Tensor]] = []  # (f, a) of the stages of the step in progress

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
        taped = self.tape[-self.stepper.evaluations_per_step :]
        self.tape = []
        start_t, start_y = record.stage_t[0], record.stage_y[0]
        step = record.dt * record.accepted.to(record.dt.dtype)
        # A rejected row's stages may hold NaN, and NaN * 0 is NaN: then evaluate every stage
        # again with rejected rows moved to the (finite) start point.
        reuse_graphs = bool(record.error_finite.all())
        keep = _rows(record.accepted, start_y)
        outputs, cotangents = [], []
        with torch.enable_grad():
            for i, b in self.weights:
                if reuse_graphs and i >= self.first_taped_stage:
                    f, a = taped[i - self.first_taped_stage]
                else:
                    t_i = torch.where(record.accepted, record.stage_t[i], start_t) if i else start_t
                    y_i = torch.where(keep, record.stage_y[i], start_y) if i else start_y
                    f, a = self.func(t_i, y_i[:, 0]), y_i[:, 1]
                outputs.append(f)
                cotangents.append(a * _rows(step * -b, a))
            grads = torch.autograd.grad(outputs, self.params, cotangents, allow_unused=True)
        for total, g in zip(self.grads, grads):
            if g is not None:
                total.add_(g)

    def solve(self, z: Tensor, a: Tensor, t_from: Tensor, t_to: Tensor, config: AdjointConfig, stats: _StatsSum) -> Tensor:
        out = _run(self.stepper, self, torch.stack([z, a], 1), t_from, t_to, config,
                   self.quadrature if self.params else None)  # fmt: skip
        stats.add(out, 1 if self.params and self.first_taped_stage else 0)
        return out.stops[-1][:, 1]

    def param_grads(self) -> list[Tensor]:
        return self.grads


class _FullNormDynamics:
    """State ``[1, 2D + P]`` = flat (z, a, dL/dθ), all under error control."""

    def __init__(self, func: Func, params: list[Tensor], stepper: Stepper, y0: Tensor) -> None:
        self.func, self.params, self.shape = func, params, y0.shape
        size = y0.numel()
        self.sizes = [size, size, sum(p.numel() for p in params)]
        self.stepper = replace(stepper, norm=self._norm)
        self.state_norm = stepper.norm
        self.theta = y0.new_zeros(self.sizes[2])

    def _norm(self, scaled: Tensor) -> Tensor:
        z, a, theta = scaled.split(self.sizes, dim=1)
        parts = [self.state_norm(z.view(self.shape)), self.state_norm(a.view(self.shape))]
        if theta.shape[1]:
            parts.append(rms_norm(theta))
        return torch.stack(parts).amax(0)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        z, a, _ = y[0].split(self.sizes)
        with torch.enable_grad():
            z = z.view(self.shape).detach().requires_grad_(True)
            f = self.func(t, z)
            grads = _vjp(f, [z, *self.params], a.view(self.shape))
        return torch.cat([f.detach().flatten(), *(g.flatten().neg() for g in grads)])[None]

    def solve(self, z: Tensor, a: Tensor, t_from: Tensor, t_to: Tensor, config: AdjointConfig, stats: _StatsSum) -> Tensor:
        y = torch.cat([z.flatten(), a.flatten(), self.theta])[None]
        out = _run(self.stepper, self, y, t_from, t_to, config, None)
        stats.add(out, 0)
        _, a, self.theta = out.stops[-1][0].split(self.sizes)
        return a.view(self.shape)

    def param_grads(self) -> list[Tensor]:
        return [g.view_as(p) for g, p in zip(self.theta.split([p.numel() for p in self.params]), self.params)]


def _pairwise(norm: Norm) -> Norm:
    """The forward solve's norm applied to z and to a separately; the larger one counts."""

    def pairwise(scaled: Tensor) -> Tensor:
        return torch.maximum(norm(scaled[:, 0]), norm(scaled[:, 1]))

    return pairwise


def _run(stepper: Stepper, dynamics: Func, y: Tensor, t_from: Tensor, t_to: Tensor,
         config: AdjointConfig, on_step) -> Trajectory:  # fmt: skip
    state = stepper.init(dynamics, y, t_from, t_to, t_to, config.rtol, config.atol)
    out = integrate(stepper, dynamics, state, t_to[:, None], on_step)
    if not bool((out.status == int(Status.SUCCESS)).all()):
        raise SolverError(out.status, context="the adjoint's backward solve failed")
    return out
