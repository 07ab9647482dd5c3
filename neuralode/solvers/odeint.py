"""torchdiffeq-compatible entry points: switch with one import.

``odeint(func, y0, t)`` treats ``y0`` as one system (one step size and one RMS error norm for
the whole tensor), exactly like torchdiffeq; it is :func:`solve_ivp` on a batch of one. For
per-sample step control along a batch dimension, use :func:`solve_ivp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .integrate import solve_ivp
from .stepper import DEFAULT_MAX_STEPS

_OPTIONS = {"step_size", "first_step", "max_num_steps"}
_ADJOINT_OPTIONS = _OPTIONS | {"norm"}


def odeint(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t: Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str = "dopri5",
    options: dict | None = None,
) -> Tensor:
    """Solve ``dy/dt = func(t, y)`` (``t`` a scalar tensor) and return the states at the 1-D
    times ``t`` (increasing or decreasing), shaped ``[len(t), *y0.shape]``. Raises
    :class:`SolverError` if the solve fails. Options: ``step_size`` (fixed-step methods),
    ``first_step``, ``max_num_steps``."""
    return _odeint(func, y0, t, rtol, atol, method, options, adjoint=None)


def odeint_adjoint(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t: Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str = "dopri5",
    options: dict | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
    adjoint_params: Iterable[Tensor] | None = None,
) -> Tensor:
    """:func:`odeint` with gradients by the adjoint method, in memory independent of the
    number of steps. ``adjoint_params`` defaults to ``func.parameters()``; parameters are
    under error control unless ``adjoint_options={"norm": "seminorm"}``."""
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError("func must be an nn.Module, or adjoint_params must be given")
    adjoint_options = dict(adjoint_options or {})
    _check_options(adjoint_options, _ADJOINT_OPTIONS, "adjoint_options")
    if set(adjoint_options) - {"norm"}:
        raise ValueError("adjoint_options: only 'norm' is supported; the backward solve uses the forward options")
    adjoint = dict(
        adjoint_params=tuple(func.parameters() if adjoint_params is None else adjoint_params),
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_norm=adjoint_options.get("norm", "full"),
    )
    return _odeint(func, y0, t, rtol, atol, method, options, adjoint=adjoint)


def _odeint(func, y0, t, rtol, atol, method, options, adjoint: dict | None) -> Tensor:
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
    t = torch.as_tensor(t, dtype=y0.dtype if y0.is_floating_point() else None, device=y0.device)
    if t.dim() != 1 or t.shape[0] == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor of output times, got shape {tuple(t.shape)}")
    options = dict(options or {})
    _check_options(options, _OPTIONS, "options")
    if t.shape[0] == 1:
        return y0[None]

    def batched(t_batch: Tensor, y_batch: Tensor) -> Tensor:
        return func(t_batch[0], y_batch[0])[None]

    solution = solve_ivp(
        batched,
        y0[None],
        (t[0], t[-1]),
        t_eval=t[1:],
        method=method,
        rtol=rtol,
        atol=atol,
        step_size=options.get("step_size"),
        first_step=options.get("first_step"),
        max_steps=options.get("max_num_steps", DEFAULT_MAX_STEPS),
        adjoint=adjoint is not None,
        **(adjoint or {}),
    ).raise_for_status()
    return torch.cat([y0[None], solution.ys[:, 0]], 0)


def _check_options(options: dict, known: set[str], name: str) -> None:
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"{name}: unknown {sorted(unknown)}; known are {sorted(known)}")
