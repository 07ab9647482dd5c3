"""Runge–Kutta methods as validated data.

A Runge–Kutta method is a Butcher tableau plus its order; adding one is adding data. Tableaus
are checked once, at construction, so a typo in a coefficient fails at import instead of as a
silently wrong solution. Explicit tableaus may carry their continuous extension (dense
output) as polynomial weights; implicit tableaus have a full ``a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_CONSISTENCY_TOLERANCE = 1e-12

Polynomial = tuple[float, ...]
"""Coefficients of ``θ, θ², …`` (no constant term): a stage's weight along the step."""


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit RK method, in the standard names.

    ``a`` holds the strictly lower-triangular rows (row ``i`` has ``i`` entries, for stages
    ``1..s-1``), ``c`` the nodes of all stages (``c[0] == 0``), ``b`` the solution weights and
    ``b_err`` the weights of the embedded error estimate (``b - b_hat``), or ``None`` for a
    method without one. ``b_dense`` is the method's own continuous extension, one polynomial
    per stage: ``y(t0 + θh) = y0 + h Σ_i b_i(θ) k_i`` with ``b_i(1) == b[i]``; without it,
    dense output is Hermite interpolation (see :meth:`.explicit.ExplicitRK.interpolate`).
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None = None
    b_dense: tuple[Polynomial, ...] | None = None
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
        _check_weights(self.b, self.b_err, stages)
        if self.b_dense is not None:
            if len(self.b_dense) != stages:
                raise ValueError(f"b_dense must have {stages} polynomials, one per stage")
            for i, (poly, b) in enumerate(zip(self.b_dense, self.b)):
                if not math.isclose(sum(poly), b, abs_tol=1e-10):
                    raise ValueError(f"b_dense[{i}](1) is {sum(poly)!r}, but b[{i}] is {b!r}")
        fsal = stages > 1 and self.c[-1] == 1.0 and self.a[-1] == self.b[:-1] and self.b[-1] == 0.0
        object.__setattr__(self, "fsal", fsal)

    @property
    def stages(self) -> int:
        return len(self.c)


