"""The engine: per model, a worker thread that runs solver steps over all running items.

Requests come in from any thread (``submit`` returns a future); the worker admits queued
items between steps (``Scheduler``), advances the batch (``Executor``), completes requests
as their last item finishes, and reports plain stats. No gRPC here.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from neuralode.solvers import Status

from .adapters import Adapter
from .executor import Executor, Outcome, Work
from .scheduler import Clock, Item, QueueFull, Request, Scheduler
from .stats import ItemStats, QueueStats, StatsSink, StepStats, discard

log = logging.getLogger("server.engine")

__all__ = ["Engine", "EngineClosed", "QueueFull", "RequestCancelled", "RequestExpired", "Result", "WorkerRetired"]


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work."""


class WorkerRetired(EngineClosed):
    """The model version asked for was replaced by a reload; the caller looks it up again."""


class RequestCancelled(Exception):
    pass


class RequestExpired(Exception):
    pass


@dataclass
class Result:
    """A completed request: outputs stacked in item order, per-item cost and status."""

    outputs: dict[str, np.ndarray]
    nfe: list[int]
    statuses: list[Status]
    queue_seconds: float
    compute_seconds: float


@dataclass(eq=False)
class _Pending:
    request: Request
    future: Future
    method: str
    outcomes: list[Outcome | None] = field(default_factory=list)


class ModelWorker:
    def __init__(
        self,
        name: str,
        adapter: Adapter,
        device: torch.device,
        *,
        max_batch: int,
        max_queued: int,
        batching: str,
        max_delay: float,
        clock: Clock,
        stats: StatsSink,
    ) -> None:
        self.name, self.clock, self.stats = name, clock, stats
        self.scheduler = Scheduler(max_batch=max_batch, max_queued=max_queued, mode=batching, max_delay=max_delay, clock=clock)
        self.executor = Executor(adapter, device)
        self.max_batch = max_batch
        self._lock = threading.Condition()
        self._pending: dict[int, _Pending] = {}  # request id -> pending
        self._running: dict[int, Item] = {}  # item id -> item
        self._finished: list[Outcome] = []  # solved, not yet handed back (static batching)
        self.hold_until_batch_ends = batching == "static"
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- called from request threads ---------------------------------------------------
    def submit(self, works: list[Work], deadline: float | None) -> tuple[Request, Future]:
        with self._lock:
            if self._closing:
                raise WorkerRetired(f"the worker for {self.name} takes no new work")
            request, _ = self.scheduler.submit(works, deadline)
            future: Future = Future()
            self._pending[request.id] = _Pending(request, future, works[0].method, [None] * len(works))
            self._lock.notify()
        return request, future

    def cancel(self, request: Request) -> None:
        with self._lock:
            self.scheduler.cancel(request)
            self._lock.notify()

    def stop_accepting(self) -> None:
        """Refuse new requests; what was accepted still runs to completion."""
        with self._lock:
            self._closing = True
            self._lock.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._pending

    # ---- the worker thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._fail(self.scheduler.purge())
                self._fail(self.scheduler.dropped(self._running.values()), running=True)
                self._hand_back()
                joining = self.scheduler.admit(self.executor.running)
                self._running.update((item.id, item) for item in joining)
                if not self._running:
                    if self._closing and not self._pending:
                        return
                    self.stats(QueueStats(self.name, self.scheduler.queued, 0, self.scheduler.max_queued))
                    wake_after = self.scheduler.wake_after()
                    self._lock.wait(timeout=0.5 if wake_after is None else wake_after)
                    continue
                queued = self.scheduler.queued
            try:
                if joining:
                    self.executor.join([(item.id, item.payload) for item in joining])
                reports = self.executor.step()
            except Exception as error:  # a model bug must fail its requests, not the server
                log.exception("model %s failed a step", self.name)
                with self._lock:
                    self._abort(error)
                continue
            for report in reports:
                self.stats(StepStats(self.name, report.method, report.batch_size, self.max_batch, report.rejected))
                if report.finished:
                    self.stats(ItemStats(self.name, report.method, tuple(o.nfe for o in report.finished),
                                         tuple(o.status.name for o in report.finished)))  # fmt: skip
            self.stats(QueueStats(self.name, queued, self.executor.running, self.scheduler.max_queued))
            with self._lock:
                self._finished.extend(outcome for report in reports for outcome in report.finished)
                self._hand_back()

    def _hand_back(self) -> None:
        """Complete finished items; static batching returns a batch as one unit, once its
        last item is done (or has been dropped)."""
        if self.hold_until_batch_ends and self.executor.running:
            return
        for outcome in self._finished:
            self._complete(outcome)
        self._finished.clear()

    def _complete(self, outcome: Outcome) -> None:
        item = self._running.pop(outcome.item_id, None)
        if item is None:
            return
        pending = self._pending.get(item.request.id)
        if pending is None:
            return
        pending.outcomes[item.index] = outcome
        item.request.done += 1
        if item.request.done == item.request.items:
            del self._pending[item.request.id]
            now = self.clock()
            started = item.request.started_at if item.request.started_at is not None else now
            outcomes = pending.outcomes
            outputs = {name: np.stack([o.outputs[name].numpy() for o in outcomes]) for name in outcomes[0].outputs}
            pending.future.set_result(
                Result(
                    outputs=outputs,
                    nfe=[o.nfe for o in outcomes],
                    statuses=[o.status for o in outcomes],
                    queue_seconds=started - item.request.enqueued_at,
                    compute_seconds=now - started,
                )
            )

    def _fail(self, items: list[Item], running: bool = False) -> None:
        if not items:
            return
        if running:
            self.executor.drop({item.id for item in items})
            for item in items:
                self._running.pop(item.id, None)
        for item in items:
            pending = self._pending.pop(item.request.id, None)
            if pending is not None and not pending.future.done():
                error = RequestCancelled() if item.request.cancelled else RequestExpired()
                pending.future.set_exception(error)

    def _abort(self, error: Exception) -> None:
        self.executor.drop(set(self._running))
        self._running.clear()
        for pending in self._pending.values():
            if not pending.future.done() and pending.request.started_at is not None:
                pending.future.set_exception(error)
        self._pending = {k: p for k, p in self._pending.items() if not p.future.done()}


