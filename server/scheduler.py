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
  convention); within a level, the running batch is shared max-min fairly between requests
  (water-filling by item count: a request needing fewer slots than its share gets all it
  needs, the others split the rest), remainder slots going to the earliest deadline, then
  the earliest arrival. A request over its share is preempted, row by row, when others wait.
* ``fifo``: first come, first served; nothing is preempted (the engine before v2).
* ``static``: a batch starts only when nothing runs and either ``max_batch`` items wait or the
  oldest has waited ``max_delay``; it runs to its end and its requests complete together.

Costs are function evaluations (NFE). A request may carry a total NFE budget: a step that
would take it over is not started, and the request fails with :class:`BudgetExhausted`. A
request with a deadline leaves as soon as it has passed, or earlier once even an optimistic
prediction (half the model card's NFE at its tolerance, at the measured step time) cannot
meet it. ``auto`` requests get the tightest tolerance whose predicted completion meets their
latency target.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]
POLICIES = ("fair", "fifo", "static")

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
    state: State = State.WAITING
    error: Exception | None = None  # why it did not finish
    nfe: int = 0  # spent so far, over all items
    done: int = 0  # items finished
    started_at: float | None = None  # when its first item joined a batch
    finished_at: float | None = None
    preemptions: int = 0
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def ended(self) -> bool:
        return self.state.terminal

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _urgency(self) -> tuple[float, float, int]:
        return (math.inf if self.deadline is None else self.deadline, self.enqueued_at, self.id)


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


