"""The torch side of the engine: one model's rows of solver state, advanced one step at a time.

Rows are items from any request and any tolerance; each row's ``sample_id`` is its item's
id. ``step(plan)`` applies the scheduler's plan — drop, park, resume, join — and then attempts
one solver step on every running row. A parked item's row is kept aside untouched, so it
resumes exactly where it stopped. Rows that use different methods, or evaluate f in different
precisions, run as separate groups.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import cast

import torch
from torch import Tensor

from neuralode.cuda_graphs import StepGraphs
from neuralode.precision import in_precision, precision_dtype
from neuralode.solvers import Norm, SolverState, Status, Stepper, get_method, takes_first_step

from .adapters import Adapter
from .api import Kind
from .scheduling import Cost, Item, Plan, StepOutputs
from .stats import PhaseTimes

_RUNNING = int(Status.RUNNING)


@dataclass(frozen=True)
class Work:
    """What one item asks for. ``inputs`` is its row as the adapter prepared it (on the CPU)."""

    kind: Kind
    inputs: Tensor
    rtol: float
    atol: float
    method: str
    max_nfe: int
    precision: str = "float32"  # what f is evaluated in (neuralode.precision.PRECISIONS)


@dataclass(frozen=True)
class Outcome:
    item_id: int
    outputs: dict[str, Tensor]  # on the CPU; NaN where the solve failed
    nfe: int
    status: Status
    steps: int = 0  # accepted solver steps


@dataclass(frozen=True)
class GroupStep:
    """One group's step, for stats."""

    method: str
    batch_size: int
    rejected: int
    finished: list[Outcome]
    precision: str = "float32"


@dataclass(frozen=True)
class ExecutorOutputs(StepOutputs):
    groups: list[GroupStep] = field(default_factory=list)


@functools.cache
def step_cost(method: str, first_step: float | None = None) -> Cost:
    """Function evaluations to start an item and per attempted step, for the scheduler's
    budgets and predictions; ``first_step`` as :func:`first_step_of` gives it (a given first
    step saves the evaluation Hairer's rule spends on choosing one)."""
    stepper = Stepper(get_method(method))
    return Cost(start=stepper.start_cost(first_step), step=stepper.step_cost())


def first_step_of(adapter: Adapter, method: str) -> float | None:
    """The first step an item solved by ``method`` tries: the model's, where the method
    controls its step size."""
    return adapter.first_step if adapter.first_step is not None and takes_first_step(method) else None


@dataclass(frozen=True)
class _Parked:
    group: tuple[str, str]  # (method, precision)
    kind: Kind
    row: SolverState


class _Group:
    """The running rows of one method and precision; ``ids`` and ``kinds`` mirror the rows on
    the host, so knowing which item a row is never needs the device. ``dynamics`` is the
    model's f evaluated in the group's precision, its time counted in ``times``. With ``graphs``
    its steps are masked steps replayed from CUDA graphs (eagerly off the GPU)."""

    def __init__(
        self,
        method: str,
        precision: str,
        dynamics: Callable,
        max_steps: int,
        norm: Norm,
        times: PhaseTimes,
        graphs_of: Callable | None = None,
    ) -> None:
        self.method, self.precision = method, precision
        self.dtype = precision_dtype(precision)
        # Timed inside the precision wrapper, so that the solver still finds f's full-precision
        # version, which it evaluates f(t0, y0) and the first-step probe in.
        self.dynamics = in_precision(times.inner("f", dynamics), self.dtype)
        self.stepper = Stepper(get_method(method), norm=norm, max_steps=max_steps)
        self.graphs: StepGraphs | None = None if graphs_of is None else graphs_of(self.stepper, self.dynamics)
        self.state: SolverState | None = None
        self.ids: list[int] = []
        self.kinds: list[Kind] = []

    @property
    def rows(self) -> SolverState:
        """``state`` of a group with rows (it is None only when ``ids`` is empty)."""
        return cast(SolverState, self.state)

    @property
    def size(self) -> int:
        return len(self.ids)

    def add(self, state: SolverState, ids: list[int], kinds: list[Kind]) -> None:
        self.state = state if self.state is None else SolverState.cat([self.state, state])
        self.ids += ids
        self.kinds += kinds

    def keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.ids):
            return
        if rows:
            self.state = self.rows.select(torch.tensor(rows, device=self.rows.t.device))
        else:
            self.state = None
        self.ids = [self.ids[r] for r in rows]
        self.kinds = [self.kinds[r] for r in rows]