@dataclass(frozen=True)
class ImplicitTableau:
    """An implicit RK method: ``a`` is a full ``s × s`` matrix (rows sum to ``c``).

    Stages whose row of ``a`` is all zero are explicit (evaluated at ``y0``); the others are
    unknowns of one nonlinear system per step.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        stages = len(self.c)
        if stages < 1 or len(self.a) != stages or any(len(row) != stages for row in self.a):
            raise ValueError(f"a must be a {stages} x {stages} matrix")
        for i, row in enumerate(self.a):
            if not math.isclose(sum(row), self.c[i], abs_tol=_CONSISTENCY_TOLERANCE):
                raise ValueError(f"row {i} of a sums to {sum(row)!r}, but c[{i}] is {self.c[i]!r}")
        _check_weights(self.b, None, stages)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def implicit_stages(self) -> tuple[int, ...]:
        return tuple(i for i, row in enumerate(self.a) if any(row))


def _check_weights(b: tuple[float, ...], b_err: tuple[float, ...] | None, stages: int) -> None:
    if len(b) != stages:
        raise ValueError(f"b must have {stages} entries, one per stage")
    if not math.isclose(sum(b), 1.0, abs_tol=_CONSISTENCY_TOLERANCE):
        raise ValueError(f"b sums to {sum(b)!r}, not 1")
    if b_err is not None:
        if len(b_err) != stages:
            raise ValueError(f"b_err must have {stages} entries, one per stage")
        if not math.isclose(sum(b_err), 0.0, abs_tol=_CONSISTENCY_TOLERANCE):
            raise ValueError(f"b_err sums to {sum(b_err)!r}, not 0")


# ---- dense output as stage weights -------------------------------------------------------------
def _poly_add(*terms: tuple[float, Polynomial]) -> Polynomial:
    degree = max(len(p) for _, p in terms)
    return tuple(sum(w * (p[j] if j < len(p) else 0.0) for w, p in terms) for j in range(degree))


def _expand(scale: float, *roots_and_quadratics: tuple[float, ...], theta_power: int) -> Polynomial:
    """``scale · θ^theta_power · Π factors`` in the power basis, factors given by their
    coefficients in increasing powers (``(-r, 1)`` is ``θ - r``)."""
    poly = [0.0] * theta_power + [scale]
    for factor in roots_and_quadratics:
        product = [0.0] * (len(poly) + len(factor) - 1)
        for i, p in enumerate(poly):
            for j, q in enumerate(factor):
                product[i + j] += p * q
        poly = product
    return tuple(poly[1:])  # no constant term


# ---- explicit methods --------------------------------------------------------------------------
EULER_TABLEAU = ButcherTableau(c=(0.0,), a=(), b=(1.0,))
MIDPOINT_TABLEAU = ButcherTableau(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0))
HEUN2_TABLEAU = ButcherTableau(c=(0.0, 1.0), a=((1.0,),), b=(0.5, 0.5))
HEUN3_TABLEAU = ButcherTableau(c=(0.0, 1 / 3, 2 / 3), a=((1 / 3,), (0.0, 2 / 3)), b=(1 / 4, 0.0, 3 / 4))
RK4_TABLEAU = ButcherTableau(
    c=(0.0, 0.5, 0.5, 1.0),
    a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
)
# Kutta's 3/8 rule: the fourth-order method the Adams methods start with.
RK4_38_TABLEAU = ButcherTableau(
    c=(0.0, 1 / 3, 2 / 3, 1.0),
    a=((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
)

# Heun's method with Euler embedded: order 2, error estimate of order 1.
ADAPTIVE_HEUN_TABLEAU = ButcherTableau(c=(0.0, 1.0), a=((1.0,),), b=(0.5, 0.5), b_err=(-0.5, 0.5))

# Fehlberg (1969), the RK1(2) pair, propagating the second-order solution as torchdiffeq does
# (more accurate per evaluation than the first-order one). Its error estimate is the
# first-order solution's, which this pair makes unusually small: at loose tolerances the
# actual error can exceed the tolerance.
FEHLBERG2_TABLEAU = ButcherTableau(
    c=(0.0, 1 / 2, 1.0),
    a=((1 / 2,), (1 / 256, 255 / 256)),
    b=(1 / 512, 255 / 256, 1 / 512),
    b_err=(1 / 512 - 1 / 256, 0.0, 1 / 512),
)

# Bogacki & Shampine (1989), order 3 with an embedded order-2 estimate, FSAL; its dense output
# is the cubic Hermite interpolant.
BOSH3_TABLEAU = ButcherTableau(
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_err=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
)


def _dopri5_dense(b: tuple[float, ...]) -> tuple[Polynomial, ...]:
    """Shampine's (1986) fourth-order continuous extension, written as in Hairer, Nørsett &
    Wanner I, II.6: y0 + θ r2 + θ(1-θ) r3 + θ²(1-θ) r4 + θ²(1-θ)² r5."""
    d = (-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799, -10690763975 / 1880347072,
         701980252875 / 199316789632, -1453857185 / 822651844, 69997945 / 29380423)  # fmt: skip
    first = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    last = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    return tuple(
        _poly_add(
            (bi, (1.0,)), (fi - bi, (1.0, -1.0)), (2 * bi - fi - li, (0.0, 1.0, -1.0)), (di, (0.0, 1.0, -2.0, 1.0))
        )
        for bi, fi, li, di in zip(b, first, last, d)
    )


# Dormand & Prince (1980), order 5 with an embedded order-4 estimate, FSAL.
_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_HAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5_TABLEAU = ButcherTableau(
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
    b_dense=_dopri5_dense(_DOPRI5_B),
)

# Tsitouras (2011), "Runge–Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", order 5 with an embedded order-4 estimate, FSAL, with the paper's
# fourth-order continuous extension b_i(θ).
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
_TSIT5_DENSE = (
    _expand(
        -1.0530884977290216, (-1.329989018975412, 1.0), (0.7139816917074209, -1.4364028541716351, 1.0), theta_power=1
    ),
    _expand(0.1017, (1.2949852507374631, -2.1966568338249754, 1.0), theta_power=2),
    _expand(2.490627285651252793, (1.57803468208092486, -2.38535645472061657, 1.0), theta_power=2),
    _expand(-16.54810288924490272, (-1.21712927295533244, 1.0), (-0.61620406037800089, 1.0), theta_power=2),
    _expand(47.37952196281928122, (-1.203071208372362603, 1.0), (-0.658047292653547382, 1.0), theta_power=2),
    _expand(-34.87065786149660974, (-1.2, 1.0), (-2 / 3, 1.0), theta_power=2),
    _expand(2.5, (-1.0, 1.0), (-0.6, 1.0), theta_power=2),
)
TSIT5_TABLEAU = ButcherTableau(
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
    b_dense=_TSIT5_DENSE,
)


def _quartic_dense(b: tuple[float, ...], b_mid: tuple[float, ...]) -> tuple[Polynomial, ...]:
    """The quartic through y0, h f0, y(1/2) = y0 + h Σ b_mid k, y1 and h f1 (the last stage of
    an FSAL tableau), as stage weights: torchdiffeq's interpolant for its RK methods."""
    first = tuple(1.0 if i == 0 else 0.0 for i in range(len(b)))
    last = tuple(1.0 if i == len(b) - 1 else 0.0 for i in range(len(b)))
    polys = []
    for bi, mi, fi, li in zip(b, b_mid, first, last):
        p, q, r = bi - fi, li - fi, 16 * mi - 8 * fi  # y1 - y0 - h f0, h (f1 - f0), 16 (y_mid - y0) - 8 h f0
        polys.append((fi, -5 * p + q + r, 14 * p - 3 * q - 2 * r, -8 * p + 2 * q + r))
    return tuple(polys)