class Engine:
    """One worker per served model version, all on one device.

    Workers are keyed by the caller (the server uses ``name@version``), so a reloaded model
    gets a fresh worker while the retired one finishes what it accepted on the old weights.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        max_batch: int = 256,
        max_queued: int = 4096,
        batching: str = "continuous",
        max_delay: float = 0.005,
        clock: Clock = time.monotonic,
        stats: StatsSink = discard,
    ) -> None:
        self.device, self.clock, self.stats = device, clock, stats
        self._settings = dict(max_batch=max_batch, max_queued=max_queued, batching=batching, max_delay=max_delay)
        self.workers: dict[str, ModelWorker] = {}
        self._retired: list[tuple[str, ModelWorker]] = []
        self._lock = threading.Lock()

    def add(self, key: str, adapter: Adapter, label: str | None = None) -> None:
        """Start a worker for ``key``; ``label`` names it in stats (default: the key)."""
        worker = ModelWorker(label or key, adapter, self.device, clock=self.clock, stats=self.stats, **self._settings)
        with self._lock:
            if key in self.workers:
                raise ValueError(f"engine already has a worker for {key!r}")
            self.workers[key] = worker

    def retire(self, key: str) -> None:
        """Stop giving ``key`` new work; what it accepted still runs to completion."""
        with self._lock:
            worker = self.workers.pop(key)
            self._retired = [(k, w) for k, w in self._retired if w.alive]
            self._retired.append((key, worker))
        worker.stop_accepting()

    def submit(self, key: str, works: list[Work], timeout: float | None = None) -> tuple[Request, Future]:
        """Queue a request's items; raises QueueFull (nothing queued), WorkerRetired (the
        model was reloaded meanwhile: look it up again) or EngineClosed."""
        deadline = None if timeout is None else self.clock() + timeout
        worker = self.workers.get(key)
        if worker is None:
            raise WorkerRetired(f"no worker for {key!r}")
        return worker.submit(works, deadline)

    def cancel(self, key: str, request: Request) -> None:
        with self._lock:
            worker = self.workers.get(key) or next((w for k, w in self._retired if k == key), None)
        if worker is not None:
            worker.cancel(request)

    @property
    def idle(self) -> bool:
        with self._lock:
            workers = [*self.workers.values(), *(w for _, w in self._retired)]
        return all(worker.idle for worker in workers)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, let accepted requests finish within ``timeout``, stop the workers."""
        end = time.monotonic() + timeout
        with self._lock:
            workers = [*self.workers.values(), *(w for _, w in self._retired)]
        for worker in workers:
            worker.stop_accepting()
        for worker in workers:
            worker.join(max(0.0, end - time.monotonic()))
