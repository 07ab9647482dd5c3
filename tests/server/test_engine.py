"""The engine in-process: a real worker thread over the shipped CNF, with faults injected into
its stats sink, its adapter and its joins. A crash fails the requests it touched with a clear
error — never a hang — the model reads NOT_SERVING while the worker recovers, and the next
requests are served."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
import torch
from live_server import DENSITIES
from prometheus_client import generate_latest
from toy_policy import NewestFirst

from neuralode.checkpoint import load_checkpoint
from server.adapters import Limits, adapter_for
from server.api import Kind
from server.config import EngineConfig
from server.engine import Engine, SchedulingTerms, WorkerFailed
from server.executor import Work
from server.metrics import Metrics
from server.scheduling import POLICIES, BudgetExhausted, SchedulerConfig
from server.stats import PHASES, IterationStats, PhaseTimes, StepStats, WorkerStats

DENSITY = DENSITIES[0]
RESULT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def model(shipped):
    return load_checkpoint(shipped / f"{DENSITY}.pt").model.eval()


def _points(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def make_works(model):
    """Log-density items at random points, prepared by the model's own adapter."""
    adapter = adapter_for(model)

    def make(n: int, tol: float = 1e-3, seed: int = 0) -> list[Work]:
        rows = adapter.prepare(Kind.LOG_DENSITY, {"points": _points(n, seed).numpy()}, Limits(1024, 1e6))
        return [Work(Kind.LOG_DENSITY, row, tol, tol, "dopri5", 10_000) for row in rows]

    return make


class Faults:
    """Raises once at the named place, then behaves."""

    def __init__(self) -> None:
        self.armed: set[str] = set()
        self.health: list[tuple[str, bool]] = []
        self.stats: list = []
        self.lock = threading.Lock()

    def trip(self, place: str) -> None:
        with self.lock:
            if place in self.armed:
                self.armed.discard(place)
                raise RuntimeError(f"injected fault in {place}")

    def stats_sink(self, stats) -> None:
        self.stats.append(stats)
        if isinstance(stats, StepStats):
            self.trip("stats")

    def health_sink(self, name: str, serving: bool) -> None:
        self.health.append((name, serving))


class FaultyAdapter:
    """The model's real adapter, with a fault point in ``start`` (joins) and ``finish``."""

    def __init__(self, inner, faults: Faults) -> None:
        self.inner, self.faults = inner, faults
        self.task, self.dynamics, self.norm, self.first_step = inner.task, inner.dynamics, inner.norm, inner.first_step

    def start(self, kind, rows):
        self.faults.trip("join")
        return self.inner.start(kind, rows)

    def finish(self, kind, y1):
        self.faults.trip("adapter")
        return self.inner.finish(kind, y1)


@pytest.fixture
def engine(model):
    faults = Faults()
    metrics = Metrics()

    def stats(event) -> None:
        faults.stats_sink(event)
        metrics(event)

    engine = Engine(
        torch.device("cpu"), EngineConfig(SchedulerConfig(max_batch=64)), stats=stats, health=faults.health_sink
    )
    engine.add("cnf", FaultyAdapter(adapter_for(model), faults), label=DENSITY)
    engine.faults, engine.metrics = faults, metrics
    yield engine
    engine.close(timeout=30)


def test_requests_through_the_worker_match_the_model_in_process(engine, model, make_works):
    works = make_works(6, tol=1e-5)
    _, future = engine.submit("cnf", works)
    result = future.result(RESULT_TIMEOUT)
    with torch.no_grad():
        expected, solution = model.log_prob(_points(6), rtol=1e-5, atol=1e-5)
    assert result.nfe == solution.nfe.tolist()
    torch.testing.assert_close(torch.from_numpy(result.outputs["log_density"]), expected, rtol=0, atol=1e-5)
    assert (result.rtol, result.atol) == (1e-5, 1e-5)


@pytest.mark.parametrize("place", ["stats", "adapter", "join"])
def test_a_crash_fails_the_request_it_touched_and_the_worker_recovers(engine, place, make_works):
    engine.faults.armed.add(place)
    _, future = engine.submit("cnf", make_works(4))
    with pytest.raises(WorkerFailed, match=f"RuntimeError: injected fault in {place}.*was restarted"):
        future.result(RESULT_TIMEOUT)  # a clear error, not a hang
    _, again = engine.submit("cnf", make_works(4))
    assert len(again.result(RESULT_TIMEOUT).nfe) == 4
    assert engine.faults.health == [(DENSITY, False), (DENSITY, True)]
    assert engine.workers["cnf"].restarts == 1
    assert sum(isinstance(s, WorkerStats) for s in engine.faults.stats) == 1
    assert engine.metrics.restarts.labels(DENSITY)._value.get() == 1


def test_requests_still_waiting_survive_a_crash(model, make_works):
    faults = Faults()
    engine = Engine(
        torch.device("cpu"), EngineConfig(SchedulerConfig(max_batch=2, policy="fifo")), health=faults.health_sink
    )
    engine.add("cnf", FaultyAdapter(adapter_for(model), faults), label=DENSITY)
    try:
        faults.armed.add("adapter")
        _, running = engine.submit("cnf", make_works(2, tol=1e-6))
        _, waiting = engine.submit("cnf", make_works(2, seed=1))
        with pytest.raises(WorkerFailed):
            running.result(RESULT_TIMEOUT)
        assert len(waiting.result(RESULT_TIMEOUT).nfe) == 2
    finally:
        engine.close(timeout=30)


