"""The scheduler with a fake executor on an injected clock: no torch, no gRPC, no threads.

Each fake item is an ODE that needs a known number of steps; a step costs ``STEP`` function
evaluations per row and ``seconds_per_row`` of fake time per row of the batch."""

from __future__ import annotations

import pytest
from toy_policy import NewestFirst

import server.scheduling.scheduler as scheduler_module
from server.scheduling import (
    POLICIES,
    TIME_ALONE_WEIGHT,
    BudgetExhausted,
    Cancelled,
    Candidate,
    Cost,
    Expired,
    FairShare,
    FirstComeFirstServed,
    Level,
    Plan,
    QueueFull,
    Scheduler,
    SchedulerConfig,
    State,
    StaticBatching,
    StepOutputs,
    StepTimer,
    Workload,
    policy_class,
)

START, STEP = 2, 6
COST = Cost(start=START, step=STEP)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeExecutor:
    """Rows that finish after ``payload`` steps (an item's payload is its number of steps).
    Parked rows keep their progress, as solver rows do."""

    def __init__(self, clock: FakeClock, seconds_per_row: float = 0.001) -> None:
        self.clock, self.seconds_per_row = clock, seconds_per_row
        self.running: dict[int, list] = {}  # item id -> [steps done, steps needed, nfe]
        self.parked: dict[int, list] = {}
        self.batch_sizes: list[int] = []

    def step(self, plan: Plan) -> StepOutputs:
        for item in plan.drop:
            self.running.pop(item.id, None) or self.parked.pop(item.id)
        for item in plan.park:
            self.parked[item.id] = self.running.pop(item.id)
        for item in plan.resume:
            self.running[item.id] = self.parked.pop(item.id)
        for item in plan.join:
            self.running[item.id] = [0, item.payload, START]
        assert len(self.running) == plan.running
        self.batch_sizes.append(len(self.running))
        finished = {}
        for item_id, row in self.running.items():
            row[0] += 1
            row[2] += STEP
            if row[0] == row[1]:
                finished[item_id] = ("done", row[2])
        nfe = {item_id: row[2] for item_id, row in self.running.items()}
        for item_id in finished:
            del self.running[item_id]
        self.clock.now += self.seconds_per_row * max(len(nfe), 1)
        return StepOutputs(nfe=nfe, finished=finished)


class Harness:
    def __init__(self, **settings) -> None:
        self.clock = FakeClock()
        self.executor = FakeExecutor(self.clock, settings.pop("seconds_per_row", 0.001))
        config = SchedulerConfig(**{"max_batch": 8, "max_queued": 10_000, "max_delay": 0.0, **settings})
        self.scheduler = Scheduler(config, clock=self.clock)
        self.steps = 0
        self.ended: list = []

    def submit(self, steps: list[int], **options):
        options.setdefault("cost", COST)
        return self.scheduler.submit(steps, **options)

    def step(self) -> Plan:
        plan = self.scheduler.schedule()
        self.ended += plan.ended
        if plan.steps or plan.drop:
            self.ended += self.scheduler.update(self.executor.step(plan))
            self.steps += 1
        return plan

    def run_until(self, request, limit: int = 10_000) -> int:
        """Steps until ``request`` ends, waiting (on the fake clock) whenever nothing can
        step; returns how many steps were taken."""
        begin = self.steps
        for _ in range(limit):
            if request.ended:
                return self.steps - begin
            plan = self.step()
            if not plan.steps:
                self.clock.now += plan.wake_after or 0.001
        raise AssertionError("the request never ended")


# ---- continuous batching, first come first served ------------------------------------------
def test_fifo_fills_free_slots_in_arrival_order_and_never_preempts():
    h = Harness(max_batch=4, policy="fifo")
    first = h.submit([5, 5, 5])
    second = h.submit([5, 5])
    plan = h.step()
    assert [i.payload for i in plan.join] == [5, 5, 5, 5]
    assert [i.request for i in plan.join] == [first] * 3 + [second]
    late = h.submit([1])
    assert h.step().join == [] and not plan.park
    assert h.run_until(first) == 3  # steps 3..5 of its items
    h.run_until(late)
    assert late.started_at > first.started_at
    assert first.preemptions == second.preemptions == 0


