"""Validated per-sample inputs, and the stops steps must land on.

Bad input raises here, once, with a message naming the argument (and the first offending
sample); the solver itself then only deals with well-formed ``[B]`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .solver import per_row

Tolerance = float | Tensor


@dataclass(frozen=True)
class Problem:
    """Everything as ``[B]`` (or ``[B, T]``) tensors on y0's device and dtype. Time tensors
    keep their autograd history."""

    y0: Tensor
    t0: Tensor
    times: Tensor  # [B, T] output times; the last column is t1
    n_eval: int  # leading columns of times that are user-requested outputs
    rtol: Tensor
    atol: Tensor
    first_step: Tensor | None
    max_nfe: Tensor | None
    points: Tensor | None = None  # [B, P] times steps must end on (step_t and jump_t)
    jumps: Tensor | None = None  # [B, P] bool: which points are discontinuities of func

    @property
    def t1(self) -> Tensor:
        return self.times[:, -1]


def stops_between(
    t_from: Tensor, t_to: Tensor, points: Tensor | None, jumps: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Each row's landing points strictly between ``t_from`` and ``t_to``, in the direction of
    integration, then ``t_to``: ``[B, S]`` (rows padded with ``t_to``), and whether each is a
    discontinuity (``None`` when none is). Among equal times a discontinuity comes first, so
    the first stop beyond a time carries its flag."""
    end = t_to[:, None]
    if points is None:
        return end, None
    direction = torch.sign(t_to - t_from)[:, None]
    along = direction * points
    inside = (along > direction * t_from[:, None]) & (along < direction * end)
    values = torch.where(inside, points, end.expand_as(points))
    flags = jumps & inside if jumps is not None else None
    if flags is not None:
        first = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)
        values, flags = values.gather(1, first), flags.gather(1, first)
    order = torch.argsort(direction * values, dim=1, stable=True)
    values = torch.cat([values.gather(1, order), end], 1)
    if flags is None or not bool(flags.any()):
        return values, None
    return values, torch.cat([flags.gather(1, order), torch.zeros_like(end, dtype=torch.bool)], 1)


def prepare_problem(
    y0: Tensor,
    t_span: tuple[float | Tensor, float | Tensor],
    t_eval: Tensor | None,
    rtol: Tolerance,
    atol: Tolerance,
    first_step: float | Tensor | None,
    max_nfe: int | Tensor | None,
    *,
    step_t: Tensor | None = None,
    jump_t: Tensor | None = None,
    unbounded: bool = False,
) -> Problem:
    """``unbounded`` allows an infinite t1 (a solve that only an event ends)."""
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise ValueError(f"y0 must have a floating-point dtype, got {y0.dtype}")
    if y0.dim() < 1 or y0.shape[0] == 0:
        raise ValueError(f"y0 must have shape [B, ...] with B >= 1 samples, got {tuple(y0.shape)}")
    if not bool(torch.isfinite(y0).all()):
        bad = int(torch.isfinite(per_row(y0)).all(1).logical_not().nonzero()[0])
        raise ValueError(f"y0 contains NaN or Inf (first at sample {bad})")
    batch = y0.shape[0]

    def per_sample(value, name: str, *, positive: bool, infinite: bool = False) -> Tensor:
        tensor = torch.as_tensor(value, dtype=y0.dtype, device=y0.device)
        if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.shape[0] != batch):
            raise ValueError(f"{name} must be a number or a tensor of shape [{batch}], got shape {tuple(tensor.shape)}")
        tensor = tensor.expand(batch)
        bad = torch.isnan(tensor) if infinite else ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite, got {_first_bad(tensor, bad)}")
        if positive and not bool((tensor > 0).all()):
            raise ValueError(f"{name} must be > 0, got {_first_bad(tensor, tensor <= 0)}")
        return tensor

    if not (isinstance(t_span, (tuple, list)) and len(t_span) == 2):
        raise ValueError("t_span must be a pair (t0, t1)")
    t0 = per_sample(t_span[0], "t_span[0]", positive=False)
    t1 = per_sample(t_span[1], "t_span[1]", positive=False, infinite=unbounded)
    if not bool((t0 != t1).all()):
        raise ValueError(f"t_span must have t0 != t1 (sample {int((t0 == t1).nonzero()[0])} has t0 == t1)")
    direction = torch.sign(t1 - t0)

    times, n_eval = t1[:, None], 0
    if t_eval is not None:
        t_eval = _times(t_eval, "t_eval", y0, batch)
        along = direction[:, None] * t_eval
        if not bool((along.diff(dim=1) > 0).all()):
            raise ValueError("t_eval must be strictly monotone in the direction of integration")
        if not bool((along[:, 0] > direction * t0).all()):
            raise ValueError("t_eval must lie strictly after t0 (y0 is the state at t0)")
        if not bool((along[:, -1] <= direction * t1).all()):
            raise ValueError("t_eval must not go beyond t1")
        n_eval = t_eval.shape[1]
        times = t_eval if bool((t_eval[:, -1] == t1).all()) else torch.cat([t_eval, t1[:, None]], 1)

    points, jumps = landing_points(step_t, jump_t, y0)

    first = None if first_step is None else per_sample(first_step, "first_step", positive=True)
    budget = None
    if max_nfe is not None:
        budget = torch.as_tensor(max_nfe, dtype=torch.int64, device=y0.device).expand(batch)
        if not bool((budget >= 1).all()):
            raise ValueError(f"max_nfe must be >= 1, got {int(budget.min())}")
    return Problem(
        y0=y0,
        t0=t0,
        times=times,
        n_eval=n_eval,
        rtol=per_sample(rtol, "rtol", positive=True),
        atol=per_sample(atol, "atol", positive=True),
        first_step=first,
        max_nfe=budget,
        points=points,
        jumps=jumps,
    )


def landing_points(step_t: Tensor | None, jump_t: Tensor | None, y0: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``step_t`` and ``jump_t`` (each ``[P]`` or ``[B, P]``) as one ``[B, P]`` tensor of times
    steps must end on, and which of them are discontinuities (``None`` without any)."""
    if step_t is None and jump_t is None:
        return None, None
    batch = y0.shape[0]
    parts = [_times(v, name, y0, batch) for v, name in ((jump_t, "jump_t"), (step_t, "step_t")) if v is not None]
    points = torch.cat(parts, 1).detach()
    jumps = None
    if jump_t is not None:
        jumps = torch.zeros_like(points, dtype=torch.bool)
        jumps[:, : parts[0].shape[1]] = True
    return points, jumps


def _times(value, name: str, y0: Tensor, batch: int) -> Tensor:
    """``[T]`` or ``[B, T]`` finite times as ``[B, T]``."""
    tensor = torch.as_tensor(value, dtype=y0.dtype, device=y0.device)
    if tensor.dim() == 1:
        tensor = tensor.expand(batch, -1)
    if tensor.dim() != 2 or tensor.shape[0] != batch or tensor.shape[1] == 0:
        raise ValueError(f"{name} must have shape [T] or [{batch}, T] with T >= 1, got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite")
    return tensor


def _first_bad(values: Tensor, bad: Tensor) -> str:
    index = int(bad.nonzero()[0])
    return f"{float(values[index])} (sample {index})"
