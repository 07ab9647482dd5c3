"""ODE solvers with per-sample step control behind one solver interface, and the adjoint."""

from .adams import Adams
from .adjoint import BackwardStats
from .controller import ConstantController, PIController, StepSizeController
from .explicit import ExplicitRK
from .implicit import ImplicitRK
from .integrate import Trajectory, integrate
from .ivp import Solution, solve_ivp
from .methods import METHODS, get_method, method_names
from .odeint import odeint, odeint_adjoint, odeint_event
from .scipy_solve import ScipyMethod
from .solver import Solver
from .state import SolverState, StepRecord
from .status import SolverError, Status
from .stepper import Norm, StepCallbacks, Stepper, rms_norm
from .tableau import ButcherTableau, ImplicitTableau

__all__ = [
    "METHODS",
    "Adams",
    "BackwardStats",
    "ButcherTableau",
    "ConstantController",
    "ExplicitRK",
    "ImplicitRK",
    "ImplicitTableau",
    "Norm",
    "PIController",
    "ScipyMethod",
    "Solution",
    "Solver",
    "SolverError",
    "SolverState",
    "Status",
    "StepCallbacks",
    "StepRecord",
    "StepSizeController",
    "Stepper",
    "Trajectory",
    "get_method",
    "integrate",
    "method_names",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "rms_norm",
    "solve_ivp",
]
