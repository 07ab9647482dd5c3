"""Model kinds by name, so a checkpoint's card can say how to rebuild its model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .cnf import CNF, ConcatSquashMLP, PlanarDynamics, PlanarFlow
from .odenet import MLP, ODENet, ResNet


def _cnf(
    dim: int = 2, dynamics: str = "concatsquash", hidden: list[int] | None = None, width: int = 32, **options
) -> CNF:
    if dynamics == "concatsquash":
        net = ConcatSquashMLP(dim, tuple(hidden or (64, 64, 64)))
    elif dynamics == "planar":
        net = PlanarDynamics(dim, width)
    else:
        raise ValueError(f"unknown CNF dynamics {dynamics!r}: concatsquash or planar")
    return CNF(net, dim, **options)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "odenet": lambda **h: ODENet(**h),
    "rknet": lambda **h: ODENet(**h, adjoint=False),
    "resnet": lambda **h: ResNet(**h),
    "mlp": lambda **h: MLP(**h),
    "cnf": _cnf,
    "planar-nf": lambda **h: PlanarFlow(**h),
}

CLASSIFIERS = frozenset({"odenet", "rknet", "resnet", "mlp"})
"""Kinds that map MNIST images to 10 logits."""

ODE_CLASSIFIERS = frozenset({"odenet", "rknet"})
"""Classifiers with an ODE block, whose forward takes tolerances and returns solver stats."""


ODE_KINDS = ODE_CLASSIFIERS | {"cnf"}
"""Kinds whose forward is an ODE solve, so their ``hyper`` carries solver settings
(``method``, ``tol``, ``first_step``)."""


def kinds() -> list[str]:
    return sorted(_BUILDERS)


def build_model(kind: str, hyper: dict[str, Any]) -> nn.Module:
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(kinds())}")
    if not isinstance(hyper, dict):
        raise TypeError("hyper must be a dict of constructor arguments")
    return _BUILDERS[kind](**hyper)
