"""The scheduler: every request's and item's lifecycle, and the batch of each solver step.

Plain Python: no torch, no gRPC, no threads. The clock is injected, so the scheduler and every
policy are testable with a fake executor and a fake clock. The engine loop is three calls:

    plan = scheduler.schedule()        # who joins, resumes, is parked or dropped
    outputs = executor.step(plan)      # one solver step over the running rows
    done = scheduler.update(outputs)   # NFE accounting, finished items and requests

Who runs in each step is the policy's decision (``config.policy``: :mod:`.fair`, :mod:`.fifo`,
:mod:`.static`, by name in :mod:`.registry`); the rest is here, the same for all of them.

Admission is shared between clients (a request's ``owner``: whoever the server identified):
beyond the queue limit itself, a client that already holds queued items may hold at most
``client_queue_share`` of the room the other clients leave free, so one client's burst never
fills the queue for everyone else. A client's first queued request is admitted whenever it fits.

Costs are function evaluations (NFE). A request may carry a total NFE budget: a step that
would take it over is not started, and the request fails with :class:`BudgetExhausted`. A
request with a deadline leaves as soon as it has passed, or earlier once even an optimistic
prediction (half the model card's NFE at its tolerance, at the measured step time) cannot
meet it. ``auto`` requests get the tightest tolerance whose predicted completion meets their
latency target.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import TIME_ALONE_WEIGHT, SchedulerConfig
from .policy import Level, Policy, Workload
from .registry import policy_class
from .requests import (
    ENDED_BY,
    BudgetExhausted,
    Cancelled,
    Candidate,
    Clock,
    Cost,
    Expired,
    Item,
    Plan,
    QueueFull,
    Request,
    State,
    StepOutputs,
)
from .step_time import StepTimer

_NEEDS_SLOT = (State.WAITING, State.RUNNING, State.PREEMPTED)  # a request's demand counts these items

OPTIMISTIC_NFE_FRACTION = 0.5
"""Deadline checks assume an item needs at least this share of the card's NFE at its
tolerance: items rarely need much less, so a request is only given up when it is clearly lost."""


@dataclass(frozen=True)
class _Queue:
    """Where a new request would stand (built for the first forecast after a ``schedule``): one
    priority level's requests in their order, with the expected row-steps (items × steps to go)
    ahead of each. Predictions look a request up here instead of re-planning."""

    orders: list[tuple[float, int]]
    work_before: list[float]  # expected row-steps of this level's requests ahead of each position
    work: float
    demand: int  # items


class Scheduler:
    """Every request's and item's lifecycle for one model; the batch of each step as its
    policy (``config.policy``) decides."""

    def __init__(self, config: SchedulerConfig, *, clock: Clock = time.monotonic) -> None:
        self.config, self.clock = config, clock
        self.max_batch, self.max_queued = config.max_batch, config.max_queued
        self.policy: Policy = policy_class(config.policy)(config)
        self.timer = StepTimer()
        self._requests: dict[int, Request] = {}  # not ended, by id (so oldest first)
        self._levels: dict[int, Level] = {}  # the same by priority, in the policy's order
        self._holding: dict[int, Request] = {}  # those with running items, by id
        self._watched: dict[int, Request] = {}  # those that may end before they finish: a deadline, or cancelled
        self._live: dict[int, Item] = {}  # running or parked items, by id
        self._held: list[Request] = []  # policy.holds_finished: finished, handed back when the batch ends
        self._queued = 0  # items waiting or parked
        self._queued_by: dict[Any, int] = {}  # the same, by owner (owners holding none are left out)
        self._running = 0
        self._queues: dict[int, _Queue] | None = None  # forecasts' view of the queue; None: build when asked
        self._step_started: float | None = None
        self._joining: list[Request] = []  # started by the plan being stepped: joined when it ends
        self._step_rows = 0

    # ---- views ---------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Items waiting to start or parked: what the queue limit counts."""
        return self._queued

    @property
    def running(self) -> int:
        return self._running

    @property
    def idle(self) -> bool:
        return not self._requests and not self._held

    # ---- intake ----------------------------------------------------------------------------
    def submit(
        self,
        payloads: Sequence[Any],
        *,
        cost: Cost,
        priority: int | None = None,
        deadline: float | None = None,
        budget: int | None = None,
        candidates: Sequence[Candidate] = (),
        latency_target: float | None = None,
        owner: Any = None,
    ) -> Request:
        """Queue a request's items, all or none. With ``candidates`` (tightest first), the
        request is ``auto``: it gets the tightest candidate tolerance predicted to finish
        within ``latency_target`` seconds (or by its deadline), else the loosest. ``owner``
        (hashable) names the client, whose share of the queue is bounded."""
        if not payloads:
            raise ValueError("a request needs at least one item")
        if self._queued + len(payloads) > self.max_queued:
            raise QueueFull(
                f"{self._queued} items queued; {len(payloads)} more would exceed the limit of {self.max_queued}"
            )
        self._check_share(owner, len(payloads))
        now = self.clock()
        request = Request(
            items=[],
            cost=cost,
            priority=self.config.default_priority if priority is None else priority,
            enqueued_at=now,
            deadline=deadline,
            budget=budget,
            owner=owner,
        )
        request.items = [Item(request, i, payload) for i, payload in enumerate(payloads)]
        if candidates:
            target = latency_target if latency_target is not None else (None if deadline is None else deadline - now)
            chosen = self._choose(request, candidates, target)
            request.tol, request.cost = chosen.tol, chosen.cost
        least = len(payloads) * (request.cost.start + request.cost.step)
        if budget is not None and least > budget:
            raise BudgetExhausted(
                f"an NFE budget of {budget} cannot pay for {len(payloads)} items: starting them and one step "
                f"each takes {least} function evaluations"
            )
        request.virtual_deadline = self._virtual_deadline(now, len(payloads), request.cost, deadline)
        request.counts[State.WAITING] = request.demand = len(payloads)
        self._queued += len(payloads)
        if owner is not None:
            self._queued_by[owner] = self._queued_by.get(owner, 0) + len(payloads)
        self._requests[request.id] = request
        level = self._levels.setdefault(request.priority, Level())
        level.add(request, self.policy.order(request))
        level.demand += len(payloads)
        if deadline is not None:
            self._watched[request.id] = request
        return request

    def _check_share(self, owner: Any, items: int) -> None:
        """A client holding queued items may hold at most ``client_queue_share`` of the room
        the other clients leave free: the queue never fills up with one client's work."""
        held = 0 if owner is None else self._queued_by.get(owner, 0)
        if not held:
            return
        room = self.max_queued - (self._queued - held)
        allowed = int(self.config.client_queue_share * room)
        if held + items > allowed:
            raise QueueFull(
                f"this client holds {held} queued items; {items} more would exceed its share of the queue "
                f"({allowed} of the {room} items other clients leave free): wait for its requests to finish"
            )

    def cancel(self, request: Request) -> None:
        """Takes effect at the next ``schedule``: the request's items leave the batch."""
        if not request.ended:
            request.error = Cancelled()
            self._watched[request.id] = request

    def cancel_all(self, error: Cancelled) -> int:
        """Every request not yet ended ends with ``error`` at the next ``schedule`` (a shutdown
        past its grace period); how many there were."""
        pending = [request for request in self._requests.values() if not request.ended]
        for request in pending:
            request.error = error
            self._watched[request.id] = request
        return len(pending)

    # ---- the step --------------------------------------------------------------------------
    def schedule(self) -> Plan:
        now = self.clock()
        plan = Plan()
        for request in list(self._watched.values()):
            reason = self._reason_to_end(request, now)
            if reason is not None:
                self._end(request, reason, plan)
        work = Workload(self._requests.values(), self._running, len(self._live), self._levels, self._holding.values())
        wanted = self.policy.slots(work, now)
        if wanted is None:
            plan.wake_after = self.policy.wake_after(work, now)
        else:
            self._queues = None  # built only when a forecast asks
            # Only requests given slots or holding some can change: the rest of the queue waits as it is.
            for request_id in sorted(wanted.keys() | self._holding.keys()):
                self._resize(self._requests[request_id], wanted.get(request_id, 0), plan, now)
        self._charge(plan)
        plan.running = self._running
        if plan.running:
            self._step_started, self._step_rows = now, plan.running
        elif self._held:  # a batch that ended with this plan
            plan.ended.extend(self._release_held())
        return plan

    def update(self, outputs: StepOutputs) -> list[Request]:
        """Account a step's outputs; returns the requests that finished."""
        now = self.clock()
        if self._step_started is not None:
            self.timer.observe(self._step_rows, now - self._step_started)
            self._step_started = None
        for request in self._joining:
            request.joined_at = now
        self._joining.clear()
        for item_id, nfe in outputs.nfe.items():
            item = self._live.get(item_id)
            if item is not None:
                item.request.nfe += nfe - item.nfe
                item.nfe = nfe
        finished: list[Request] = []
        for item_id, outcome in outputs.finished.items():
            item = self._live.pop(item_id, None)
            if item is None:  # its request ended meanwhile
                continue
            self._move(item, State.FINISHED)
            item.outcome = outcome
            request = item.request
            request.done += 1
            if request.done == len(request.items):
                request.state, request.finished_at = State.FINISHED, now
                self._forget(request)
                finished.append(request)
        if self.policy.holds_finished:
            self._held.extend(finished)
            return self._release_held() if not self._running else []
        return finished

    def fail_started(self, error: Exception) -> list[Request]:
        """The executor lost its state (a crash): every request with an item in the batch or
        parked fails with ``error``; requests still waiting to start are kept."""
        failed = []
        for request in list(self._requests.values()):
            if request.started_at is not None:
                self._end(request, error, Plan())
                failed.append(request)
        self._live.clear()
        self._step_started = None
        self._joining.clear()
        failed.extend(self._release_held())
        return failed

    def _resize(self, request: Request, slots: int, plan: Plan, now: float) -> None:
        """Park or start items of ``request`` until it holds ``slots`` running items."""
        running = request.count(State.RUNNING)
        if running == slots:
            return
        if running > slots:
            for item in reversed(request.items):  # the last admitted leave first
                if running == slots:
                    break
                if item.state is State.RUNNING:
                    self._move(item, State.PREEMPTED)
                    request.preemptions += 1
                    plan.park.append(item)
                    running -= 1
            return
        for item in request.items:
            if running >= slots:
                break
            if item.state is State.PREEMPTED:
                plan.resume.append(item)
            elif item.state is State.WAITING:
                plan.join.append(item)
                self._live[item.id] = item
            else:
                continue
            self._move(item, State.RUNNING)
            running += 1
            if request.started_at is None:
                request.started_at = now
                request.state = State.RUNNING
                self._joining.append(request)

    def _move(self, item: Item, state: State) -> None:
        """Change an item's state, keeping the counts by state up to date."""
        request, old = item.request, item.state
        counts = request.counts
        counts[old] = counts.get(old, 0) - 1
        counts[state] = counts.get(state, 0) + 1
        needs = (state in _NEEDS_SLOT) - (old in _NEEDS_SLOT)
        if needs:
            request.demand += needs
            self._levels[request.priority].demand += needs
        if state is not old and State.RUNNING in (state, old):
            if counts[State.RUNNING]:
                self._holding[request.id] = request
            else:
                self._holding.pop(request.id, None)
        queued = (State.WAITING, State.PREEMPTED)
        change = (state in queued) - (old in queued)
        if change:
            self._queued += change
            owner = item.request.owner
            if owner is not None:
                held = self._queued_by.get(owner, 0) + change
                if held:
                    self._queued_by[owner] = held
                else:
                    del self._queued_by[owner]
        self._running += (state is State.RUNNING) - (old is State.RUNNING)
        item.state = state

    def _charge(self, plan: Plan) -> None:
        """Stop, before the step, every request whose budget cannot pay for it."""
        joining = {id(item) for item in plan.join}
        for request in [self._holding[i] for i in sorted(self._holding)]:
            if request.budget is None:
                continue
            cost = request.cost
            running = [i for i in request.items if i.state is State.RUNNING]
            step = sum(cost.step + (cost.start if id(i) in joining else 0) for i in running)
            if request.nfe + step > request.budget:
                error = BudgetExhausted(
                    f"the request's NFE budget of {request.budget} is spent: {request.nfe} used, and the next step of its "
                    f"{len(running)} running items would take {step} more "
                    f"({request.done} of {len(request.items)} items had finished)"
                )
                self._end(request, error, plan)

    # ---- predictions -------------------------------------------------------------------------
    def _virtual_deadline(self, arrival: float, items: int, cost: Cost, deadline: float | None) -> float:
        """The call's deadline, or its arrival plus :data:`TIME_ALONE_WEIGHT` times what it would
        take alone on the batch (its steps, in as many waves as its items need, at the measured
        time per step), whichever is earlier."""
        steps = cost.steps(cost.expected) if cost.expected is not None else 1.0
        alone = math.ceil(items / self.max_batch) * steps * self.timer.predict(min(items, self.max_batch))
        return min(arrival + TIME_ALONE_WEIGHT * alone, math.inf if deadline is None else deadline)

    def predict_seconds(self, request: Request, cost: Cost) -> float:
        """How long ``request`` (not yet submitted) would take at ``cost`` if it arrived now.

        The batch works off ``max_batch`` row-steps per step; the request finishes once the
        work ahead of it (more urgent levels, and its own level's requests before it in the
        policy's order, as of the first forecast since the last schedule) and its own are
        done — and no sooner than its own steps one after another."""
        now = self.clock()
        n = len(request.items)
        steps = cost.steps(cost.expected) if cost.expected is not None else 1.0
        if self._queues is None:
            self._queues = {p: _queue(level, self.policy.order) for p, level in sorted(self._levels.items()) if level}
        queues = self._queues
        ahead = sum(q.work for p, q in queues.items() if p < request.priority)
        queue = queues.get(request.priority)
        if queue is not None:
            order = (self.policy.rank(now, self._virtual_deadline(now, n, cost, request.deadline)), -1)
            ahead += queue.work_before[bisect.bisect_left(queue.orders, order)]
        rows = min(self.max_batch, sum(q.demand for q in queues.values()) + n)
        return max(steps, (ahead + n * steps) / self.max_batch) * self.timer.predict(rows)

    def _choose(self, request: Request, candidates: Sequence[Candidate], target: float | None) -> Candidate:
        if target is None:
            return candidates[0]
        for candidate in candidates:
            if self.predict_seconds(request, candidate.cost) <= self.config.auto_headroom * target:
                return candidate
        return candidates[-1]

    def _hopeless(self, request: Request, now: float) -> bool:
        """Even with half the card's NFE per item, the deadline cannot be met."""
        cost = request.cost
        if request.deadline is None or cost.expected is None or not self.timer.observed:
            return False
        optimistic = OPTIMISTIC_NFE_FRACTION * cost.expected
        done = max(
            (max(0.0, (i.nfe - cost.start) / cost.step) for i in request.items if not i.state.terminal), default=0.0
        )
        steps = max(1.0, cost.steps(optimistic) - done)
        return now + steps * self.timer.predict(self._running or 1) > request.deadline

    def _reason_to_end(self, request: Request, now: float) -> Exception | None:
        if isinstance(request.error, Cancelled):
            return request.error
        if request.expired(now):
            return Expired("the request's deadline passed before it finished; its items were stopped")
        if self._hopeless(request, now):
            return Expired("the request cannot finish by its deadline at the current load; it was stopped early")
        return None

    # ---- endings -----------------------------------------------------------------------------
    def _end(self, request: Request, error: Exception, plan: Plan) -> None:
        state = next((state for kind, state in ENDED_BY.items() if isinstance(error, kind)), State.FAILED)
        request.state, request.error, request.finished_at = state, error, self.clock()
        for item in request.items:
            if item.state in (State.RUNNING, State.PREEMPTED):
                self._live.pop(item.id, None)
                if item in plan.join:  # never reached the executor
                    plan.join.remove(item)
                else:  # a row of the executor's, running or parked
                    for change in (plan.resume, plan.park):
                        if item in change:
                            change.remove(item)
                    plan.drop.append(item)
            if not item.state.terminal:
                self._move(item, state)
        self._forget(request)
        plan.ended.append(request)

    def _forget(self, request: Request) -> None:
        """``request`` has ended: out of the indexes of the requests not ended (it left the
        holders when its last item stopped running)."""
        if self._requests.pop(request.id, None) is not None:
            self._levels[request.priority].remove(request)
        self._watched.pop(request.id, None)

    def _release_held(self) -> list[Request]:
        held, self._held = self._held, []
        return held


def _queue(level: Level, key: Callable[[Request], tuple[float, int]]) -> _Queue:
    orders, before, total = [], [], 0.0
    for request in level:
        orders.append(key(request))
        before.append(total)
        total += request.demand * request.cost.steps(request.cost.expected or 0.0)
    before.append(total)
    return _Queue(orders, before, total, level.demand)
