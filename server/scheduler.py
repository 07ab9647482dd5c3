"""The scheduler: every request's and item's lifecycle, and the batch of each solver step.

Plain Python: no torch, no gRPC, no threads. The clock is injected, so every policy below is
testable with a fake executor and a fake clock. The engine loop is three calls:

    plan = scheduler.schedule()        # who joins, resumes, is parked or dropped
    outputs = executor.step(plan)      # one solver step over the running rows
    done = scheduler.update(outputs)   # NFE accounting, finished items and requests

An item is one ODE solve (an image, a point, a sample). Its states:

    WAITING ──► RUNNING ──► FINISHED
                 ▲   │
                 │   ▼
               PREEMPTED            (any of these) ──► CANCELLED / EXPIRED / FAILED

Parking an item is free of loss: its row of solver state is all it needs to resume, so a
preempted item ends bit-identical to one that never was.

Policies (``policy``):

* ``fair`` (default): strict priority levels (lower value is more urgent, Triton's
  convention). Within a level, ``guaranteed_share`` of the slots (and at least one per
  request, while there are slots for all) is split max-min fairly between requests
  (water-filling by item count: one that needs fewer slots than an equal share gets all it
  needs, the others the same number each), so no request waits while another holds the batch. The other slots go by earliest *virtual deadline* — the call's
  deadline, or its arrival plus what it would take alone on the batch, whichever is earlier —
  each request taking what it still needs. Work is served nearly in arrival order (the tail
  stays that of first-come-first-served), yet a cheap request overtakes an expensive one that
  arrived shortly before it. A request holding more than it is allocated is preempted, row by
  row, for the others. No level starves: while less urgent levels have work, each level leaves
  them ``lower_level_share`` of the rows still free (at least one), so a flood of urgent work
  slows the others down but never stops them.
* ``fifo``: first come, first served; nothing is preempted (the engine before v2).
* ``static``: a batch starts only when nothing runs and either ``max_batch`` items wait or the
  oldest has waited ``max_delay``; it runs to its end and its requests complete together.

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
import enum
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]
POLICIES = ("fair", "fifo", "static")

GUARANTEED_SHARE = 0.25
"""The default fraction of a priority level's batch slots split equally between its requests."""
LOWER_LEVEL_SHARE = 0.1
"""The default fraction of the free rows each priority level leaves the less urgent levels while
they have work (at least one row): strict priority, without starvation."""
CLIENT_QUEUE_SHARE = 0.5
"""The default fraction of the queue room left free by other clients that one client may hold."""
AUTO_HEADROOM = 0.25
"""The default share of its target within which ``auto`` must be predicted to finish: forecasts
made at arrival miss the work that arrives after, and under overload that is most (at a half,
fewer requests were on time; docs/server.md)."""

OPTIMISTIC_NFE_FRACTION = 0.5
"""Deadline checks assume an item needs at least this share of the card's NFE at its
tolerance: items rarely need much less, so a request is only given up when it is clearly lost."""


class QueueFull(Exception):
    """Accepting the request would exceed the queue limit; nothing was queued."""


class BudgetExhausted(Exception):
    """The request's NFE budget cannot pay for what it still needs; its items were stopped."""


class Expired(Exception):
    """The request's deadline passed, or cannot be met."""


class Cancelled(Exception):
    """The client cancelled the request."""


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = {State.FINISHED, State.FAILED, State.CANCELLED, State.EXPIRED}
_ENDED_BY = {Cancelled: State.CANCELLED, Expired: State.EXPIRED}


@dataclass(frozen=True)
class Cost:
    """What an item's solve costs, in function evaluations: ``start`` to begin (the initial
    evaluations), ``step`` per attempted step, and ``expected`` in all (the model card's mean
    at the request's tolerance; None when the card does not say)."""

    start: int
    step: int
    expected: float | None = None

    def with_expected(self, expected: float | None) -> Cost:
        return Cost(self.start, self.step, expected)

    def steps(self, nfe: float) -> float:
        """Attempted steps an item needs to reach ``nfe`` evaluations, at least one."""
        return max(1.0, (nfe - self.start) / self.step)