def test_a_request_over_its_budget_fails_without_exceeding_it(engine, make_works):
    with pytest.raises(BudgetExhausted, match="cannot pay for 8 items"):
        engine.submit("cnf", make_works(8), scheduling=SchedulingTerms(budget=10))
    _, future = engine.submit("cnf", make_works(8, tol=1e-8), scheduling=SchedulingTerms(budget=500))
    with pytest.raises(BudgetExhausted, match="budget of 500 is spent"):
        future.result(RESULT_TIMEOUT)
    assert engine.metrics.budget_exhausted.labels(DENSITY)._value.get() == 2


def test_auto_solves_at_a_card_tolerance_and_reports_it(model, shipped, make_works):
    from server.models import load_models

    served = load_models(shipped, torch.device("cpu"))[DENSITY]
    engine = Engine(torch.device("cpu"), EngineConfig(SchedulerConfig(max_batch=64)))
    engine.add(
        "cnf", served.adapter, label=DENSITY, expected_nfe=served.expected_nfe, tolerances=served.card_tolerances
    )
    try:
        _, future = engine.submit("cnf", make_works(4), scheduling=SchedulingTerms(auto=True, latency_target=30.0))
        result = future.result(RESULT_TIMEOUT)
        assert result.rtol == result.atol == min(served.card_tolerances)  # an idle server: the tightest
    finally:
        engine.close(timeout=30)


def test_a_policy_registered_in_a_test_runs_the_engine(model, make_works, monkeypatch):
    """A new policy is one module and a registry line: the engine then runs it by name."""
    monkeypatch.setitem(POLICIES, "newest", NewestFirst)
    engine = Engine(torch.device("cpu"), EngineConfig(SchedulerConfig(max_batch=4, policy="newest")))
    engine.add("cnf", adapter_for(model), label=DENSITY)
    try:
        futures = [engine.submit("cnf", make_works(3, seed=seed))[1] for seed in range(3)]
        results = [future.result(RESULT_TIMEOUT) for future in futures]
        assert [len(result.nfe) for result in results] == [3, 3, 3]
        assert all(status.name == "SUCCESS" for result in results for status in result.statuses)
        policy = engine.workers["cnf"].scheduler.policy
        assert isinstance(policy, NewestFirst) and policy.decisions > 0
    finally:
        engine.close(timeout=30)


def test_the_servers_scheduling_settings_reach_every_models_scheduler(shipped, capsys):
    """From the command line through ``Server`` (the one the CLI runs) to each model's scheduler."""
    import asyncio

    from server.app import Server
    from server.config import parse_config

    config = parse_config(
        [
            "--checkpoints",
            str(shipped),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--guaranteed-share",
            "0.5",
            "--auto-headroom",
            "0.75",
            "--lower-level-share",
            "0.2",
            "--client-queue-share",
            "0.3",
            "--grace-seconds",
            "1",
        ]
    )

    async def settings() -> list[tuple[float, ...]]:
        server = Server(config)
        try:
            return [
                (
                    w.scheduler.config.guaranteed_share,
                    w.scheduler.config.auto_headroom,
                    w.scheduler.config.lower_level_share,
                    w.scheduler.config.client_queue_share,
                )
                for w in server.engine.workers.values()
            ]
        finally:
            await server.stop()

    assert asyncio.run(settings()) == [(0.5, 0.75, 0.2, 0.3)] * len(list(shipped.glob("*.pt")))
    with pytest.raises(SystemExit):
        parse_config(["--auto-headroom", "0"])
    assert "auto_headroom must be in (0, 1]" in capsys.readouterr().err


def test_a_cancelled_request_resolves_and_leaves_the_batch(engine, make_works):
    request, future = engine.submit("cnf", make_works(16, tol=1e-8))
    engine.cancel("cnf", request)
    with pytest.raises(Exception) as raised:
        future.result(RESULT_TIMEOUT)
    assert type(raised.value).__name__ == "Cancelled" and not isinstance(raised.value, FutureTimeout)
    _, after = engine.submit("cnf", make_works(2))
    after.result(RESULT_TIMEOUT)
    assert engine.workers["cnf"].executor.running == 0


def test_each_iteration_reports_where_its_time_went_and_the_rows_it_moved(engine, make_works):
    begin = time.perf_counter()
    _, future = engine.submit("cnf", make_works(5, tol=1e-5))
    future.result(RESULT_TIMEOUT)
    wall = time.perf_counter() - begin
    iterations = [s for s in engine.faults.stats if isinstance(s, IterationStats)]
    steps = [s for s in engine.faults.stats if isinstance(s, StepStats)]
    assert len(iterations) == len(steps) > 1  # one group: one step per iteration
    seconds: dict[str, float] = defaultdict(float)
    for iteration in iterations:
        for phase, spent in iteration.seconds:
            seconds[phase] += spent
    assert {"schedule", "join", "step", "leave", "update", "f"} <= set(seconds) <= set(PHASES)
    assert all(spent > 0 for spent in seconds.values())
    assert sum(seconds.values()) <= wall  # phases exclude each other: they never count a moment twice
    assert sum(i.joined for i in iterations) == 5 and not any(i.parked or i.resumed or i.dropped for i in iterations)
    exposed = generate_latest(engine.metrics.registry).decode()
    assert f'odeserve_engine_seconds_total{{model="{DENSITY}",phase="f"}}' in exposed
    assert f'odeserve_engine_row_moves_total{{model="{DENSITY}",move="joined"}} 5.0' in exposed


def test_phase_times_take_inner_time_out_of_the_block_it_ran_in():
    now = [0.0]
    times = PhaseTimes(clock=lambda: now[0])

    def f() -> None:
        now[0] += 3.0

    timed_f = times.inner("f", f)
    with times.phase("step"):
        now[0] += 1.0
        timed_f()
        now[0] += 1.0
    with times.phase("join"):
        timed_f()
    assert times.take() == (("step", 2.0), ("f", 6.0))  # in PHASES' order; join spent nothing of its own
    assert times.take() == ()  # the next iteration starts from zero
