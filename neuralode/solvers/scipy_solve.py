"""The scipy wrapper: each sample handed whole to ``scipy.integrate.solve_ivp``.

Not a stepping method (scipy's solvers keep their state in Python objects, not in rows of a
tensor), so it cannot join the server's batches, call step callbacks or serve the seminorm
adjoint; it is a reference, and a way to use scipy's stiff solvers (Radau, BDF, LSODA).
Samples are solved one after the other, in float64, without gradients.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .integrate import Trajectory
from .solver import Func
from .status import Status

SCIPY_SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


@dataclass(frozen=True)
class ScipyMethod:
    """``method="scipy_solver"`` with its options (torchdiffeq's names)."""

    solver: str = "LSODA"
    min_step: float = 0.0
    max_step: float = math.inf
    name = "scipy_solver"

    def __post_init__(self) -> None:
        if self.solver not in SCIPY_SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SCIPY_SOLVERS)}, got {self.solver!r}")
        if not 0.0 <= self.min_step <= self.max_step or not self.max_step > 0.0:
            raise ValueError(f"need 0 <= min_step <= max_step and max_step > 0, got {self.min_step}, {self.max_step}")


def scipy_integrate(
    func: Func, y0: Tensor, t0: Tensor, times: Tensor, rtol: Tensor, atol: Tensor, method: ScipyMethod
) -> Trajectory:
    """Each row of ``y0`` from ``t0`` through ``times`` (``[B, T]``, last column the end)."""
    try:
        from scipy.integrate import solve_ivp as scipy_solve_ivp
    except ImportError as error:  # scipy is not a dependency of the core
        raise ImportError("method 'scipy_solver' needs scipy: pip install scipy") from error
    batch, n_times = times.shape
    shape, dtype, device = y0.shape[1:], y0.dtype, y0.device
    ys = torch.full((n_times, batch, *shape), math.nan, dtype=dtype, device=device)
    t_reached = torch.empty(batch, dtype=dtype, device=device)
    nfe = torch.zeros(batch, dtype=torch.int64, device=device)
    status = torch.full((batch,), int(Status.SUCCESS), dtype=torch.int64, device=device)
    options = {"max_step": method.max_step}
    if method.min_step > 0.0:
        options["min_step"] = method.min_step
    for row in range(batch):

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            t_row = torch.full((1,), t, dtype=dtype, device=device)
            y_row = torch.as_tensor(y, dtype=dtype, device=device).view(1, *shape)
            with torch.no_grad():
                return func(t_row, y_row).reshape(-1).double().cpu().numpy()

        t_eval = times[row].detach().double().cpu().numpy()
        solution = scipy_solve_ivp(
            rhs,
            (float(t0[row]), float(t_eval[-1])),
            y0[row].detach().reshape(-1).double().cpu().numpy(),
            method=method.solver,
            t_eval=t_eval,
            rtol=float(rtol[row]),
            atol=float(atol[row]),
            **options,
        )
        reached = solution.y.shape[1]
        values = torch.as_tensor(solution.y.T, dtype=dtype, device=device).view(reached, *shape)
        ys[:reached, row] = values
        nfe[row] = solution.nfev
        if solution.success:
            t_reached[row] = times[row, -1]
        else:
            warnings.warn(f"scipy_solver ({method.solver}) failed on sample {row}: {solution.message}", stacklevel=3)
            status[row] = int(Status.STEP_SIZE_UNDERFLOW)
            t_reached[row] = float(solution.t[-1]) if reached else t0[row]
            ys[-1, row] = values[-1] if reached else y0[row]
    zeros = torch.zeros_like(nfe)
    return Trajectory(ys=ys, t_reached=t_reached, nfe=nfe, steps=zeros, rejected=zeros.clone(), status=status)