@dataclass(frozen=True)
class Candidate:
    """A tolerance an ``auto`` request may be solved at, and its cost there."""

    tol: float
    cost: Cost


@dataclass(eq=False)
class Request:
    """A client request: items that complete together."""

    items: list[Item]
    cost: Cost
    priority: int
    enqueued_at: float
    deadline: float | None = None  # on the scheduler's clock
    budget: int | None = None  # most NFE over all items
    tol: float | None = None  # chosen for an ``auto`` request; None: the items' own
    owner: Any = None  # the client, for fair admission; None: not counted per client
    state: State = State.WAITING
    error: Exception | None = None  # why it did not finish
    nfe: int = 0  # spent so far, over all items
    done: int = 0  # items finished
    started_at: float | None = None  # when its first item joined a batch
    finished_at: float | None = None
    preemptions: int = 0
    virtual_deadline: float = math.inf  # the fair policy's order for slots beyond the guaranteed
    counts: dict[State, int] = field(default_factory=dict)  # items by state, kept by the scheduler
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def ended(self) -> bool:
        return self.state.terminal

    @property
    def demand(self) -> int:
        """Items that still need a slot (waiting, running or parked)."""
        return self.count(State.WAITING) + self.count(State.RUNNING) + self.count(State.PREEMPTED)

    def count(self, state: State) -> int:
        return self.counts.get(state, 0)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _order(self) -> tuple[float, int]:
        return (self.virtual_deadline, self.id)


@dataclass(eq=False)
class Item:
    request: Request
    index: int
    payload: Any  # opaque here: whatever the executor needs
    state: State = State.WAITING
    nfe: int = 0
    outcome: Any = None  # the executor's result, once FINISHED
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class Plan:
    """One step's changes to the running batch; the executor applies them, then steps."""

    join: list[Item] = field(default_factory=list)  # start their solves
    resume: list[Item] = field(default_factory=list)  # parked rows back into the batch
    park: list[Item] = field(default_factory=list)  # out of the batch, state kept
    drop: list[Item] = field(default_factory=list)  # running or parked: state discarded
    ended: list[Request] = field(default_factory=list)  # ended while scheduling
    running: int = 0  # rows in the batch once the plan is applied
    wake_after: float | None = None  # nothing to step: seconds until something may start

    @property
    def steps(self) -> bool:
        return self.running > 0


@dataclass(frozen=True)
class StepOutputs:
    """What the executor reports after a step: every stepped item's NFE so far, and the
    outcomes (anything with meaning to the engine) of the items whose solve ended."""

    nfe: dict[int, int]
    finished: dict[int, Any]


class StepTimer:
    """Seconds per solver step as a function of batch size, fitted online.

    A step costs a fixed overhead plus a share per row; both are estimated by least squares
    with exponential forgetting, so the estimate follows the machine's load. Once a few steps
    were seen, an observation counts as at most ``OUTLIER`` times the prediction: one step
    stalled by the machine must not make every deadline look hopeless."""

    OUTLIER = 3.0

    def __init__(self, memory: float = 0.95) -> None:
        self.memory = memory
        self._sums = [0.0] * 5  # weight, Σb, Σt, Σb², Σbt

    @property
    def observed(self) -> bool:
        return self._sums[0] > 0

    def observe(self, batch: int, seconds: float) -> None:
        if self._sums[0] >= 5:
            seconds = min(seconds, self.OUTLIER * self.predict(batch))
        w, sb, st, sbb, sbt = (self.memory * s for s in self._sums)
        self._sums = [w + 1, sb + batch, st + seconds, sbb + batch * batch, sbt + batch * seconds]

    def predict(self, batch: int) -> float:
        w, sb, st, sbb, sbt = self._sums
        if w == 0:
            return 0.0
        mean_b, mean_t = sb / w, st / w
        variance = sbb / w - mean_b * mean_b
        if variance < 1.0:  # one batch size seen: assume time proportional to rows
            return mean_t * max(batch, 1) / max(mean_b, 1.0)
        slope = max(0.0, (sbt / w - mean_b * mean_t) / variance)
        intercept = max(0.0, mean_t - slope * mean_b)
        return intercept + slope * max(batch, 1)


