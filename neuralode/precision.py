"""The arithmetic precision of f, separate from the dtype of the solver's state.

A solve's accuracy is its tolerance and the precision f is evaluated in. A loose tolerance
gains nothing from float32 arithmetic inside f, while this CPU's AMX units (and a GPU's tensor
cores) compute bfloat16 convolutions and matrix products several times faster. So f may run
in bfloat16 while everything that decides accuracy stays in the state's dtype: the state, the
stages' accumulation, the error estimate and norm, the step-size control. The solver only
ever sees f's answer cast back to the state's dtype.

f runs under autocast, entered inside each evaluation: whatever calls f (the forward solve,
the adjoint's backward solve and its vector-Jacobian products, a Hutchinson probe) evaluates
it in the same precision, and gradients reach the float32 parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The precisions f may be evaluated in, by name (the names requests and model cards use)."""

Dynamics = Callable[[Tensor, Tensor], Tensor]


def precision_dtype(precision: str | torch.dtype | None) -> torch.dtype | None:
    """``precision`` as a dtype; ``None`` (or ``"float32"``) means f runs in the state's dtype."""
    if precision is None or isinstance(precision, torch.dtype):
        return None if precision in (None, torch.float32) else _known(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known are {', '.join(PRECISIONS)}")
    return None if precision == "float32" else PRECISIONS[precision]


def _known(dtype: torch.dtype) -> torch.dtype:
    if dtype not in PRECISIONS.values():
        raise ValueError(f"f cannot be evaluated in {dtype}; known precisions are {', '.join(PRECISIONS)}")
    return dtype


class LowPrecision:
    """``func`` evaluated under autocast to ``dtype``, answering in its state's dtype.

    ``full_precision`` is ``func`` itself, for the evaluations a solver differences across a
    tiny perturbation: Hairer's first-step rule divides f(y0 + h0 f0) - f(y0) by a small h0,
    and bfloat16's rounding (2^-9 relative) would swamp that difference and shrink the first
    step (measured on a linear system at tol 1e-1: 20 NFE instead of 14). The solver evaluates
    f(t0, y0) and the rule's probe in full precision, so a solve takes the steps of float32
    wherever rounding stays below the tolerance."""

    def __init__(self, func: Dynamics, dtype: torch.dtype) -> None:
        self.full_precision, self.dtype = func, dtype

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(y.device.type, dtype=self.dtype):
            out = self.full_precision(t, y)
        return out.to(y.dtype)


def in_precision(func: Dynamics, dtype: torch.dtype | None) -> Dynamics:
    """``func`` evaluated in ``dtype`` (``func`` itself when ``dtype`` is None)."""
    return func if dtype is None else LowPrecision(func, dtype)


def full_precision(func: Dynamics) -> Dynamics:
    """The state's-precision version of ``func`` (``func`` itself unless it is :class:`LowPrecision`)."""
    return func.full_precision if isinstance(func, LowPrecision) else func


def computes_natively(precision: str, device: torch.device) -> bool:
    """Whether ``device`` has arithmetic units for ``precision``, so that evaluating f in it
    can pay. Without them bfloat16 is emulated: on an AVX2-only CPU (AMD EPYC, 2026-12-06) a
    batch-256 convolution of the ODE block took 1.37 s in bfloat16 against 0.115 s in float32,
    12x slower. bfloat16 is native on CPUs with AVX512-BF16 or AMX and on CUDA GPUs that
    support it (Ampere and later)."""
    dtype = precision_dtype(precision)
    if dtype is None:
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")
    return False


def _cpu_has(probe: str) -> bool:
    check = getattr(torch.cpu, probe, None)  # torch's own CPU feature probes (cpuinfo)
    return bool(check()) if check is not None else False
