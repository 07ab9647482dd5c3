"""The torch side of the engine: one model's running batch, advanced one solver step at a time.

Rows are items from any request and any tolerance; each row's ``sample_id`` is its item's id.
Items join (``join``) and leave (``drop``, or by finishing in ``step``) between steps. Rows
that use different methods run as separate groups, each stepped in turn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from neuralode.solvers import SolverState, Status, Stepper, get_method
from neuralode.solvers.stepper import Norm

from .adapters import Adapter


@dataclass(frozen=True)
class Work:
    """What one item asks for. ``inputs`` is the item's raw input row (on the CPU)."""

    kind: str
    inputs: Tensor
    rtol: float
    atol: float
    method: str
    max_nfe: int
    seed: int = 0


@dataclass(frozen=True)
class Outcome:
    item_id: int
    outputs: dict[str, Tensor]  # on the CPU; NaN where the solve failed
    nfe: int
    status: Status


@dataclass(frozen=True)
class StepReport:
    method: str
    batch_size: int
    rejected: int
    finished: list[Outcome]


class _Group:
    def __init__(self, method: str, max_steps: int, norm: Norm) -> None:
        self.stepper = Stepper(get_method(method), norm=norm, max_steps=max_steps)
        self.state: SolverState | None = None
        self.kinds: dict[int, str] = {}  # item id -> kind, for the rows of ``state``

    @property
    def size(self) -> int:
        return 0 if self.state is None else self.state.batch_size


class Executor:
    def __init__(self, adapter: Adapter, device: torch.device, max_steps: int = 100_000) -> None:
        self.adapter, self.device, self.max_steps = adapter, device, max_steps
        self.groups: dict[str, _Group] = {}

    @property
    def running(self) -> int:
        return sum(group.size for group in self.groups.values())

    @torch.no_grad()
    def join(self, items: list[tuple[int, Work]]) -> None:
        """Start the ODEs of new items: their initial evaluations run now, on them alone."""
        by_group: dict[tuple[str, str], list[tuple[int, Work]]] = defaultdict(list)
        for item_id, work in items:
            by_group[(work.method, work.kind)].append((item_id, work))
        for (method, kind), batch in by_group.items():
            group = self.groups.get(method) or self.groups.setdefault(method, _Group(method, self.max_steps, self.adapter.norm))
            inputs = torch.stack([work.inputs for _, work in batch])
            if self.device.type == "cuda":
                inputs = inputs.pin_memory()
            inputs = inputs.to(self.device, non_blocking=True)
            start = self.adapter.start(kind, inputs, [work.seed for _, work in batch])
            dtype, device = start.y0.dtype, start.y0.device

            def column(values: list[float], dtype=dtype) -> Tensor:
                return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

            state = group.stepper.init(
                self.adapter.dynamics,
                start.y0,
                start.t0,
                start.t_end,
                start.t_end,
                column([w.rtol for _, w in batch]),
                column([w.atol for _, w in batch]),
                max_nfe=column([w.max_nfe for _, w in batch], torch.int64),
                sample_id=column([i for i, _ in batch], torch.int64),
            )
            group.state = state if group.state is None else SolverState.cat([group.state, state])
            group.kinds.update((item_id, kind) for item_id, _ in batch)

    def drop(self, item_ids: set[int]) -> None:
        """Remove rows (cancelled or expired items) before the next step."""
        for group in self.groups.values():
            if group.state is None or not group.kinds.keys() & item_ids:
                continue
            keep = [row for row, i in enumerate(group.state.sample_id.tolist()) if i not in item_ids]
            self._keep(group, keep)

    @torch.no_grad()
    def step(self) -> list[StepReport]:
        """One attempted solver step for every running row; finished rows leave."""
        reports = []
        for method, group in self.groups.items():
            if group.state is None:
                continue
            size = group.state.batch_size
            state, record = group.stepper.step(self.adapter.dynamics, group.state)
            group.state = state
            done = state.status != int(Status.RUNNING)
            # The one host synchronisation per step: are any rows done, and how many rejected?
            any_done, rejected = torch.stack([done.any().long(), (~record.accepted).sum()]).tolist()
            finished = self._finish(group, done) if any_done else []
            reports.append(StepReport(method, size, rejected, finished))
        return reports

    def _finish(self, group: _Group, done: Tensor) -> list[Outcome]:
        state = group.state
        rows = done.nonzero().squeeze(1)
        ids = state.sample_id[rows].tolist()
        statuses = [Status(s) for s in state.status[rows].tolist()]
        nfe = state.nfe[rows].tolist()
        y1 = state.y[rows]
        outputs: list[dict[str, Tensor]] = [{} for _ in ids]
        by_kind: dict[str, list[int]] = defaultdict(list)
        for position, item_id in enumerate(ids):
            by_kind[group.kinds.pop(item_id)].append(position)
        for kind, positions in by_kind.items():
            result = self.adapter.finish(kind, y1[positions])
            for name, values in result.items():
                values = values.float().cpu()
                for j, position in enumerate(positions):
                    value = values[j]
                    if statuses[position] != Status.SUCCESS:
                        value = torch.full_like(value, math.nan)
                    outputs[position][name] = value
        keep = (~done).nonzero().squeeze(1)
        group.state = state.select(keep) if keep.numel() else None
        return [Outcome(i, out, n, s) for i, out, n, s in zip(ids, outputs, nfe, statuses)]

    @staticmethod
    def _keep(group: _Group, rows: list[int]) -> None:
        state = group.state
        kept_ids = set()
        if rows:
            index = torch.tensor(rows, device=state.t.device)
            group.state = state.select(index)
            kept_ids = set(group.state.sample_id.tolist())
        else:
            group.state = None
        group.kinds = {i: k for i, k in group.kinds.items() if i in kept_ids}