def test_queue_overflow_is_refused_at_once_and_queues_nothing():
    h = Harness(max_batch=2, max_queued=3)
    h.submit([1, 1])
    with pytest.raises(QueueFull, match="2 items queued; 2 more would exceed the limit of 3"):
        h.submit([1, 1])
    assert h.scheduler.queued == 2
    h.submit([1])
    assert h.scheduler.queued == 3


# ---- static batching ---------------------------------------------------------------------------
def test_static_waits_for_a_full_batch_or_the_delay():
    h = Harness(max_batch=3, policy="static", max_delay=0.010)
    h.submit([1])
    plan = h.step()
    assert not plan.steps and plan.wake_after == pytest.approx(0.010)
    h.clock.now += 0.004
    h.submit([1])
    assert not h.step().steps
    h.clock.now += 0.006  # the oldest item has now waited max_delay
    assert len(h.step().join) == 2


def test_static_runs_a_batch_to_its_end_and_hands_its_requests_back_together():
    h = Harness(max_batch=2, policy="static", max_delay=10.0)
    quick, slow = h.submit([1]), h.submit([3])
    late = h.submit([1])
    h.step()
    assert quick.state is State.FINISHED and h.ended == []  # held until the batch ends
    h.step()
    assert h.ended == []
    h.step()
    assert h.ended == [quick, slow] and late.state is State.WAITING
    h.run_until(late)
    assert late.started_at >= slow.finished_at


# ---- cancellation and deadlines ------------------------------------------------------------------
def test_cancelled_and_expired_requests_leave_queue_and_batch_at_the_next_step():
    h = Harness(max_batch=10)
    cancelled = h.submit([50, 50])
    expiring = h.submit([50], deadline=h.clock.now + 1.0)
    kept = h.submit([50])
    h.step()
    late = h.submit([50], deadline=h.clock.now + 0.5)
    h.scheduler.cancel(cancelled)
    h.clock.now += 2.0
    plan = h.step()
    assert sorted(i.request.id for i in plan.drop) == sorted([cancelled.id, cancelled.id, expiring.id])
    assert cancelled.state is State.CANCELLED and isinstance(cancelled.error, Cancelled)
    assert expiring.state is State.EXPIRED and late.state is State.EXPIRED and isinstance(late.error, Expired)
    assert all(i.state is State.CANCELLED for i in cancelled.items)
    assert kept.state is State.RUNNING and set(h.executor.running) == {kept.items[0].id}


def test_a_request_that_cannot_meet_its_deadline_leaves_early():
    h = Harness(max_batch=8, seconds_per_row=0.010)  # a step of 4 rows: 40 ms
    background = h.submit([1000] * 4)
    for _ in range(20):  # the timer learns the step time
        h.step()
    expensive = Cost(START, STEP, expected=START + 100 * STEP)  # the card says ~100 steps, 4 s here
    doomed = h.submit([100], cost=expensive, deadline=h.clock.now + 1.0)
    h.step()
    assert doomed.state is State.EXPIRED and "cannot finish by its deadline" in str(doomed.error)
    assert h.clock.now < doomed.deadline  # it left long before its deadline
    feasible = h.submit([10], cost=Cost(START, STEP, expected=START + 10 * STEP), deadline=h.clock.now + 1.0)
    h.run_until(feasible)
    assert feasible.state is State.FINISHED and background.state is State.RUNNING


# ---- fair share and preemption -----------------------------------------------------------------
def test_a_small_request_preempts_a_big_one_for_its_share_and_the_big_one_resumes():
    h = Harness(max_batch=8)
    big = h.submit([40] * 32)
    for _ in range(3):
        h.step()
    small = h.submit([3])
    plan = h.step()
    assert [i.request for i in plan.join] == [small] and [i.request for i in plan.park] == [big]
    assert h.run_until(small) == 2  # its 3 steps, the first taken in the step it joined
    plan = h.step()
    assert [i.request for i in plan.resume] == [big] and big.preemptions == 1
    h.run_until(big)
    assert big.state is State.FINISHED and all(i.nfe == START + 40 * STEP for i in big.items)
    assert max(h.executor.batch_sizes) == 8


