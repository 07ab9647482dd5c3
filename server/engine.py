"""The engine: per model, a worker thread whose loop is ``schedule → step → update``.

Requests come in from any thread (``submit`` returns a future). The scheduler owns every
request's state and decides each step's batch; the executor applies that and steps; the
worker only moves between the two, resolves futures and reports plain stats. Any exception
in an iteration fails the requests it touched (never a hang), the model reads NOT_SERVING
while a fresh executor replaces the old one, and the worker carries on. No gRPC here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from neuralode.compiled import Compiled, CompiledDynamics
from neuralode.solvers import Status

from .adapters import Adapter
from .api import Timeline
from .config import EngineConfig
from .executor import Executor, ExecutorOutputs, Work, first_step_of, step_cost
from .scheduling import (
    BudgetExhausted,
    Cancelled,
    Candidate,
    Clock,
    Expired,
    Plan,
    QueueFull,
    Request,
    Scheduler,
    State,
)
from .stats import (
    CompileStats,
    ItemStats,
    IterationStats,
    PhaseTimes,
    QueueStats,
    RequestEndStats,
    StatsSink,
    StepStats,
    WorkerStats,
    discard,
)

log = logging.getLogger("server.engine")

__all__ = [
    "BudgetExhausted",
    "Engine",
    "EngineClosed",
    "QueueFull",
    "RequestCancelled",
    "RequestExpired",
    "Result",
    "Runtime",
    "SchedulingTerms",
    "ShutDown",
    "WorkerFailed",
    "WorkerRetired",
]

RequestCancelled, RequestExpired = Cancelled, Expired
HealthSink = Callable[[str, bool], None]
"""Told ``(model label, serving)`` when a worker starts and stops recovering from a crash."""

_RESTART_BACKOFF = (0.0, 0.1, 0.5, 2.0)  # seconds NOT_SERVING after consecutive crashes
STOP_SECONDS = 10.0  # past the grace period, how long a worker may take to end its current step


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work."""


class WorkerRetired(EngineClosed):
    """The model version asked for was replaced by a reload; the caller looks it up again."""


class ShutDown(Cancelled, EngineClosed):
    """The server stopped past its grace period before the request finished; its items were
    stopped (the caller may retry elsewhere)."""


class WorkerFailed(Exception):
    """The model's worker crashed while the request was in its batch; it was restarted."""


@dataclass(frozen=True)
class SchedulingTerms:
    """How the engine schedules a request, beyond its items' own accuracy settings: what the
    server settled from the request's ``scheduling`` (:class:`server.api.Scheduling`), its
    caller and the server's limits.

    ``priority``: lower is more urgent (None: the server's default). ``budget``: most function
    evaluations over all items. ``auto``: solve at the tightest of ``tolerances`` (the model
    card's, tightest first) predicted to finish within ``latency_target`` seconds, or by the
    deadline when no target is given. ``owner``: the client, whose share of the queue is
    bounded (None: not counted per client)."""

    priority: int | None = None
    budget: int | None = None
    auto: bool = False
    latency_target: float | None = None
    owner: str | None = None


@dataclass
class Result:
    """A completed request: outputs stacked in item order, per-item cost and status, and
    when it passed each stage (for traces)."""

    outputs: dict[str, np.ndarray]
    nfe: list[int]
    statuses: list[Status]
    queue_seconds: float
    compute_seconds: float
    rtol: float
    atol: float
    preemptions: int = 0
    steps: list[int] = field(default_factory=list)  # accepted solver steps per item
    timeline: Timeline | None = None


def _serving(name: str, serving: bool) -> None:
    """A health sink for callers without a health service."""


@dataclass(frozen=True)
class Runtime:
    """What an engine's workers share besides their settings: the device, the clock, and
    where stats and health changes go."""

    device: torch.device
    clock: Clock = time.monotonic
    stats: StatsSink = discard
    health: HealthSink = _serving


