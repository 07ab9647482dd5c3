"""2-D toy densities (FFJORD's set) as samplers, and the energy targets of Rezende & Mohamed
(2015) for reverse-KL training, all generated in code."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Sampler = Callable[[int, torch.Generator], Tensor]


def _normal(shape, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g)


def _uniform(shape, g: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=g)


def eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    angles = torch.arange(8) * (math.pi / 4)
    centers = 4.0 * torch.stack([angles.cos(), angles.sin()], 1)
    which = torch.randint(0, 8, (n,), generator=g)
    return (centers[which] + 0.5 * _normal((n, 2), g)) / math.sqrt(2)


def moons(n: int, g: torch.Generator) -> Tensor:
    outer = n // 2
    angle = math.pi * _uniform((n,), g)
    upper = torch.stack([angle.cos(), angle.sin()], 1)
    lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], 1)
    points = torch.cat([upper[:outer], lower[outer:]]) + 0.1 * _normal((n, 2), g)
    return points * 2 + torch.tensor([-1.0, -0.2])


def circles(n: int, g: torch.Generator) -> Tensor:
    angle = 2 * math.pi * _uniform((n,), g)
    radius = torch.where(torch.arange(n) < n // 2, 1.0, 0.5)
    points = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1) + 0.08 * _normal((n, 2), g)
    return 3 * points[torch.randperm(n, generator=g)]


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    x1 = _uniform((n,), g) * 4 - 2
    x2 = _uniform((n,), g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def pinwheel(n: int, g: torch.Generator) -> Tensor:
    classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    angles = torch.arange(classes) * (2 * math.pi / classes)
    which = torch.randint(0, classes, (n,), generator=g)
    features = _normal((n, 2), g) * torch.tensor([radial_std, tangential_std]) + torch.tensor([1.0, 0.0])
    rotation = angles[which] + rate * features[:, 0].exp()
    c, s = rotation.cos(), rotation.sin()
    rotated = torch.stack([c * features[:, 0] - s * features[:, 1], s * features[:, 0] + c * features[:, 1]], 1)
    return 2 * rotated


def two_spirals(n: int, g: torch.Generator) -> Tensor:
    half = n // 2
    turn = torch.sqrt(_uniform((half,), g)) * 540 * (2 * math.pi) / 360
    arm = torch.stack(
        [-turn.cos() * turn + _uniform((half,), g) * 0.5, turn.sin() * turn + _uniform((half,), g) * 0.5], 1
    )
    points = torch.cat([arm, -arm]) / 3
    points = points + 0.1 * _normal(points.shape, g)
    return points[torch.randperm(points.shape[0], generator=g)]


DENSITIES: dict[str, Sampler] = {
    "8gaussians": eight_gaussians,
    "moons": moons,
    "circles": circles,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "2spirals": two_spirals,
}


def sample_density(name: str, n: int, generator: torch.Generator) -> Tensor:
    if name not in DENSITIES:
        raise ValueError(f"unknown density {name!r}; known: {', '.join(DENSITIES)}")
    return DENSITIES[name](n, generator)


# ---- energy targets: p(z) ∝ exp(-U(z)) ---------------------------------------------------
def _w1(z: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def _w2(z: Tensor) -> Tensor:
    return 3 * torch.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3 * torch.sigmoid((z[:, 0] - 1) / 0.3)


def _log_sum_exp(a: Tensor, b: Tensor) -> Tensor:
    return torch.logsumexp(torch.stack([a, b]), 0)


def u1(z: Tensor) -> Tensor:
    ring = 0.5 * ((z.norm(dim=1) - 2) / 0.4) ** 2
    return ring - _log_sum_exp(-0.5 * ((z[:, 0] - 2) / 0.6) ** 2, -0.5 * ((z[:, 0] + 2) / 0.6) ** 2)


def u2(z: Tensor) -> Tensor:
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2


def u3(z: Tensor) -> Tensor:
    return -_log_sum_exp(-0.5 * ((z[:, 1] - _w1(z)) / 0.35) ** 2, -0.5 * ((z[:, 1] - _w1(z) + _w2(z)) / 0.35) ** 2)


def u4(z: Tensor) -> Tensor:
    return -_log_sum_exp(-0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2, -0.5 * ((z[:, 1] - _w1(z) + _w3(z)) / 0.35) ** 2)


ENERGIES: dict[str, Callable[[Tensor], Tensor]] = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}


def energy(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ENERGIES:
        raise ValueError(f"unknown energy target {name!r}; known: {', '.join(ENERGIES)}")
    return ENERGIES[name]
