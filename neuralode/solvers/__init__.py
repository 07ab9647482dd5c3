"""Explicit Runge–Kutta solvers with per-sample step control, and the adjoint method."""

from .controller import PIController
from .integrate import BackwardStats, Solution, Trajectory, integrate, solve_ivp
from .odeint import odeint, odeint_adjoint
from .state import SolverState, StepRecord
from .status import SolverError, Status
from .stepper import Stepper, rms_norm
from .tableau import METHODS, ButcherTableau, Method, get_method

__all__ = [
    "METHODS",
    "BackwardStats",
    "ButcherTableau",
    "Method",
    "PIController",
    "Solution",
    "SolverError",
    "SolverState",
    "Status",
    "StepRecord",
    "Stepper",
    "Trajectory",
    "get_method",
    "integrate",
    "odeint",
    "odeint_adjoint",
    "rms_norm",
    "solve_ivp",
]