class ModelWorker:
    """One served model version: its scheduler, its executor and the thread between them.
    ``expected_nfe(method, tol)`` is the model card's NFE per item and ``tolerances`` the
    card's evaluated ones, for deadlines and ``auto`` requests."""

    def __init__(
        self,
        name: str,
        adapter: Adapter,
        config: EngineConfig,
        runtime: Runtime,
        *,
        expected_nfe: Callable[[str, float], float | None],
        tolerances: Sequence[float],
    ) -> None:
        self.name, self.adapter, self.config = name, adapter, config
        self.device, self.clock, self.stats, self.health = runtime.device, runtime.clock, runtime.stats, runtime.health
        self.expected_nfe = expected_nfe
        self.tolerances = sorted(tolerances)
        self.max_batch = config.scheduler.max_batch
        self.scheduler = Scheduler(config.scheduler, clock=self.clock)
        self.times = PhaseTimes()  # where each iteration's time goes, for IterationStats
        self.dynamics = self._dynamics()
        self.executor = self._executor()
        self._lock = threading.Condition()
        self._futures: dict[int, Future] = {}
        self._closing = False
        self._warming = False  # warm-up solves: no traffic, so nothing of theirs is reported
        self._crashes = 0
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def _dynamics(self) -> Callable | None:
        """f as every executor of this worker evaluates it: compiled per padded batch size with
        ``compile_dynamics`` (None: the adapter's, eager)."""
        if not self.config.compile_dynamics:
            return None

        def compiled(size: Compiled) -> None:
            log.info(
                "model %s: f compiled for %d rows (%s) in %.1f s: %.2f ms against %.2f ms eager; %s",
                self.name,
                size.rows,
                size.precision,
                size.compile_seconds,
                size.compiled_ms,
                size.eager_ms,
                "compiled" if size.kept else "eager kept",
            )
            # Counted during the warm-up too: compiles are the model's, not a request's.
            self.stats(CompileStats(self.name, size.rows, size.precision, size.compile_seconds, size.kept))

        return CompiledDynamics(self.adapter.dynamics, max_rows=self.max_batch, on_compile=compiled)

    def _executor(self) -> Executor:
        return Executor(
            self.adapter, self.device, step_graphs=self.config.step_graphs, dynamics=self.dynamics, times=self.times
        )

    # ---- called from request threads ---------------------------------------------------
    def submit(self, works: list[Work], deadline: float | None, scheduling: SchedulingTerms) -> tuple[Request, Future]:
        """Queue a request's items (which share one method and tolerance)."""
        method, tol = works[0].method, works[0].rtol
        cost = step_cost(method, first_step_of(self.adapter, method))
        candidates: list[Candidate] = []
        if scheduling.auto:
            candidates = [Candidate(t, cost.with_expected(self.expected_nfe(method, t))) for t in self.tolerances]
        else:
            cost = cost.with_expected(self.expected_nfe(method, tol))
        with self._lock:
            if self._closing:
                raise WorkerRetired(f"the worker for {self.name} takes no new work")
            if not self._thread.is_alive():
                raise EngineClosed(f"the worker for {self.name} has stopped")
            try:
                request = self.scheduler.submit(
                    works,
                    cost=cost,
                    priority=scheduling.priority,
                    deadline=deadline,
                    budget=scheduling.budget,
                    candidates=candidates,
                    latency_target=scheduling.latency_target,
                    owner=scheduling.owner,
                )
            except BudgetExhausted:
                self.stats(RequestEndStats(self.name, "budget_exhausted"))
                raise
            future: Future = Future()
            self._futures[request.id] = future
            self._lock.notify()
        return request, future

    def cancel(self, request: Request) -> None:
        with self._lock:
            self.scheduler.cancel(request)
            self._lock.notify()

    def warm_up(self, requests: Sequence[list[Work]]) -> list[Result]:
        """Solve ``requests`` one after the other, before the model takes traffic: their steps,
        items and queue are not reported as stats, nor a crash of theirs to health (the model
        is not served yet). Raises what a request would (:class:`WorkerFailed`, ...)."""
        with self._lock:
            self._warming = True
        try:
            return [self.submit(works, None, SchedulingTerms())[1].result() for works in requests]
        finally:
            with self._lock:  # the iteration that resolved the last one reports to the sink it began with
                self._warming = False

    def stop_accepting(self) -> None:
        """Refuse new requests; what was accepted still runs to completion."""
        with self._lock:
            self._closing = True
            self._lock.notify()

    def abort(self, error: ShutDown) -> int:
        """Refuse new requests and end every accepted one with ``error`` at the next step
        (the worker then stops); how many there were."""
        with self._lock:
            self._closing = True
            stopped = self.scheduler.cancel_all(error)
            self._lock.notify()
        return stopped

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._futures

    # ---- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
                self._crashes = 0
            except Exception as error:  # noqa: BLE001 - a crash fails its requests, never the worker
                self._recover(error)

    def _iterate(self) -> bool:
        """One ``schedule → step → update``; False once closing and nothing is left."""
        times = self.times
        times.take()  # a crashed iteration's, or an idle one's
        with self._lock:
            stats = discard if self._warming else self.stats
            with times.phase("schedule"):
                plan = self.scheduler.schedule()
            self._resolve(plan.ended)
            idle = not plan.steps and not plan.drop
            if idle:
                if self._closing and self.scheduler.idle:
                    return False
                queued = self.scheduler.queued
                self._lock.wait(timeout=0.5 if plan.wake_after is None else plan.wake_after)
        if idle:
            stats(QueueStats(self.name, queued, 0, self.scheduler.max_queued))
            return True
        outputs = self.executor.step(plan)
        with self._lock:
            with times.phase("update"):
                finished = self.scheduler.update(outputs)
            # Reported before the callers hear: a caller that reads /metrics after its answer
            # finds its items counted.
            self._report(plan, outputs, self.scheduler.queued, stats)
            self._resolve(finished)
        return True

    def _report(self, plan: Plan, outputs: ExecutorOutputs, queued: int, stats: StatsSink) -> None:
        stats(
            IterationStats(
                self.name,
                self.times.take(),
                joined=len(plan.join),
                resumed=len(plan.resume),
                parked=len(plan.park),
                dropped=len(plan.drop),
            )
        )
        parked = Counter((item.payload.method, item.payload.precision) for item in plan.park)
        for group in outputs.groups:
            if group.batch_size:
                stats(
                    StepStats(
                        self.name,
                        group.method,
                        group.batch_size,
                        self.max_batch,
                        group.rejected,
                        preempted=parked[group.method, group.precision],
                        precision=group.precision,
                    )
                )
            if group.finished:
                stats(
                    ItemStats(
                        self.name,
                        group.method,
                        tuple(o.nfe for o in group.finished),
                        tuple(o.status.name for o in group.finished),
                        group.precision,
                    )
                )
        stats(QueueStats(self.name, queued, self.executor.running, self.scheduler.max_queued))

    def _resolve(self, requests: list[Request]) -> None:
        """Hand ended requests back to their callers (under the lock)."""
        for request in requests:
            future = self._futures.pop(request.id, None)
            if future is None or future.done():
                continue
            if request.state is not State.FINISHED:
                if isinstance(request.error, BudgetExhausted):
                    self.stats(RequestEndStats(self.name, "budget_exhausted"))
                future.set_exception(request.error)
                continue
            try:
                future.set_result(self._result(request))
            except Exception as error:  # noqa: BLE001 - a bad result fails its own request only
                log.exception("model %s could not assemble a result", self.name)
                future.set_exception(WorkerFailed(f"the result could not be assembled: {type(error).__name__}"))

    def _result(self, request: Request) -> Result:
        outcomes = [item.outcome for item in request.items]
        now = self.clock()
        started = request.started_at if request.started_at is not None else now
        finished = request.finished_at or now
        work: Work = request.items[0].payload
        return Result(
            outputs={name: np.stack([o.outputs[name].numpy() for o in outcomes]) for name in outcomes[0].outputs},
            nfe=[o.nfe for o in outcomes],
            statuses=[o.status for o in outcomes],
            queue_seconds=started - request.enqueued_at,
            compute_seconds=finished - started,
            rtol=work.rtol if request.tol is None else request.tol,
            atol=work.atol if request.tol is None else request.tol,
            preemptions=request.preemptions,
            steps=[o.steps for o in outcomes],
            timeline=Timeline(request.enqueued_at, started, request.joined_at or finished, finished),
        )

    def _recover(self, error: Exception) -> None:
        """Fail what the crashed iteration touched, then carry on with a fresh executor."""
        log.exception("model %s: the worker failed; restarting it", self.name)
        with self._lock:
            health = _serving if self._warming else self.health
        pause = _RESTART_BACKOFF[min(self._crashes, len(_RESTART_BACKOFF) - 1)]
        self._crashes += 1
        self.restarts += 1
        try:
            health(self.name, False)
            failure = WorkerFailed(
                f"the model's worker failed ({type(error).__name__}: {str(error)[:200]}) "
                "and was restarted; the request's items were stopped"
            )
            with self._lock:
                self.executor = self._executor()  # f's compiled sizes survive: they are the model's
                self._resolve(self.scheduler.fail_started(failure))
            self.stats(WorkerStats(self.name, "restart"))
        except Exception:  # noqa: BLE001 - recovery itself must never end the worker
            log.exception("model %s: recovering from a failure failed too", self.name)
        time.sleep(pause)
        try:
            health(self.name, True)
        except Exception:  # noqa: BLE001
            log.exception("model %s: the health sink failed", self.name)