def test_the_guaranteed_share_is_max_min_fair_and_the_rest_goes_by_virtual_deadline():
    h = Harness(max_batch=40, guaranteed_share=0.25)  # 10 slots split fairly, 30 by virtual deadline
    h.run_until(h.submit([1]))  # the timer learns the step time
    cheap, dear = Cost(START, STEP, START + 2 * STEP), Cost(START, STEP, START + 50 * STEP)
    small = h.submit([100] * 2, cost=cheap)
    expensive = h.submit([100] * 20, cost=dear)  # would take 50 steps alone: a later virtual deadline
    quick = h.submit([100] * 20, cost=cheap)
    assert small.virtual_deadline < quick.virtual_deadline < expensive.virtual_deadline
    h.step()
    running = {r.id: r.count(State.RUNNING) for r in (small, expensive, quick)}
    # guaranteed: 2, 4, 4 (water-filling 10); then 30 by virtual deadline: quick +16, expensive +14
    assert running == {small.id: 2, quick.id: 20, expensive.id: 18}


def test_a_deadline_earlier_than_its_virtual_deadline_moves_a_request_ahead():
    h = Harness(max_batch=24)  # guaranteed: 6 slots, 3 each; 18 by virtual deadline
    h.run_until(h.submit([1]))
    dear = Cost(START, STEP, START + 50 * STEP)  # 50 steps of 20 rows at 1 ms a row: 1 s alone
    first = h.submit([100] * 20, cost=dear)
    h.step()
    hurried = h.submit([100] * 20, cost=dear, deadline=h.clock.now + 0.8)
    assert hurried.virtual_deadline == hurried.deadline < first.virtual_deadline
    h.step()
    assert (hurried.count(State.RUNNING), first.count(State.RUNNING)) == (20, 4)
    assert first.preemptions == 16


def test_a_cheap_request_overtakes_a_dear_one_that_arrived_most_of_its_time_alone_earlier():
    """Virtual deadlines lie twice a request's time alone after its arrival, so a request that
    would take a fifth of a dear one's time alone overtakes it even when it arrives after 90%
    of that time (at once its time alone, it would wait)."""
    h = Harness(max_batch=24)  # guaranteed: 6 slots, 3 each; 18 by virtual deadline
    h.run_until(h.submit([1]))
    arrival = h.clock.now
    first = h.submit([100] * 20, cost=Cost(START, STEP, START + 50 * STEP))
    alone = (first.virtual_deadline - arrival) / TIME_ALONE_WEIGHT
    h.clock.now += 0.9 * alone
    later = h.submit([100] * 20, cost=Cost(START, STEP, START + 10 * STEP))  # a fifth of the steps
    assert later.virtual_deadline == pytest.approx(h.clock.now + TIME_ALONE_WEIGHT * alone / 5)
    h.step()
    assert (later.count(State.RUNNING), first.count(State.RUNNING)) == (20, 4)


def test_with_more_requests_than_slots_the_earliest_virtual_deadlines_run():
    h = Harness(max_batch=4)
    requests = [h.submit([3]) for _ in range(6)]
    h.step()
    assert [r.count(State.RUNNING) for r in requests] == [1, 1, 1, 1, 0, 0]