# Prince & Dormand (1981), "High order embedded Runge–Kutta formulae", RK8(7)13M: order 8 with
# an embedded order-7 estimate; a 14th stage at the new point makes it FSAL.
_DOPRI8_B = (
    14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825, 181606767 / 758867731,
    561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087,
    -528747749 / 2220607170, 1 / 4,
)  # fmt: skip
_DOPRI8_B_HAT = (
    13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145, 1757004468 / 5645159321,
    656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535, 53011238 / 667516719,
    2 / 45, 0.0,
)  # fmt: skip
# Weights of y(t0 + h/2) that satisfy the order conditions of all trees up to order 5 at θ = 1/2
# (the minimum-norm solution; stages 1-4 do not contribute): fifth order at the midpoint, so the
# quartic interpolant is fourth order. Derived here, checked in tests/neuralode/test_tableau.py.
_DOPRI8_MID = (
    0.040736722705357234, 0.0, 0.0, 0.0, 0.0, 0.1456987718909409, 0.23498887102558372, 0.07725446379690133,
    0.015755162207734884, -0.01516935657547969, -5.2378778496734585e-05, 0.0002625812407873844,
    0.0002625812424256399, 0.00026258124418278295,
)  # fmt: skip
DOPRI8_TABLEAU = ButcherTableau(
    c=(
        0.0,
        1 / 18,
        1 / 12,
        1 / 8,
        5 / 16,
        3 / 8,
        59 / 400,
        93 / 200,
        5490023248 / 9719169821,
        13 / 20,
        1201146811 / 1299019798,
        1.0,
        1.0,
        1.0,
    ),  # fmt: skip
    a=(
        (1 / 18,),
        (1 / 48, 1 / 16),
        (1 / 32, 0.0, 3 / 32),
        (5 / 16, 0.0, -75 / 64, 75 / 64),
        (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
        (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000),
        (
            16016141 / 946692911,
            0.0,
            0.0,
            61564180 / 158732637,
            22789713 / 633445777,
            545815736 / 2771057229,
            -180193667 / 1043307555,
        ),
        (
            39632708 / 573591083,
            0.0,
            0.0,
            -433636366 / 683701615,
            -421739975 / 2616292301,
            100302831 / 723423059,
            790204164 / 839813087,
            800635310 / 3783071287,
        ),
        (
            246121993 / 1340847787,
            0.0,
            0.0,
            -37695042795 / 15268766246,
            -309121744 / 1061227803,
            -12992083 / 490766935,
            6005943493 / 2108947869,
            393006217 / 1396673457,
            123872331 / 1001029789,
        ),
        (
            -1028468189 / 846180014,
            0.0,
            0.0,
            8478235783 / 508512852,
            1311729495 / 1432422823,
            -10304129995 / 1701304382,
            -48777925059 / 3047939560,
            15336726248 / 1032824649,
            -45442868181 / 3398467696,
            3065993473 / 597172653,
        ),
        (
            185892177 / 718116043,
            0.0,
            0.0,
            -3185094517 / 667107341,
            -477755414 / 1098053517,
            -703635378 / 230739211,
            5731566787 / 1027545527,
            5232866602 / 850066563,
            -4093664535 / 808688257,
            3962137247 / 1805957418,
            65686358 / 487910083,
        ),
        (
            403863854 / 491063109,
            0.0,
            0.0,
            -5068492393 / 434740067,
            -411421997 / 543043805,
            652783627 / 914296604,
            11173962825 / 925320556,
            -13158990841 / 6184727034,
            3936647629 / 1978049680,
            -160528059 / 685178525,
            248638103 / 1413531060,
            0.0,
        ),
        _DOPRI8_B,
    ),  # fmt: skip
    b=(*_DOPRI8_B, 0.0),
    b_err=(*(b - bh for b, bh in zip(_DOPRI8_B, _DOPRI8_B_HAT)), 0.0),
    b_dense=_quartic_dense((*_DOPRI8_B, 0.0), _DOPRI8_MID),
)


# ---- implicit methods (fixed step) -------------------------------------------------------------
_S3, _S6, _S15 = math.sqrt(3), math.sqrt(6), math.sqrt(15)
IMPLICIT_EULER_TABLEAU = ImplicitTableau(c=(1.0,), a=((1.0,),), b=(1.0,))
IMPLICIT_MIDPOINT_TABLEAU = ImplicitTableau(c=(0.5,), a=((0.5,),), b=(1.0,))
TRAPEZOID_TABLEAU = ImplicitTableau(c=(0.0, 1.0), a=((0.0, 0.0), (0.5, 0.5)), b=(0.5, 0.5))
# Gauss–Legendre collocation, orders 4 and 6.
GL4_TABLEAU = ImplicitTableau(
    c=(1 / 2 - _S3 / 6, 1 / 2 + _S3 / 6),
    a=((1 / 4, 1 / 4 - _S3 / 6), (1 / 4 + _S3 / 6, 1 / 4)),
    b=(1 / 2, 1 / 2),
)
GL6_TABLEAU = ImplicitTableau(
    c=(1 / 2 - _S15 / 10, 1 / 2, 1 / 2 + _S15 / 10),
    a=(
        (5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
        (5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
        (5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36),
    ),
    b=(5 / 18, 4 / 9, 5 / 18),
)
# Radau IIA, orders 3 and 5.
RADAU_IIA3_TABLEAU = ImplicitTableau(c=(1 / 3, 1.0), a=((5 / 12, -1 / 12), (3 / 4, 1 / 4)), b=(3 / 4, 1 / 4))
RADAU_IIA5_TABLEAU = ImplicitTableau(
    c=(2 / 5 - _S6 / 10, 2 / 5 + _S6 / 10, 1.0),
    a=(
        (11 / 45 - 7 * _S6 / 360, 37 / 225 - 169 * _S6 / 1800, -2 / 225 + _S6 / 75),
        (37 / 225 + 169 * _S6 / 1800, 11 / 45 + 7 * _S6 / 360, -2 / 225 - _S6 / 75),
        (4 / 9 - _S6 / 36, 4 / 9 + _S6 / 36, 1 / 9),
    ),
    b=(4 / 9 - _S6 / 36, 4 / 9 + _S6 / 36, 1 / 9),
)
# Singly diagonally implicit: Alexander's two-stage L-stable SDIRK and TR-BDF2, both order 2.
_GAMMA = 1 - math.sqrt(2) / 2
SDIRK2_TABLEAU = ImplicitTableau(c=(_GAMMA, 1.0), a=((_GAMMA, 0.0), (1 - _GAMMA, _GAMMA)), b=(1 - _GAMMA, _GAMMA))
_TRBDF2_W = math.sqrt(2) / 4
TRBDF2_TABLEAU = ImplicitTableau(
    c=(0.0, 2 * _GAMMA, 1.0),
    a=((0.0, 0.0, 0.0), (_GAMMA, _GAMMA, 0.0), (_TRBDF2_W, _TRBDF2_W, _GAMMA)),
    b=(_TRBDF2_W, _TRBDF2_W, _GAMMA),
)