class Executor:
    """``step_graphs``: take each step as one replayed CUDA graph per padded batch size
    (:class:`~neuralode.cuda_graphs.StepGraphs`) instead of a few hundred kernels; off the GPU
    the same masked steps run eagerly. ``times`` accumulates where each step's time goes (its
    owner takes it per iteration); on a GPU, phases time their kernel launches, not the kernels."""

    def __init__(
        self,
        adapter: Adapter,
        device: torch.device,
        max_steps: int = 100_000,
        step_graphs: bool = False,
        dynamics: Callable | None = None,
        times: PhaseTimes | None = None,
    ) -> None:
        """``dynamics``: f as the groups evaluate it (default: the adapter's, eager), e.g.
        :class:`~neuralode.compiled.CompiledDynamics` over it."""
        self.adapter, self.device, self.max_steps = adapter, device, max_steps
        self.dynamics = adapter.dynamics if dynamics is None else dynamics
        self.times = PhaseTimes() if times is None else times
        self._encode = self.times.inner("model", adapter.start)
        self._decode = self.times.inner("model", adapter.finish)
        self._graphs_of = StepGraphs if step_graphs else None
        self.groups: dict[tuple[str, str], _Group] = {}
        self.parked: dict[int, _Parked] = {}

    @property
    def running(self) -> int:
        return sum(group.size for group in self.groups.values())

    @torch.no_grad()
    def step(self, plan: Plan) -> ExecutorOutputs:
        """Apply ``plan``, then one attempted solver step for every running row."""
        times = self.times
        if plan.drop:
            with times.phase("drop"):
                self._drop({item.id for item in plan.drop})
        if plan.park:
            with times.phase("park"):
                self._park({item.id for item in plan.park})
        if plan.resume:
            with times.phase("resume"):
                self._resume(plan.resume)
        nfe: dict[int, int] = {}
        finished: dict[int, Outcome] = {}
        groups = []
        with times.phase("join"):
            started_done = self._join(plan.join, nfe)
        for group in self.groups.values():
            if group.state is None:
                continue
            size = group.size
            with times.phase("step"):
                if group.graphs is None:
                    group.state, record = group.stepper.step(group.dynamics, group.state)
                    step_accepted = record.accepted
                else:
                    group.state, step_accepted = group.graphs.step(group.state)
                # The one host synchronisation per step: every row's status and NFE, and rejections.
                status, counts, accepted = torch.stack(
                    [group.state.status, group.state.nfe, step_accepted.long()]
                ).tolist()
            nfe.update(zip(group.ids, counts))
            with times.phase("leave"):
                outcomes = self._finish(group, status, counts)
            finished.update((o.item_id, o) for o in outcomes)
            groups.append(GroupStep(group.method, size, size - sum(accepted), outcomes, group.precision))
        for group_step in started_done:
            finished.update((o.item_id, o) for o in group_step.finished)
        groups.extend(started_done)
        return ExecutorOutputs(nfe=nfe, finished=finished, groups=groups)

    # ---- plan changes ----------------------------------------------------------------------
    def _group(self, key: tuple[str, str]) -> _Group:
        if key not in self.groups:
            self.groups[key] = self._new_group(*key, self._graphs_of)
        return self.groups[key]

    def _new_group(self, method: str, precision: str, graphs_of: Callable | None = None) -> _Group:
        return _Group(method, precision, self.dynamics, self.max_steps, self.adapter.norm, self.times, graphs_of)

    def _drop(self, item_ids: set[int]) -> None:
        """Discard rows (cancelled, expired, failed) whether running or parked."""
        for item_id in item_ids & self.parked.keys():
            del self.parked[item_id]
        for group in self.groups.values():
            if item_ids.intersection(group.ids):
                group.keep([row for row, i in enumerate(group.ids) if i not in item_ids])

    def _park(self, item_ids: set[int]) -> None:
        for group in self.groups.values():
            rows = [row for row, i in enumerate(group.ids) if i in item_ids]
            if not rows:
                continue
            parked = group.rows.select(torch.tensor(rows, device=group.rows.t.device))
            for position, row in enumerate(rows):
                single = parked.select(torch.tensor([position], device=parked.t.device))
                self.parked[group.ids[row]] = _Parked((group.method, group.precision), group.kinds[row], single)
            group.keep([row for row, i in enumerate(group.ids) if i not in item_ids])

    def _resume(self, items: list[Item]) -> None:
        by_group: dict[tuple[str, str], list[tuple[int, _Parked]]] = defaultdict(list)
        for item in items:
            parked = self.parked.pop(item.id)
            by_group[parked.group].append((item.id, parked))
        for key, rows in by_group.items():
            self._group(key).add(
                SolverState.cat([parked.row for _, parked in rows]),
                [item_id for item_id, _ in rows],
                [parked.kind for _, parked in rows],
            )

    def _join(self, items: list[Item], nfe: dict[int, int]) -> list[GroupStep]:
        """Start the ODEs of new items: their initial evaluations run now, on them alone.
        Items whose start already ends their solve (a non-finite f, a budget too small to
        start) leave at once."""
        by_group: dict[tuple[str, str, Kind], list[tuple[int, Work]]] = defaultdict(list)
        for item in items:
            work: Work = item.payload
            if item.request.tol is not None:  # an ``auto`` request: the scheduler chose its tolerance
                work = replace(work, rtol=item.request.tol, atol=item.request.tol)
            by_group[(work.method, work.precision, work.kind)].append((item.id, work))
        ended = []
        for (method, precision, kind), batch in by_group.items():
            group = self._group((method, precision))
            state = self._start(group, kind, batch)
            ids = [item_id for item_id, _ in batch]
            status, counts = torch.stack([state.status, state.nfe]).tolist()
            nfe.update(zip(ids, counts))
            running = [row for row, s in enumerate(status) if s == _RUNNING]
            if len(running) < len(ids):
                starting = self._new_group(method, precision)
                starting.add(state, ids, [kind] * len(ids))
                outcomes = self._finish(starting, status, counts)
                ended.append(GroupStep(method, 0, 0, outcomes, precision))
                state, ids = starting.rows, starting.ids  # state: used only with ids
            if ids:
                group.add(state, ids, [kind] * len(ids))
        return ended

    def _start(self, group: _Group, kind: Kind, batch: list[tuple[int, Work]]) -> SolverState:
        inputs = torch.stack([work.inputs for _, work in batch])
        if self.device.type == "cuda":
            inputs = inputs.pin_memory()
        inputs = inputs.to(self.device, non_blocking=True)
        with _autocast(self.device, group.dtype):  # the model outside the ODE, in the group's precision too
            start = self._encode(kind, inputs)
        dtype, device = torch.promote_types(start.y0.dtype, torch.float32), start.y0.device  # bfloat16 out of autocast

        def column(values: list[float], dtype=dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        first_step = first_step_of(self.adapter, group.method)

        return group.stepper.init(
            group.dynamics,
            start.y0.to(dtype),
            start.t0,
            start.t_end,
            start.t_end,
            column([w.rtol for _, w in batch]),
            column([w.atol for _, w in batch]),
            first_step=None if first_step is None else column([first_step] * len(batch)),
            max_nfe=column([w.max_nfe for _, w in batch], torch.int64),
            sample_id=column([i for i, _ in batch], torch.int64),
        )

    def _finish(self, group: _Group, status: list[int], nfe: list[int]) -> list[Outcome]:
        """Outcomes of the rows whose solve ended (status no longer RUNNING); they leave."""
        done = [row for row, s in enumerate(status) if s != _RUNNING]
        if not done:
            return []
        state = group.rows
        index = torch.tensor(done, device=state.t.device)
        y1 = state.y.index_select(0, index)
        steps = state.steps.index_select(0, index).tolist()
        outputs: list[dict[str, Tensor]] = [{} for _ in done]
        by_kind: dict[Kind, list[int]] = defaultdict(list)
        for position, row in enumerate(done):
            by_kind[group.kinds[row]].append(position)
        for kind, positions in by_kind.items():
            with _autocast(self.device, group.dtype):
                result = self._decode(kind, y1[positions])
            for name, values in result.items():
                values = values.float().cpu()
                for j, position in enumerate(positions):
                    value = values[j]
                    if status[done[position]] != int(Status.SUCCESS):
                        value = torch.full_like(value, math.nan)
                    outputs[position][name] = value
        outcomes = [
            Outcome(group.ids[row], out, nfe[row], Status(status[row]), steps[position])
            for position, (row, out) in enumerate(zip(done, outputs))
        ]
        group.keep([row for row, s in enumerate(status) if s == _RUNNING])
        return outcomes


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