class Scheduler:
    def __init__(
        self,
        *,
        max_batch: int,
        max_queued: int,
        policy: str = "fair",
        max_delay: float = 0.0,
        default_priority: int = 1,
        clock: Clock = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_batch < 1 or max_queued < 1:
            raise ValueError("max_batch and max_queued must be >= 1")
        self.max_batch, self.max_queued, self.policy = max_batch, max_queued, policy
        self.max_delay, self.default_priority, self.clock = max_delay, default_priority, clock
        self.timer = StepTimer()
        self._requests: dict[int, Request] = {}  # not ended, by id
        self._live: dict[int, Item] = {}  # running or parked items, by id
        self._held: list[Request] = []  # static mode: finished, handed back when the batch ends
        self._step_started: float | None = None
        self._step_rows = 0

    # ---- views ---------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Items waiting to start or parked: what the queue limit counts."""
        return sum(1 for r in self._requests.values() for i in r.items if i.state in (State.WAITING, State.PREEMPTED))

    @property
    def running(self) -> int:
        return sum(1 for item in self._live.values() if item.state is State.RUNNING)

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
    ) -> Request:
        """Queue a request's items, all or none. With ``candidates`` (tightest first), the
        request is ``auto``: it gets the tightest candidate tolerance predicted to finish
        within ``latency_target`` seconds (or by its deadline), else the loosest."""
        if not payloads:
            raise ValueError("a request needs at least one item")
        queued = self.queued
        if queued + len(payloads) > self.max_queued:
            raise QueueFull(f"{queued} items queued; {len(payloads)} more would exceed the limit of {self.max_queued}")
        now = self.clock()
        request = Request(items=[], cost=cost, priority=self.default_priority if priority is None else priority,
                          enqueued_at=now, deadline=deadline, budget=budget)  # fmt: skip
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
        self._requests[request.id] = request
        return request

    def cancel(self, request: Request) -> None:
        """Takes effect at the next ``schedule``: the request's items leave the batch."""
        if not request.ended:
            request.error = Cancelled()

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
            self._schedule_shared(plan, now)
        self._charge(plan)
        plan.running = self.running
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
            item.state, item.outcome = State.FINISHED, outcome
            request = item.request
            request.done += 1
            if request.done == len(request.items):
                request.state, request.finished_at = State.FINISHED, now
                del self._requests[request.id]
                finished.append(request)
        if self.policy == "static":
            self._held.extend(finished)
            return self._release_held() if not self.running else []
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
    def _schedule_shared(self, plan: Plan, now: float) -> None:
        requests = list(self._requests.values())
        if self.policy == "fifo":
            wanted = self._fifo(requests)
        else:
            wanted = self._fair_shares(requests)
        for request in requests:
            self._resize(request, wanted.get(request.id, 0), plan, now)

    def _schedule_static(self, plan: Plan, now: float) -> None:
        if self._live:
            return
        waiting = sorted(self._requests.values(), key=lambda r: r.id)
        count = sum(len(r.items) for r in waiting)
        if not waiting or (count < self.max_batch and now - waiting[0].enqueued_at < self.max_delay):
            plan.wake_after = self.wake_after()
            return
        for request, n in self._fifo(waiting).items():
            self._resize(self._requests[request], n, plan, now)

    def _fifo(self, requests: list[Request]) -> dict[int, int]:
        """Running items keep their slots; free ones go to waiting items in arrival order."""
        free = self.max_batch - self.running
        wanted = {}
        for request in sorted(requests, key=lambda r: r.id):
            running = sum(1 for i in request.items if i.state is State.RUNNING)
            waiting = sum(1 for i in request.items if i.state in (State.WAITING, State.PREEMPTED))
            extra = min(waiting, free)
            wanted[request.id], free = running + extra, free - extra
        return wanted

    def _fair_shares(self, requests: list[Request], extra: Request | None = None) -> dict[int, int]:
        """Slots per request: strict priority between levels, max-min fair within one."""
        demand = {r.id: sum(1 for i in r.items if not i.state.terminal) for r in requests}
        if extra is not None:
            requests = [*requests, extra]
            demand[extra.id] = len(extra.items)
        shares: dict[int, int] = {}
        left = self.max_batch
        for priority in sorted({r.priority for r in requests}):
            level = [r for r in requests if r.priority == priority]
            for request_id, n in _water_fill(level, demand, left).items():
                shares[request_id] = n
                left -= n
        return shares

    def _resize(self, request: Request, slots: int, plan: Plan, now: float) -> None:
        """Park or start items of ``request`` until it holds ``slots`` running items."""
        running = [i for i in request.items if i.state is State.RUNNING]
        for item in reversed(running[slots:]):  # the last admitted leave first
            item.state = State.PREEMPTED
            request.preemptions += 1
            plan.park.append(item)
        del running[slots:]
        for item in request.items:
            if len(running) >= slots:
                break
            if item.state is State.PREEMPTED:
                plan.resume.append(item)
            elif item.state is State.WAITING:
                plan.join.append(item)
                self._live[item.id] = item
            else:
                continue
            item.state = State.RUNNING
            running.append(item)
            if request.started_at is None:
                request.started_at = now
                request.state = State.RUNNING

    def _charge(self, plan: Plan) -> None:
        """Stop, before the step, every request whose budget cannot pay for it."""
        joining = {id(item) for item in plan.join}
        for request in list(self._requests.values()):
            if request.budget is None:
                continue
            cost = request.cost
            step = sum(cost.step + (cost.start if id(i) in joining else 0) for i in request.items if i.state is State.RUNNING)
            if step and request.nfe + step > request.budget:
                error = BudgetExhausted(
                    f"the request's NFE budget of {request.budget} is spent: {request.nfe} used, and the next step of its "
                    f"{sum(1 for i in request.items if i.state is State.RUNNING)} running items would take {step} more "
                    f"({request.done} of {len(request.items)} items had finished)"
                )
                self._end(request, error, plan)

    # ---- predictions -------------------------------------------------------------------------
    def predict_seconds(self, request: Request, cost: Cost) -> float:
        """How long ``request`` (not yet submitted) would take at ``cost`` if it arrived now:
        its rows' steps at the batch size it would run in, in as many waves as its share of
        the batch needs."""
        requests = list(self._requests.values())
        share = (self._fair_shares(requests, extra=request).get(request.id, 0) if self.policy == "fair"
                 else max(0, self.max_batch - self.running))  # fmt: skip
        if share == 0:
            return math.inf
        waves = math.ceil(len(request.items) / share)
        batch = min(self.max_batch, self.running + len(request.items))
        steps = cost.steps(cost.expected) if cost.expected is not None else 1.0
        return waves * steps * self.timer.predict(batch)

    def _choose(self, request: Request, candidates: Sequence[Candidate], target: float | None) -> Candidate:
        if target is None:
            return candidates[0]
        for candidate in candidates:
            if self.predict_seconds(request, candidate.cost) <= target:
                return candidate
        return candidates[-1]

    def _hopeless(self, request: Request, now: float) -> bool:
        """Even with half the card's NFE per item, the deadline cannot be met."""
        if request.deadline is None or request.cost.expected is None or not self.timer.observed:
            return False
        remaining = [i for i in request.items if not i.state.terminal]
        optimistic = OPTIMISTIC_NFE_FRACTION * request.cost.expected
        cost = request.cost
        done = max(max(0.0, (i.nfe - cost.start) / cost.step) for i in remaining)
        steps = max(1.0, cost.steps(optimistic) - done)
        return now + steps * self.timer.predict(self.running or 1) > request.deadline

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
        request.state = next((state for kind, state in _ENDED_BY.items() if isinstance(error, kind)), State.FAILED)
        request.error, request.finished_at = error, self.clock()
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
                item.state = request.state
        self._requests.pop(request.id, None)
        plan.ended.append(request)

    def _release_held(self) -> list[Request]:
        held, self._held = self._held, []
        return held


def _water_fill(requests: Iterable[Request], demand: dict[int, int], slots: int) -> dict[int, int]:
    """Max-min fair split of ``slots`` by demand: requests needing less than an equal share
    get all they need, the others the same number each; slots that do not divide evenly go
    to the most urgent of those (earliest deadline, then earliest arrival)."""
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
        for other in sorted(capped, key=Request._urgency)[:remainder]:
            shares[other.id] += 1
        break
    return shares
