"""The per-call accuracy settings that every model's solving method takes, defined once."""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

from .problem import Tolerance


class Accuracy(TypedDict, total=False):
    """Keyword arguments a call may override (``None`` or absent: the model's own setting):
    ``rtol``/``atol`` (floats or ``[B]`` tensors), ``method`` and a ``max_nfe`` budget."""

    rtol: Tolerance | None
    atol: Tolerance | None
    method: str | None
    max_nfe: int | Tensor | None


def solve_settings(accuracy: Accuracy, *, rtol: Tolerance, atol: Tolerance, method: str) -> dict:
    """``solve_ivp`` keyword arguments: the call's ``accuracy`` over the model's defaults."""
    unknown = set(accuracy) - set(Accuracy.__annotations__)
    if unknown:
        raise TypeError(f"unexpected accuracy settings {sorted(unknown)}; known are {sorted(Accuracy.__annotations__)}")
    defaults = {"rtol": rtol, "atol": atol, "method": method, "max_nfe": None}
    return {key: default if accuracy.get(key) is None else accuracy[key] for key, default in defaults.items()}
