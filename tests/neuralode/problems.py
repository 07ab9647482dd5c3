"""Test problems, each with its right-hand side in torch (per sample) and in numpy for scipy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp as scipy_solve_ivp


@dataclass(frozen=True)
class Problem:
    name: str
    torch_rhs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    numpy_rhs: Callable[[float, np.ndarray], np.ndarray]
    y0: tuple[float, ...]
    t_span: tuple[float, float]

    def reference(self, t_span: tuple[float, float] | None = None, y0=None) -> np.ndarray:
        """The solution at t_span[1] by scipy's DOP853 at rtol 1e-12: the outside oracle."""
        t0, t1 = t_span or self.t_span
        sol = scipy_solve_ivp(
            self.numpy_rhs,
            (t0, t1),
            np.asarray(y0 if y0 is not None else self.y0, dtype=np.float64),
            method="DOP853",
            rtol=1e-12,
            atol=1e-14,
        )
        assert sol.success, sol.message
        return sol.y[:, -1]


def _decay(t, y):
    return -0.8 * y


def _oscillator(t, y):
    # x'' = -w^2 x with w carried in the state (constant), so a batch can mix frequencies.
    x, v, w = y[..., 0], y[..., 1], y[..., 2]
    return _stack([v, -(w**2) * x, 0 * w])


def _lotka_volterra(t, y):
    prey, predator = y[..., 0], y[..., 1]
    return _stack([1.5 * prey - prey * predator, -3.0 * predator + prey * predator])


def _van_der_pol(t, y):
    x, v = y[..., 0], y[..., 1]
    return _stack([v, 1.0 * (1 - x**2) * v - x])


def _forced(t, y):
    # Non-autonomous: exercises the per-sample time argument.
    return -y + _sin(3 * t)[..., None] * (1 + 0 * y)


def _stack(parts):
    if isinstance(parts[0], torch.Tensor):
        return torch.stack(parts, -1)
    return np.stack(parts, -1)


def _sin(t):
    return torch.sin(t) if isinstance(t, torch.Tensor) else np.sin(t)


def _np(rhs):
    return lambda t, y: rhs(np.asarray(t, dtype=np.float64), y)


PROBLEMS = [
    Problem("exponential_decay", _decay, _np(_decay), (2.0, -1.0), (0.0, 3.0)),
    Problem("harmonic_oscillator", _oscillator, _np(_oscillator), (1.0, 0.0, 2.0), (0.0, 5.0)),
    Problem("lotka_volterra", _lotka_volterra, _np(_lotka_volterra), (10.0, 5.0), (0.0, 5.0)),
    Problem("van_der_pol", _van_der_pol, _np(_van_der_pol), (2.0, 0.0), (0.0, 10.0)),
    Problem("forced_decay", _forced, _np(_forced), (1.0, 0.5), (0.0, 4.0)),
]