def _no_card(method: str, tol: float) -> float | None:
    return None


class Engine:
    """One worker per served model version, all on one device.

    Workers are keyed by the caller (the server uses ``name@version``), so a reloaded model
    gets a fresh worker while the retired one finishes what it accepted on the old weights.
    """

    def __init__(
        self,
        device: torch.device,
        config: EngineConfig = EngineConfig(),
        *,
        clock: Clock = time.monotonic,
        stats: StatsSink = discard,
        health: HealthSink = _serving,
    ) -> None:
        self.config = config
        self.runtime = Runtime(device, clock, stats, health)
        self.device, self.clock, self.stats, self.health = device, clock, stats, health
        self.workers: dict[str, ModelWorker] = {}
        self._retired: list[tuple[str, ModelWorker]] = []
        self._lock = threading.Lock()

    def add(
        self,
        key: str,
        adapter: Adapter,
        label: str | None = None,
        *,
        expected_nfe: Callable[[str, float], float | None] = _no_card,
        tolerances: Sequence[float] = (),
    ) -> None:
        """Start a worker for ``key``; ``label`` names it in stats and health (default: the
        key). ``expected_nfe(method, tol)`` is the model card's NFE per item and
        ``tolerances`` the card's evaluated ones, for deadlines and ``auto`` requests."""
        worker = ModelWorker(
            label or key, adapter, self.config, self.runtime, expected_nfe=expected_nfe, tolerances=tolerances
        )
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

    def submit(
        self,
        key: str,
        works: list[Work],
        timeout: float | None = None,
        scheduling: SchedulingTerms = SchedulingTerms(),
    ) -> tuple[Request, Future]:
        """Queue a request's items; raises QueueFull or BudgetExhausted (nothing queued),
        WorkerRetired (the model was reloaded meanwhile: look it up again) or EngineClosed."""
        deadline = None if timeout is None else self.clock() + timeout
        worker = self.workers.get(key)
        if worker is None:
            raise WorkerRetired(f"no worker for {key!r}")
        return worker.submit(works, deadline, scheduling)

    def warm_up(self, key: str, requests: Sequence[list[Work]]) -> list[Result]:
        """Solve ``requests`` one after the other on ``key``'s worker before it is given
        traffic, unreported (:meth:`ModelWorker.warm_up`): what the first requests of each
        shape would otherwise pay (allocations, kernel selection, CUDA graph captures) is paid
        here, in this worker's executor."""
        return self.workers[key].warm_up(requests)

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

    def close(self, timeout: float = 30.0) -> list[str]:
        """Refuse new work, let accepted requests finish within ``timeout``, then stop what is
        left (its requests fail with :class:`ShutDown`) and the workers. Returns the names of
        workers still inside a step ``STOP_SECONDS`` after that (none, unless a model hangs)."""
        end = time.monotonic() + timeout
        with self._lock:
            workers = [*self.workers.values(), *(w for _, w in self._retired)]
        for worker in workers:
            worker.stop_accepting()
        for worker in workers:
            worker.join(max(0.0, end - time.monotonic()))
        running = [worker for worker in workers if worker.alive]
        if running:
            error = ShutDown(
                "the server shut down before the request finished (its grace period passed); "
                "its items were stopped; retry on another replica"
            )
            stopped = sum(worker.abort(error) for worker in running)
            log.warning("grace period over: stopped %d request(s) still in flight", stopped)
            end = time.monotonic() + STOP_SECONDS
            for worker in running:
                worker.join(max(0.0, end - time.monotonic()))
        return [worker.name for worker in workers if worker.alive]
