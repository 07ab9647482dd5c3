"""f compiled by ``torch.compile`` (inductor: C++/OpenMP kernels on the CPU, Triton on a GPU)
for a bounded set of batch sizes, each kept only where it measures faster than eager.

The per-sample solver's batch changes size step by step as rows finish, and a compiled graph
is specialised to its shapes. So rows are padded with zeros to the next power of two (capped
by ``max_rows``), as :class:`~neuralode.cuda_graphs.GraphedDynamics` pads for its graphs: at
most ``log2(max_rows) + 1`` sizes per precision are ever compiled, each once, and counted.
Padding is harmless because f is per-sample independent (the padding rows are never read
back), but a row's result is then float32-rounding close to, not bit-identical with, its
eager result: compiled kernels sum in another order.

Compiling a size costs seconds (3-13 s for ODE-Net's block on a 2-core CPU), so it happens on
a size's first use, which the server's warm-up makes happen before a model serves. Right after
compiling, the compiled f on the padded batch is timed against the eager f on the rows such a
batch holds in the middle of its range (3/4 of the size), padding's cost included, and the
faster is kept for that size: where fusion cannot pay for the padding, f stays eager.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo
from torch import Tensor

log = logging.getLogger("neuralode.compiled")

Dynamics = Callable[[Tensor, Tensor], Tensor]
_TIMED_CALLS = 5  # per variant, after compiling: the median decides


@dataclass(frozen=True)
class Compiled:
    """One padded size's measurement: what compiling cost and which f it kept."""

    rows: int
    precision: str  # the autocast dtype it runs under ("float32": none)
    compile_seconds: float
    eager_ms: float
    compiled_ms: float

    @property
    def kept(self) -> bool:
        return self.compiled_ms < self.eager_ms


def padded_size(rows: int, max_rows: int) -> int:
    """The next power of two of ``rows``, at most ``max_rows`` (and at least ``rows``)."""
    return max(rows, min(1 << (rows - 1).bit_length(), max_rows))


class CompiledDynamics:
    """``f(t, y)`` with ``t`` of shape ``[B]``: compiled per padded size where that is faster.
    Calls that record autograd (training), a scalar ``t`` or more than ``max_rows`` rows run f
    eagerly. ``on_compile`` hears of every size compiled (for logs and metrics)."""

    def __init__(self, func: Dynamics, max_rows: int, on_compile: Callable[[Compiled], None] | None = None) -> None:
        self.func, self.max_rows, self.on_compile = func, max_rows, on_compile
        self.compiled_func = torch.compile(func, dynamic=False)
        # Dynamo keeps a bounded number of graphs per function (8 by default, a thread-local
        # setting): room for every padded size in both precisions while compiling, so none
        # falls back to eager silently.
        self._recompile_limit = 4 * (max_rows.bit_length() + 1)
        self.sizes: dict[tuple, Compiled] = {}
        self._failed: set[tuple] = set()

    @property
    def compiles(self) -> int:
        return len(self.sizes)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        rows = y.shape[0]
        if torch.is_grad_enabled() or t.dim() != 1 or rows > self.max_rows:
            return self.func(t, y)
        size = padded_size(rows, self.max_rows)
        key = (size, tuple(y.shape[1:]), y.dtype, y.device, _autocast_dtype(y.device))
        chosen = self.sizes.get(key)
        if key in self._failed or (chosen is not None and not chosen.kept):
            return self.func(t, y)  # unpadded
        padded_t, padded_y = t, y
        if rows < size:
            padded_t = torch.cat([t, t.new_zeros(size - rows)])
            padded_y = torch.cat([y, y.new_zeros(size - rows, *y.shape[1:])])
        if chosen is None:
            chosen = self._compile(key, padded_t, padded_y)
            if chosen is None or not chosen.kept:
                return self.func(t, y)
        return self.compiled_func(padded_t, padded_y)[:rows]

    def _compile(self, key: tuple, t: Tensor, y: Tensor) -> Compiled | None:
        began = time.perf_counter()
        try:
            limit = max(torch._dynamo.config.recompile_limit, self._recompile_limit)
            with torch._dynamo.config.patch(recompile_limit=limit):
                self.compiled_func(t, y)
        except Exception:  # noqa: BLE001 - an f inductor cannot take stays eager
            log.warning("could not compile f for %d rows; it runs eagerly", key[0], exc_info=True)
            self._failed.add(key)
            return None
        compile_seconds = time.perf_counter() - began
        # Padded, a size serves batches of size/2 + 1 .. size rows: the compiled f must beat
        # eager f on the rows it pads, whose middle is 3/4 of the size.
        typical = max(1, 3 * key[0] // 4)
        autocast = key[-1]
        compiled = Compiled(
            rows=key[0],
            precision="float32" if autocast is None else str(autocast).removeprefix("torch."),
            compile_seconds=compile_seconds,
            eager_ms=_median_ms(self.func, t[:typical], y[:typical]),
            compiled_ms=_median_ms(self.compiled_func, t, y),
        )
        self.sizes[key] = compiled
        if self.on_compile is not None:
            self.on_compile(compiled)
        return compiled


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _median_ms(func: Dynamics, t: Tensor, y: Tensor) -> float:
    seconds = []
    for _ in range(_TIMED_CALLS):
        began = time.perf_counter()
        func(t, y)
        if y.device.type == "cuda":
            torch.cuda.synchronize(y.device)
        seconds.append(time.perf_counter() - began)
    return 1000 * statistics.median(seconds)
