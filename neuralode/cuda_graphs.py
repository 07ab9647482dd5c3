"""Dynamics replayed from CUDA graphs, for inference where kernel launches dominate.

A small f (ODE-Net's block is a dozen kernels on 64×6×6) costs more in launches than in
arithmetic at small batches. :class:`GraphedDynamics` captures f once per padded batch size
(the next power of two) and replays it: the per-sample solver's batch shrinks as samples
finish, so rows are padded with zeros up to the captured size, which is harmless because f
must be per-sample independent anyway. Anywhere a graph cannot help or cannot be used (CPU,
autograd recording, a scalar ``t``) it calls f directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    t: Tensor
    y: Tensor
    out: Tensor


class GraphedDynamics:
    """``f(t, y)`` with ``t`` of shape ``[B]``, replayed from a CUDA graph per padded size."""

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], warmup: int = 3) -> None:
        self.func, self.warmup = func, warmup
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(key[0] for key in self._graphs)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        if y.device.type != "cuda" or torch.is_grad_enabled() or t.dim() != 1:
            return self.func(t, y)
        rows = y.shape[0]
        size = 1 << (rows - 1).bit_length()
        key = (size, tuple(y.shape[1:]), y.dtype, t.dtype, y.device)
        captured = self._graphs.get(key) or self._capture(key)
        captured.t[:rows].copy_(t)
        captured.y[:rows].copy_(y)
        if rows < size:  # padding rows: zeros, finite and never read back
            captured.t[rows:].zero_()
            captured.y[rows:].zero_()
        captured.graph.replay()
        return captured.out[:rows].clone()  # the next replay overwrites the buffer

    def _capture(self, key: tuple) -> _Captured:
        size, shape, dtype, t_dtype, device = key
        t = torch.zeros(size, dtype=t_dtype, device=device)
        y = torch.zeros(size, *shape, dtype=dtype, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN picks its algorithms)
            for _ in range(self.warmup):
                self.func(t, y)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.func(t, y)
        captured = _Captured(graph, t, y, out)
        self._graphs[key] = captured
        return captured
