"""Explicit Runge–Kutta methods as validated data.

A method is a Butcher tableau plus its order; adding a method is adding data. Tableaus are
checked once, at construction, so a typo in a coefficient fails at import instead of as a
silently wrong solution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_CONSISTENCY_TOLERANCE = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit RK method, in the standard names.

    ``a`` holds the strictly lower-triangular rows (row ``i`` has ``i`` entries, for stages
    ``1..s-1``), ``c`` the nodes of all stages (``c[0] == 0``), ``b`` the solution weights and
    ``b_err`` the weights of the embedded error estimate (``b - b_hat``), or ``None`` for a
    method without one.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None = None
    fsal: bool = field(init=False)
    """First Same As Last: the last stage is evaluated at the new point, so it is the next
    step's first stage and an accepted step costs one evaluation less."""

    def __post_init__(self) -> None:
        stages = len(self.c)
        if stages < 1 or self.c[0] != 0.0:
            raise ValueError("a tableau needs at least one stage and c[0] == 0")
        if len(self.a) != stages - 1 or any(len(row) != i + 1 for i, row in enumerate(self.a)):
            raise ValueError(f"a must have rows of lengths 1..{stages - 1}")
        if len(self.b) != stages:
            raise ValueError(f"b must have {stages} entries, one per stage")
        for i, row in enumerate(self.a, start=1):
            if not math.isclose(sum(row), self.c[i], abs_tol=_CONSISTENCY_TOLERANCE):
                raise ValueError(f"row {i} of a sums to {sum(row)!r}, but c[{i}] is {self.c[i]!r}")
        if not math.isclose(sum(self.b), 1.0, abs_tol=_CONSISTENCY_TOLERANCE):
            raise ValueError(f"b sums to {sum(self.b)!r}, not 1")
        if self.b_err is not None:
            if len(self.b_err) != stages:
                raise ValueError(f"b_err must have {stages} entries, one per stage")
            if not math.isclose(sum(self.b_err), 0.0, abs_tol=_CONSISTENCY_TOLERANCE):
                raise ValueError(f"b_err sums to {sum(self.b_err)!r}, not 0")
        fsal = stages > 1 and self.c[-1] == 1.0 and self.a[-1] == self.b[:-1] and self.b[-1] == 0.0
        object.__setattr__(self, "fsal", fsal)

    @property
    def stages(self) -> int:
        return len(self.c)



@dataclass(frozen=True)
class Method:
    """A tableau and what the step controller needs to know about it."""

    name: str
    tableau: ButcherTableau
    order: int
    error_order: int | None = None  # order of the embedded solution; None for fixed-step only
    adaptive: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adaptive", self.tableau.b_err is not None)
        if self.adaptive and self.error_order is None:
            raise ValueError(f"{self.name}: an adaptive method needs its error_order")

    @property
    def error_exponent_order(self) -> int:
        """``k`` in the controller's ``err**(-1/k)``: the local error of the lower-order
        solution scales like ``dt**(error_order + 1)``."""
        if self.error_order is None:
            raise ValueError(f"{self.name} has no error estimate; it runs with a fixed step")
        return self.error_order + 1


EULER = Method("euler", ButcherTableau(c=(0.0,), a=(), b=(1.0,)), order=1)

MIDPOINT = Method(
    "midpoint", ButcherTableau(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0)), order=2
)

RK4 = Method(
    "rk4",
    ButcherTableau(
        c=(0.0, 0.5, 0.5, 1.0),
        a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    ),
    order=4,
)

# Bogacki & Shampine (1989), order 3 with an embedded order-2 estimate, FSAL.
BOSH3 = Method(
    "bosh3",
    ButcherTableau(
        c=(0.0, 1 / 2, 3 / 4, 1.0),
        a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        b=(2 / 9, 1 / 3, 4 / 9, 0.0),
        b_err=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    ),
    order=3,
    error_order=2,
)

# Dormand & Prince (1980), order 5 with an embedded order-4 estimate, FSAL.
_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_HAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5 = Method(
    "dopri5",
    ButcherTableau(
        c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            _DOPRI5_B[:-1],
        ),
        b=_DOPRI5_B,
        b_err=tuple(b - bh for b, bh in zip(_DOPRI5_B, _DOPRI5_B_HAT)),
    ),
    order=5,
    error_order=4,
)

# Tsitouras (2011), "Runge–Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", order 5 with an embedded order-4 estimate, FSAL.
_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
)
_TSIT5_B_HAT = (
    0.09468075576583946,
    0.009183565540343253,
    0.4877705284247616,
    1.234297566930479,
    -2.707712349983525,
    1.866628418170587,
    1 / 66,
)
TSIT5 = Method(
    "tsit5",
    ButcherTableau(
        c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
        a=(
            (0.161,),
            (-0.008480655492356989, 0.335480655492357),
            (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
            (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
            (
                5.86145544294642,
                -12.92096931784711,
                8.159367898576159,
                -0.071584973281401,
                -0.028269050394068383,
            ),
            _TSIT5_B[:-1],
        ),
        b=_TSIT5_B,
        b_err=tuple(b - bh for b, bh in zip(_TSIT5_B, _TSIT5_B_HAT)),
    ),
    order=5,
    error_order=4,
)

METHODS: dict[str, Method] = {m.name: m for m in (EULER, MIDPOINT, RK4, BOSH3, DOPRI5, TSIT5)}


def get_method(name: str) -> Method:
    """Look a method up by name, with an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown method {name!r}: choose one of {known}") from None
