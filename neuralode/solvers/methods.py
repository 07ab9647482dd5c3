"""The registry of methods: every name a solve may ask for, and the solver behind it."""

from __future__ import annotations

from .adams import Adams
from .explicit import ExplicitRK
from .implicit import ImplicitRK
from .solver import Solver
from .tableau import (
    ADAPTIVE_HEUN_TABLEAU,
    BOSH3_TABLEAU,
    DOPRI5_TABLEAU,
    DOPRI8_TABLEAU,
    EULER_TABLEAU,
    FEHLBERG2_TABLEAU,
    GL4_TABLEAU,
    GL6_TABLEAU,
    HEUN2_TABLEAU,
    HEUN3_TABLEAU,
    IMPLICIT_EULER_TABLEAU,
    IMPLICIT_MIDPOINT_TABLEAU,
    MIDPOINT_TABLEAU,
    RADAU_IIA3_TABLEAU,
    RADAU_IIA5_TABLEAU,
    RK4_TABLEAU,
    SDIRK2_TABLEAU,
    TRAPEZOID_TABLEAU,
    TRBDF2_TABLEAU,
    TSIT5_TABLEAU,
)

SCIPY_METHOD = "scipy_solver"
"""Not a stepping method: :func:`~.scipy_solve.scipy_solve` hands each sample to
``scipy.integrate.solve_ivp`` whole."""

METHODS: dict[str, Solver] = {
    solver.name: solver
    for solver in (
        ExplicitRK("euler", EULER_TABLEAU, order=1),
        ExplicitRK("midpoint", MIDPOINT_TABLEAU, order=2),
        ExplicitRK("heun2", HEUN2_TABLEAU, order=2),
        ExplicitRK("heun3", HEUN3_TABLEAU, order=3),
        ExplicitRK("rk4", RK4_TABLEAU, order=4),
        ExplicitRK("adaptive_heun", ADAPTIVE_HEUN_TABLEAU, order=2, error_order=1),
        ExplicitRK("fehlberg2", FEHLBERG2_TABLEAU, order=2, error_order=1),
        ExplicitRK("bosh3", BOSH3_TABLEAU, order=3, error_order=2),
        ExplicitRK("dopri5", DOPRI5_TABLEAU, order=5, error_order=4),
        ExplicitRK("tsit5", TSIT5_TABLEAU, order=5, error_order=4),
        ExplicitRK("dopri8", DOPRI8_TABLEAU, order=8, error_order=7),
        Adams("explicit_adams", implicit=False),
        Adams("implicit_adams", implicit=True),
        ImplicitRK("implicit_euler", IMPLICIT_EULER_TABLEAU, order=1),
        ImplicitRK("implicit_midpoint", IMPLICIT_MIDPOINT_TABLEAU, order=2),
        ImplicitRK("trapezoid", TRAPEZOID_TABLEAU, order=2),
        ImplicitRK("radauIIA3", RADAU_IIA3_TABLEAU, order=3),
        ImplicitRK("gl4", GL4_TABLEAU, order=4),
        ImplicitRK("radauIIA5", RADAU_IIA5_TABLEAU, order=5),
        ImplicitRK("gl6", GL6_TABLEAU, order=6),
        ImplicitRK("sdirk2", SDIRK2_TABLEAU, order=2),
        ImplicitRK("trbdf2", TRBDF2_TABLEAU, order=2),
    )
}

ALIASES = {"fixed_adams": "implicit_adams"}
"""torchdiffeq's older names."""


def method_names() -> list[str]:
    """Every name ``solve_ivp`` and ``odeint`` accept."""
    return sorted([*METHODS, *ALIASES, SCIPY_METHOD])


def get_method(name: str | Solver | None) -> Solver:
    """Look a stepping method up by name (``None``: dopri5), with an error that lists them."""
    if isinstance(name, Solver):
        return name
    key = "dopri5" if name is None else ALIASES.get(name, name)
    try:
        return METHODS[key]
    except (KeyError, TypeError):
        if name == SCIPY_METHOD:
            raise ValueError(f"{SCIPY_METHOD} integrates whole solves, not steps: use solve_ivp or odeint") from None
        known = ", ".join(method_names())
        raise ValueError(f"unknown method {name!r}: choose one of {known}") from None