def test_a_hostile_request_gets_only_its_share():
    """1,024 expensive items (each stopping only at its NFE limit) beside a one-item request."""
    h = Harness(max_batch=256)
    hostile = h.submit([10_000 // STEP] * 1024)
    for _ in range(5):
        h.step()
    sample = h.submit([4])
    assert h.run_until(sample) == 4
    assert hostile.state is State.RUNNING


def test_fair_share_does_not_churn_when_many_single_item_requests_arrive():
    h = Harness(max_batch=4)
    requests = [h.submit([5]) for _ in range(6)]
    plan = h.step()
    assert [i.request for i in plan.join] == requests[:4]
    parked = 0
    while not all(r.ended for r in requests):
        parked += len(h.step().park)
    assert parked == 0  # requests of one item each run to the end once admitted


def test_fair_share_never_parks_while_the_newcomers_fit_in_the_free_slots():
    h = Harness(max_batch=8)
    big = h.submit([9] * 5)
    h.step()
    small = h.submit([3, 3])  # 5 running + 2 = 7 of 8 slots: room for all
    plan = h.step()
    assert not plan.park and [i.request for i in plan.join] == [small, small]
    late = h.submit([3, 3])  # 9 items for 8 slots: the free one is its guaranteed slot
    assert not h.step().park and late.count(State.RUNNING) == 1 and late.count(State.WAITING) == 1
    assert big.preemptions == small.preemptions == 0


def test_preempted_items_keep_their_progress_and_nfe():
    h = Harness(max_batch=2)
    big = h.submit([6, 6])
    h.step()
    h.step()
    small = h.submit([2])
    h.run_until(small)
    h.run_until(big)
    assert big.preemptions == 1
    assert [i.nfe for i in big.items] == [START + 6 * STEP] * 2  # exactly 6 steps each, parked or not
    assert big.nfe == sum(i.nfe for i in big.items)


# ---- priorities ---------------------------------------------------------------------------------
def test_an_urgent_level_takes_its_slots_first_and_lower_levels_share_the_rest():
    h = Harness(max_batch=6, default_priority=2, lower_level_share=0.0)  # strict priority
    normal = h.submit([50] * 6)
    h.step()
    urgent = h.submit([5] * 4, priority=1)
    background = h.submit([5] * 4, priority=3)
    plan = h.step()
    assert {i.request.id for i in plan.join} == {urgent.id}
    assert sum(1 for i in normal.items if i.state is State.RUNNING) == 2
    h.run_until(urgent)
    assert background.state is State.WAITING  # the default level still fills the batch
    h.run_until(normal)
    h.run_until(background)
    assert urgent.finished_at < normal.finished_at < background.finished_at


def test_a_flood_of_urgent_work_leaves_each_lower_level_a_share_and_never_starves_it():
    h = Harness(max_batch=20, default_priority=2)  # lower_level_share 0.1: 2 of 20 rows, then 1 of 2
    flood = h.submit([1000] * 40, priority=1)
    plan = h.step()
    assert len(plan.join) == 20  # nothing below it: the urgent level takes the whole batch
    normal = h.submit([3], priority=2)
    background = h.submit([3, 3, 3], priority=3)
    plan = h.step()
    assert {i.request.id for i in plan.park} == {flood.id} and len(plan.park) == 2
    assert [i.request for i in plan.join] == [normal, background]
    assert h.run_until(normal) == 2  # its 3 steps, one each step: it joined the step above
    h.run_until(background)
    h.step()
    assert not flood.ended and flood.count(State.RUNNING) == 20  # the batch is the flood's again


def test_strict_priority_starves_lower_levels_when_asked_to():
    h = Harness(max_batch=20, default_priority=2, lower_level_share=0.0)
    flood = h.submit([1000] * 40, priority=1)
    normal = h.submit([3])
    for _ in range(50):
        h.step()
    assert normal.state is State.WAITING and flood.count(State.RUNNING) == 20


# ---- fair admission ----------------------------------------------------------------------------
def test_one_client_cannot_fill_the_queue_for_the_others():
    h = Harness(max_batch=2, max_queued=100)  # client_queue_share 0.5
    h.submit([1] * 40, owner="hog")  # a first request is admitted whenever it fits
    with pytest.raises(
        QueueFull,
        match=r"this client holds 40 queued items; 20 more would exceed its share of the "
        r"queue \(50 of the 100 items other clients leave free\)",
    ):
        h.submit([1] * 20, owner="hog")
    h.submit([1] * 10, owner="hog")
    other = h.submit([1] * 30, owner="other")  # the room the hog left
    with pytest.raises(QueueFull, match=r"more would exceed its share of the queue \(25 of the 50"):
        h.submit([1] * 1, owner="other")
    assert h.submit([1], owner="third").owner == "third" and h.scheduler.queued == 81
    assert h.scheduler._queued_by == {"hog": 50, "other": 30, "third": 1}
    with pytest.raises(QueueFull, match="81 items queued; 20 more would exceed the limit of 100"):
        h.submit([1] * 20, owner="fourth")  # the queue limit itself comes first
    h.run_until(other)
    assert "other" not in h.scheduler._queued_by  # an owner holding nothing is forgotten


# ---- budgets ----------------------------------------------------------------------------------
def test_a_budget_too_small_to_start_is_refused_at_once():
    h = Harness()
    with pytest.raises(BudgetExhausted, match="budget of 20 cannot pay for 4 items"):
        h.submit([3] * 4, budget=20)
    assert h.scheduler.queued == 0


def test_a_request_stops_before_a_step_would_exceed_its_budget():
    h = Harness(max_batch=5)
    budget = 4 * START + 4 * STEP * 5 + 3  # five steps for its four items, not six
    greedy = h.submit([50] * 4, budget=budget)
    other = h.submit([8])
    h.run_until(greedy)
    assert greedy.state is State.FAILED and isinstance(greedy.error, BudgetExhausted)
    assert greedy.nfe <= budget and greedy.nfe == 4 * (START + 5 * STEP)
    assert "budget of 131 is spent" in str(greedy.error)
    h.run_until(other)
    assert other.state is State.FINISHED and not h.executor.running and not h.executor.parked


# ---- load-adaptive tolerance ------------------------------------------------------------------
CANDIDATES = [
    Candidate(1e-4, Cost(START, STEP, START + 40 * STEP)),
    Candidate(1e-2, Cost(START, STEP, START + 10 * STEP)),
    Candidate(1e-1, Cost(START, STEP, START + 3 * STEP)),
]


@pytest.mark.parametrize(("headroom", "loaded_tol"), [(None, 1e-2), (1.0, 1e-4)])
def test_auto_picks_the_tightest_tolerance_predicted_to_meet_the_target_and_loosens_under_load(headroom, loaded_tol):
    h = Harness(max_batch=64, seconds_per_row=0.001, **({} if headroom is None else {"auto_headroom": headroom}))
    for _ in range(5):
        h.run_until(h.submit([2]))  # the timer learns: 1 ms per row
    idle = h.submit([40], candidates=CANDIDATES, latency_target=0.5)
    assert idle.tol == 1e-4 and idle.cost.expected == START + 40 * STEP
    h.run_until(idle)
    crowd = h.submit([10_000] * 60)
    for _ in range(30):
        h.step()
    assert h.scheduler.timer.predict(61) == pytest.approx(0.061, rel=0.05)
    loaded = h.submit([10], candidates=CANDIDATES, latency_target=3.0)
    # 40 steps of 61 ms would take 2.4 s, 10 take 0.61 s: within the default quarter of the
    # target (AUTO_HEADROOM) only the second; within all of it the first.
    assert loaded.tol == loaded_tol
    hopeless = h.submit([3], candidates=CANDIDATES, latency_target=0.01)
    assert hopeless.tol == 1e-1  # nothing meets 10 ms: the loosest
    assert crowd.state is State.RUNNING


def test_auto_counts_the_work_queued_ahead_of_it():
    h = Harness(max_batch=4, seconds_per_row=0.001)
    for _ in range(3):
        h.run_until(h.submit([2]))
    alone = h.submit([40], candidates=CANDIDATES, latency_target=1.0)
    assert alone.tol == 1e-4
    h.run_until(alone)
    tight = Cost(START, STEP, START + 40 * STEP)
    backlog = [h.submit([40], cost=tight) for _ in range(40)]  # 1,600 row-steps, 4 rows a step
    h.step()
    behind = h.submit([10], candidates=CANDIDATES, latency_target=1.0)  # the fake item takes the 10 steps of 1e-2
    # At 1e-4 it would queue behind the backlog (400 steps of 4 ms); at 1e-2 its virtual deadline
    # comes before the backlog's, so it overtakes it and finishes in its own 10 steps.
    assert behind.tol == 1e-2
    assert h.run_until(behind) == 10 and all(r.state in (State.RUNNING, State.WAITING) for r in backlog)


def test_auto_without_a_target_or_deadline_takes_the_tightest():
    h = Harness()
    assert h.submit([1], candidates=CANDIDATES).tol == 1e-4


# ---- crashes --------------------------------------------------------------------------------------
def test_fail_started_fails_what_was_in_the_batch_and_keeps_the_waiting():
    h = Harness(max_batch=2, policy="fifo")
    running = h.submit([5, 5])
    waiting = h.submit([5])
    h.step()
    failed = h.scheduler.fail_started(RuntimeError("boom"))
    assert failed == [running] and running.state is State.FAILED
    assert waiting.state is State.WAITING
    h.executor = FakeExecutor(h.clock)
    h.run_until(waiting)
    assert waiting.state is State.FINISHED


# ---- the step timer -----------------------------------------------------------------------------
def test_the_step_timer_fits_overhead_and_per_row_cost():
    timer = StepTimer()
    assert timer.predict(10) == 0.0
    for batch in (1, 8, 64, 1, 8, 64):
        timer.observe(batch, 0.002 + 0.0005 * batch)
    assert timer.predict(32) == pytest.approx(0.002 + 0.0005 * 32, rel=1e-6)
    single = StepTimer()
    single.observe(10, 0.02)
    assert single.predict(20) == pytest.approx(0.04)
    timer.observe(32, 60.0)  # a step the machine stalled
    assert timer.predict(32) < 0.05


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        SchedulerConfig(max_batch=1, max_queued=1, policy="dynamic")
    with pytest.raises(ValueError, match=">= 1"):
        SchedulerConfig(max_batch=0, max_queued=1)
    for headroom in (0.0, 1.5):
        with pytest.raises(ValueError, match="auto_headroom must be in"):
            SchedulerConfig(max_batch=1, max_queued=1, auto_headroom=headroom)


# ---- the policy registry ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kind"), [("fair", FairShare), ("fifo", FirstComeFirstServed), ("static", StaticBatching)]
)
def test_the_registry_resolves_each_policy_by_name(name, kind):
    assert policy_class(name) is kind and POLICIES[name] is kind
    assert type(Harness(policy=name).scheduler.policy) is kind


def test_an_unknown_policy_is_refused_naming_the_choices():
    for name in ("dynamic", "", "FAIR"):
        with pytest.raises(ValueError, match=f"^policy must be one of fair, fifo, static; got {name!r}$"):
            policy_class(name)
        with pytest.raises(ValueError, match="policy must be one of fair, fifo, static"):
            SchedulerConfig(policy=name)


def test_a_policy_registered_by_name_decides_the_batch(monkeypatch):
    """A new policy is one module (tests/server/toy_policy.py) and one registry line."""
    monkeypatch.setitem(POLICIES, "newest", NewestFirst)
    h = Harness(max_batch=2, policy="newest")
    first, second, third = h.submit([3]), h.submit([3]), h.submit([3])
    assert {i.request for i in h.step().join} == {second, third}  # fifo would take first and second
    h.run_until(first)
    assert first.started_at >= third.finished_at and h.scheduler.policy.decisions > 0
    assert all(r.state is State.FINISHED for r in (first, second, third))


@pytest.mark.parametrize("policy", ["fair", "fifo", "static"])
def test_each_requests_demand_is_kept_through_joins_parks_finishes_and_endings(policy):
    """Demand (items still needing a slot) is a counter the scheduler keeps as items move, not a
    count made every step: it always equals the request's waiting, running and parked items."""
    h = Harness(max_batch=6, policy=policy)
    requests = [h.submit([9] * 10)]  # fills the batch: the fair policy parks its rows for those after it
    for step in range(60):
        if step == 2:
            requests += [h.submit([3 + i % 4] * (1 + i % 5)) for i in range(12)]
            h.scheduler.cancel(requests[4])
        if step == 5:
            requests.append(h.submit([2, 9, 9], deadline=h.clock.now + 0.01))  # expires while running
        h.step()
        for request in requests:
            active = [i for i in request.items if i.state in (State.WAITING, State.RUNNING, State.PREEMPTED)]
            assert request.demand == len(active), (step, request.id)
    assert any(r.preemptions for r in requests) == (policy == "fair")
    assert requests[4].demand == 0 and requests[-1].state is State.EXPIRED


@pytest.mark.parametrize("policy", ["fair", "fifo", "static"])
def test_the_policy_sees_each_level_in_its_order_with_its_demand_and_who_holds_slots(policy):
    """What the scheduler keeps as requests arrive, move and end (not recounted each step) is
    what a full recount gives: each level's requests in the policy's order and their demand,
    and the requests holding running items."""
    h = Harness(max_batch=6, policy=policy)
    seen: list[Workload] = []
    decide = h.scheduler.policy.slots
    h.scheduler.policy.slots = lambda work, now: (seen.append(work), decide(work, now))[1]  # type: ignore[method-assign]
    requests = [h.submit([9] * 10, priority=2)]
    for step in range(60):
        if step == 2:
            requests += [h.submit([3 + i % 4] * (1 + i % 5), priority=1 + i % 3) for i in range(12)]
            h.scheduler.cancel(requests[4])
        if step == 5:
            requests.append(h.submit([2, 9, 9], deadline=h.clock.now + 0.01))
        h.step()
        work = seen[-1]
        live = [r for r in requests if not r.ended]
        for priority, level in work.levels.items():
            mine = sorted((r for r in live if r.priority == priority), key=h.scheduler.policy.order)
            assert list(level) == mine and level.demand == sum(r.demand for r in mine), (step, priority)
        assert {r.id for r in work.holding} == {r.id for r in live if r.count(State.RUNNING)}, step
    assert all(r.ended for r in requests)


class CountingLevel(Level):
    """A level that counts the requests read from it."""

    read = 0

    def __iter__(self):
        for request in super().__iter__():
            CountingLevel.read += 1
            yield request


def test_the_fair_policy_reads_a_long_queue_only_as_far_as_it_hands_out_slots(monkeypatch):
    monkeypatch.setattr(scheduler_module, "Level", CountingLevel)
    h = Harness(max_batch=4)
    requests = [h.submit([10]) for _ in range(2_000)]
    for _ in range(3):
        CountingLevel.read = 0
        h.step()
        # The earliest virtual deadlines (here: the first to arrive) hold the batch, and the
        # policy read no further into the queue than the four requests it gave a slot.
        assert [r.count(State.RUNNING) for r in requests[:5]] == [1, 1, 1, 1, 0]
        assert CountingLevel.read == 4


def test_fifo_reads_a_long_queue_only_until_the_free_slots_are_given():
    h = Harness(max_batch=4, policy="fifo")
    requests = [h.submit([3]) for _ in range(2_000)]
    read = []

    def oldest_first():
        for request in requests:
            read.append(request)
            yield request

    work = Workload(_Lazy(oldest_first), running=0, rows=0, levels={}, holding=[])
    wanted = h.scheduler.policy.slots(work, h.clock.now)
    assert wanted == {r.id: 1 for r in requests[:4]}
    assert len(read) == 5  # the fifth is where it saw there was no slot left


class _Lazy:
    """An iterable over what ``make`` yields, made anew on each pass."""

    def __init__(self, make) -> None:
        self.make = make

    def __iter__(self):
        return self.make()

    def __len__(self) -> int:
        raise AssertionError("the policy counted the whole queue")

    def __contains__(self, item) -> bool:
        raise AssertionError("the policy searched the whole queue")
