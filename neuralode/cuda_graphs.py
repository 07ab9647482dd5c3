"""Dynamics and whole solver steps replayed from CUDA graphs, for inference where kernel
launches dominate.

A small f (ODE-Net's block is a dozen kernels on 64×6×6) costs more in launches than in
arithmetic at small batches. :class:`GraphedDynamics` captures f once per padded batch size
(the next power of two) and replays it: the per-sample solver's batch shrinks as samples
finish, so rows are padded with zeros up to the captured size, which is harmless because f
must be per-sample independent anyway. Anywhere a graph cannot help or cannot be used (CPU,
autograd recording, a scalar ``t``) it calls f directly.

The solver's own step is a few hundred more kernels. :class:`StepGraphs` captures the whole
step — f's evaluations with it — as one graph per padded size, with finished rows masked
instead of removed, so the host only looks every few steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .solvers import SolverState, Status, Stepper
from .solvers.solver import Func, rows_of

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE


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
        self._pool: _POOL_HANDLE | None = None

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(key[0] for key in self._graphs)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        if y.device.type != "cuda" or torch.is_grad_enabled() or t.dim() != 1:
            return self.func(t, y)
        rows = y.shape[0]
        size = _padded_size(rows)
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


_FIELDS = tuple(f.name for f in fields(SolverState))  # constants: torch.compile traces the step whole


def masked_step(stepper: Stepper, func: Func, state: SolverState) -> tuple[SolverState, Tensor]:
    """One attempted step of the RUNNING rows, every other row kept exactly as it was; returns
    the rows and which of them accepted their step (``[B]``, False for the others).

    Unlike :meth:`Stepper.step` it takes finished rows (and padding) too, so the batch keeps its
    shape and nothing asks the host which rows are left: a step that can be captured whole. The
    running rows get what :meth:`Stepper.step` gives them; the others are computed and thrown
    away, so neither their values nor their NFE change."""
    running = state.status == int(Status.RUNNING)
    stepped, record = stepper.step(func, state)

    def keep(new: Tensor | None, old: Tensor | None) -> Tensor | None:
        return None if old is None else torch.where(rows_of(running, old), cast(Tensor, new), old)  # set with old

    values: dict[str, Any] = {}
    for name in _FIELDS:
        new, old = getattr(stepped, name), getattr(state, name)
        values[name] = {k: keep(new[k], v) for k, v in old.items()} if isinstance(old, dict) else keep(new, old)
    return SolverState(**values), record.accepted & running


class _StepGraph:
    """One padded batch size: the rows live in ``static``, and a replay advances them one masked
    step in place (``accepted`` says which rows accepted it)."""

    def __init__(self, stepper: Stepper, func: Func, static: SolverState, pool) -> None:
        self.static = static
        self.accepted = torch.zeros(static.batch_size, dtype=torch.bool, device=static.t.device)
        side = torch.cuda.Stream(static.y.device)
        side.wait_stream(torch.cuda.current_stream(static.y.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN picks its algorithms)
            for _ in range(2):
                masked_step(stepper, func, _first_rows(static, static.batch_size))
        torch.cuda.current_stream(static.y.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            stepped, accepted = masked_step(stepper, func, static)
            _assign(static, stepped)
            self.accepted.copy_(accepted)


class StepGraphs:
    """Solves to the end with whole solver steps — stages, error norm, accept/reject, step-size
    update, limits — each replayed as one CUDA graph per padded batch size (the next power of
    two), so a step costs one launch instead of a few hundred kernels.

    The host looks at the rows only every ``check_every`` steps: to stop when none is running, and
    to move the running ones to a smaller graph once at most a quarter of the rows still run
    (finished rows are stepped masked until then, their values and NFE untouched). Off the GPU,
    or with ``capture=False``, the same masked steps run eagerly: that is the path the CPU tests
    check against :func:`~neuralode.solve_ivp`. ``func`` must treat rows independently and be
    capturable (no host synchronisation)."""

    def __init__(self, stepper: Stepper, func: Func, *, check_every: int = 4, capture: bool | None = None) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.stepper, self.func, self.check_every, self.capture = stepper, func, check_every, capture
        self._graphs: dict[tuple, _StepGraph] = {}
        self._pool: _POOL_HANDLE | None = None

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(key[0] for key in self._graphs)

    @torch.no_grad()
    def step(self, state: SolverState) -> tuple[SolverState, Tensor]:
        """One masked step of ``state``'s rows in its size's graph: the rows and which accepted
        (for a caller that changes the rows between steps, like the serving engine)."""
        stepped, accepted = self._step(*self._load(state))
        return _first_rows(stepped, state.batch_size), accepted[: state.batch_size].clone()

    @torch.no_grad()
    def run(self, state: SolverState) -> SolverState:
        """Step every row of ``state`` until none is RUNNING; rows come back in ``sample_id`` order."""
        if state.batch_size == 0:
            return state
        done: list[SolverState] = []
        pending: SolverState | None = state
        while pending is not None:
            rows = pending.batch_size
            padded, graph = self._load(pending)
            while True:
                for _ in range(self.check_every):
                    padded, _ = self._step(padded, graph)
                live = _first_rows(padded, rows)
                running = live.status == int(Status.RUNNING)
                left = int(running.sum())  # the host synchronisation
                if left == 0 or (left <= padded.batch_size // 4 and padded.batch_size > 1):
                    break
            done.append(live.select(running.logical_not().nonzero().squeeze(1)))
            pending = live.select(running.nonzero().squeeze(1)) if left else None
        finished = SolverState.cat(done)
        return finished.select(finished.sample_id.argsort())

    def _load(self, state: SolverState) -> tuple[SolverState, _StepGraph | None]:
        """``state`` padded to its graph's size, and the graph (None when steps run eagerly),
        whose buffers then hold the padded rows."""
        padded = _padded(state, _padded_size(state.batch_size))
        graph = self._graph(padded)
        if graph is None:
            return padded, None
        _assign(graph.static, padded)
        return graph.static, graph

    def _step(self, padded: SolverState, graph: _StepGraph | None) -> tuple[SolverState, Tensor]:
        if graph is None:
            return masked_step(self.stepper, self.func, padded)
        graph.graph.replay()
        return graph.static, graph.accepted

    def _graph(self, padded: SolverState) -> _StepGraph | None:
        capture = self.capture if self.capture is not None else padded.y.is_cuda
        if not capture:
            return None
        key = (padded.batch_size, tuple(padded.y.shape[1:]), padded.y.dtype, padded.y.device)
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = _StepGraph(self.stepper, self.func, _first_rows(padded, padded.batch_size), self._pool)
        return self._graphs[key]


def _padded(state: SolverState, size: int) -> SolverState:
    """``state`` with ``size - rows`` more rows: copies of the first row that are not RUNNING
    (SUCCESS), so masked steps leave them alone."""
    rows = state.batch_size
    if rows == size:
        return state
    index = torch.cat([torch.arange(rows), torch.zeros(size - rows, dtype=torch.int64)]).to(state.t.device)
    padded = state.select(index)
    padded.status = padded.status.index_fill(0, index.new_tensor(range(rows, size)), int(Status.SUCCESS))
    return padded


def _padded_size(rows: int) -> int:
    """The captured size for ``rows`` rows: the next power of two."""
    return 1 << (rows - 1).bit_length()


def _first_rows(state: SolverState, rows: int) -> SolverState:
    """A copy of the first ``rows`` rows (all of them: a copy of ``state``)."""
    return state.select(torch.arange(rows, device=state.t.device))


def _assign(target: SolverState, source: SolverState) -> None:
    """Copy ``source``'s rows into ``target``'s tensors, in place."""
    for f in fields(SolverState):
        old, new = getattr(target, f.name), getattr(source, f.name)
        if isinstance(old, dict):
            for key, value in old.items():
                value.copy_(new[key])
        elif old is not None:
            old.copy_(new)
