"""odeserve's core: Neural ODE solvers and models. Depends on torch only."""

from .solvers import (
    PIController,
    Solution,
    SolverError,
    Status,
    odeint,
    odeint_adjoint,
    odeint_event,
    solve_ivp,
)

__all__ = ["PIController", "Solution", "SolverError", "Status", "odeint", "odeint_adjoint", "odeint_event", "solve_ivp"]