@dataclass(frozen=True)
class _Queue:
    """Where a new request would stand, from the last ``schedule``: one priority level's
    requests in their order, with the expected row-steps (items × steps to go) ahead of each.
    Predictions look a request up here instead of re-planning."""

    orders: list[tuple[float, int]]
    work_before: list[float]  # expected row-steps of this level's requests ahead of each position
    work: float
    demand: int  # items


class Scheduler:
    def __init__(
        self,
        *,
        max_batch: int,
        max_queued: int,
        policy: str = "fair",
        max_delay: float = 0.0,
        default_priority: int = 1,
        guaranteed_share: float = GUARANTEED_SHARE,
        auto_headroom: float = AUTO_HEADROOM,
        lower_level_share: float = LOWER_LEVEL_SHARE,
        client_queue_share: float = CLIENT_QUEUE_SHARE,
        clock: Clock = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_batch < 1 or max_queued < 1:
            raise ValueError("max_batch and max_queued must be >= 1")
        if not 0.0 <= guaranteed_share <= 1.0:
            raise ValueError(f"guaranteed_share must be in [0, 1], got {guaranteed_share}")
        if not 0.0 < auto_headroom <= 1.0:
            raise ValueError(f"auto_headroom must be in (0, 1], got {auto_headroom}")
        if not 0.0 <= lower_level_share < 1.0:
            raise ValueError(f"lower_level_share must be in [0, 1), got {lower_level_share}")
        if not 0.0 < client_queue_share <= 1.0:
            raise ValueError(f"client_queue_share must be in (0, 1], got {client_queue_share}")
        self.max_batch, self.max_queued, self.policy = max_batch, max_queued, policy
        self.max_delay, self.default_priority, self.clock = max_delay, default_priority, clock
        self.guaranteed_share, self.auto_headroom = guaranteed_share, auto_headroom
        self.lower_level_share, self.client_queue_share = lower_level_share, client_queue_share
        self.timer = StepTimer()
        self._requests: dict[int, Request] = {}  # not ended, by id
        self._live: dict[int, Item] = {}  # running or parked items, by id
        self._held: list[Request] = []  # static mode: finished, handed back when the batch ends
        self._queued = 0  # items waiting or parked
        self._queued_by: dict[Any, int] = {}  # the same, by owner (owners holding none are left out)
        self._running = 0
        self._queues: dict[int, _Queue] = {}
        self._step_started: float | None = None
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
        request = Request(items=[], cost=cost, priority=self.default_priority if priority is None else priority,
                          enqueued_at=now, deadline=deadline, budget=budget, owner=owner)  # fmt: skip
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
        request.counts[State.WAITING] = len(payloads)
        self._queued += len(payloads)
        if owner is not None:
            self._queued_by[owner] = self._queued_by.get(owner, 0) + len(payloads)
        self._requests[request.id] = request
        return request

    def _check_share(self, owner: Any, items: int) -> None:
        """A client holding queued items may hold at most ``client_queue_share`` of the room
        the other clients leave free: the queue never fills up with one client's work."""
        held = 0 if owner is None else self._queued_by.get(owner, 0)
        if not held:
            return
        room = self.max_queued - (self._queued - held)
        allowed = int(self.client_queue_share * room)
        if held + items > allowed:
            raise QueueFull(
                f"this client holds {held} queued items; {items} more would exceed its share of the queue "
                f"({allowed} of the {room} items other clients leave free): wait for its requests to finish"
            )

    def cancel(self, request: Request) -> None:
        """Takes effect at the next ``schedule``: the request's items leave the batch."""
        if not request.ended:
            request.error = Cancelled()

    def cancel_all(self, error: Cancelled) -> int:
        """Every request not yet ended ends with ``error`` at the next ``schedule`` (a shutdown
        past its grace period); how many there were."""
        pending = [request for request in self._requests.values() if not request.ended]
        for request in pending:
            request.error = error
        return len(pending)

    # ---- the step --------------------------------------------------------------------------
    def schedule(self) -> Plan:
        now = self.clock()
        plan = Plan()
        for request in list(self._requests.values()):
            reason = self._reason_to_end(request, now)
            if reason is not None:
                self._end(request, reason, plan)
        if self.policy == "static":
            self._schedule_static(plan, now)
        else:
            requests = list(self._requests.values())
            wanted = self._fifo(requests) if self.policy == "fifo" else self._shares(requests)
            for request in requests:
                self._resize(request, wanted.get(request.id, 0), plan, now)
        self._charge(plan)
        plan.running = self._running
        if plan.running:
            self._step_started, self._step_rows = now, plan.running
        elif self.policy == "static" and self._held:  # a batch that ended with this plan
            plan.ended.extend(self._release_held())
        return plan

    def update(self, outputs: StepOutputs) -> list[Request]:
        """Account a step's outputs; returns the requests that finished."""
        now = self.clock()
        if self._step_started is not None:
            self.timer.observe(self._step_rows, now - self._step_started)
            self._step_started = None
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
                del self._requests[request.id]
                finished.append(request)
        if self.policy == "static":
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
        failed.extend(self._release_held())
        return failed

    def wake_after(self) -> float | None:
        """Seconds until static batching's delay lets the oldest waiting item start."""
        if self.policy != "static":
            return None
        waiting = [r.enqueued_at for r in self._requests.values() if r.started_at is None]
        return None if not waiting else max(0.0, min(waiting) + self.max_delay - self.clock())

    # ---- policies ----------------------------------------------------------------------------
    def _schedule_static(self, plan: Plan, now: float) -> None:
        if self._live:
            return
        waiting = sorted(self._requests.values(), key=lambda r: r.id)
        count = sum(len(r.items) for r in waiting)
        if not waiting or (count < self.max_batch and now - waiting[0].enqueued_at < self.max_delay):
            plan.wake_after = self.wake_after()
            return
        for request_id, n in self._fifo(waiting).items():
            self._resize(self._requests[request_id], n, plan, now)

    def _fifo(self, requests: list[Request]) -> dict[int, int]:
        """Running items keep their slots; free ones go to waiting items in arrival order."""
        free = self.max_batch - self._running
        wanted = {}
        ordered = sorted(requests, key=lambda r: r.id)
        for request in ordered:
            extra = min(request.count(State.WAITING) + request.count(State.PREEMPTED), free)
            wanted[request.id], free = request.count(State.RUNNING) + extra, free - extra
        self._remember(ordered, key=lambda r: (r.enqueued_at, r.id))
        return wanted

    def _shares(self, requests: list[Request]) -> dict[int, int]:
        """Slots per request: priority between levels (each leaving the less urgent ones
        ``lower_level_share`` of the free slots while they have work); within one, the
        guaranteed share split max-min fairly, the rest by earliest virtual deadline."""
        shares: dict[int, int] = {}
        left = self.max_batch
        self._queues = {}
        priorities = sorted({r.priority for r in requests})
        level_demand = {p: 0 for p in priorities}
        for request in requests:
            level_demand[request.priority] += request.demand
        below = sum(level_demand.values())
        for priority in priorities:
            level = sorted((r for r in requests if r.priority == priority), key=Request._order)
            demand = {r.id: r.demand for r in level}
            below -= level_demand[priority]
            # Rows kept for the less urgent levels while they have work: none of them starves.
            kept = min(below, math.ceil(self.lower_level_share * left)) if self.lower_level_share else 0
            free = left - kept
            # At least a slot per request while there are slots for all: nobody waits for a first one.
            pool = min(free, max(int(self.guaranteed_share * free), len(level)))
            guaranteed = _water_fill(level, demand, pool)
            spare = free - sum(guaranteed.values())
            for request in level:
                extra = min(demand[request.id] - guaranteed[request.id], spare)
                shares[request.id] = guaranteed[request.id] + extra
                spare -= extra
            left -= sum(shares[r.id] for r in level)
            self._queues[priority] = _queue(level, key=Request._order)
        return shares

    def _remember(self, ordered: list[Request], key) -> None:
        self._queues = {
            p: _queue([r for r in ordered if r.priority == p], key=key) for p in {r.priority for r in ordered}
        }

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

    def _move(self, item: Item, state: State) -> None:
        """Change an item's state, keeping the counts by state up to date."""
        counts, old = item.request.counts, item.state
        counts[old] = counts.get(old, 0) - 1
        counts[state] = counts.get(state, 0) + 1
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
        for request in list(self._requests.values()):
            if request.budget is None or not request.count(State.RUNNING):
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
        """The call's deadline, or its arrival plus what it would take alone on the batch (its
        steps, in as many waves as its items need, at the measured time per step), whichever
        is earlier. Weights above 1 on the time alone were measured and let cheap requests
        overtake further at a worse p99 (docs/server.md)."""
        steps = cost.steps(cost.expected) if cost.expected is not None else 1.0
        alone = math.ceil(items / self.max_batch) * steps * self.timer.predict(min(items, self.max_batch))
        return min(arrival + alone, math.inf if deadline is None else deadline)

    def predict_seconds(self, request: Request, cost: Cost) -> float:
        """How long ``request`` (not yet submitted) would take at ``cost`` if it arrived now.

        The batch works off ``max_batch`` row-steps per step; the request finishes once the
        work ahead of it (more urgent levels, and its own level's requests before it in the
        policy's order, as of the last schedule) and its own are done — and no sooner than its
        own steps one after another."""
        now = self.clock()
        n = len(request.items)
        steps = cost.steps(cost.expected) if cost.expected is not None else 1.0
        ahead = sum(q.work for p, q in self._queues.items() if p < request.priority)
        queue = self._queues.get(request.priority)
        if queue is not None:
            place = now if self.policy != "fair" else self._virtual_deadline(now, n, cost, request.deadline)
            order = (place, -1)
            ahead += queue.work_before[bisect.bisect_left(queue.orders, order)]
        rows = min(self.max_batch, sum(q.demand for q in self._queues.values()) + n)
        return max(steps, (ahead + n * steps) / self.max_batch) * self.timer.predict(rows)

    def _choose(self, request: Request, candidates: Sequence[Candidate], target: float | None) -> Candidate:
        if target is None:
            return candidates[0]
        for candidate in candidates:
            if self.predict_seconds(request, candidate.cost) <= self.auto_headroom * target:
                return candidate
        return candidates[-1]

    def _hopeless(self, request: Request, now: float) -> bool:
        """Even with half the card's NFE per item, the deadline cannot be met."""
        if request.deadline is None or request.cost.expected is None or not self.timer.observed:
            return False
        cost = request.cost
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
        state = next((state for kind, state in _ENDED_BY.items() if isinstance(error, kind)), State.FAILED)
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
        self._requests.pop(request.id, None)
        plan.ended.append(request)

    def _release_held(self) -> list[Request]:
        held, self._held = self._held, []
        return held


def _queue(level: list[Request], key) -> _Queue:
    orders, before, total = [], [], 0.0
    for request in level:
        orders.append(key(request))
        before.append(total)
        total += request.demand * request.cost.steps(request.cost.expected or 0.0)
    before.append(total)
    return _Queue(orders, before, total, sum(request.demand for request in level))


def _water_fill(requests: Iterable[Request], demand: dict[int, int], slots: int) -> dict[int, int]:
    """Max-min fair split of ``slots`` by demand: requests needing less than an equal share
    get all they need, the others the same number each; slots that do not divide evenly go
    to those with the earliest virtual deadlines."""
    pending = sorted(requests, key=lambda r: demand[r.id])
    shares = {r.id: 0 for r in pending}
    left = max(0, slots)
    for position, request in enumerate(pending):
        rest = len(pending) - position
        if demand[request.id] * rest <= left:
            shares[request.id] = demand[request.id]
            left -= demand[request.id]
            continue
        capped = pending[position:]
        level, remainder = divmod(left, rest)
        for other in capped:
            shares[other.id] = level
        for other in sorted(capped, key=Request._order)[:remainder]:
            shares[other.id] += 1
        break
    return shares
