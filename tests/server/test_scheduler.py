"""The scheduler on an injected clock: no torch, no gRPC, no threads."""

import pytest

from server.scheduler import QueueFull, Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_continuous_fills_free_slots_in_arrival_order(clock):
    scheduler = Scheduler(max_batch=4, max_queued=100, clock=clock)
    first, _ = scheduler.submit(["a1", "a2", "a3"])
    second, _ = scheduler.submit(["b1", "b2"])
    assert [i.payload for i in scheduler.admit(running=0)] == ["a1", "a2", "a3", "b1"]
    assert scheduler.admit(running=4) == []
    assert [i.payload for i in scheduler.admit(running=3)] == ["b2"]
    assert first.started_at == second.started_at == 100.0


def test_queue_overflow_is_refused_at_once_and_queues_nothing(clock):
    scheduler = Scheduler(max_batch=2, max_queued=3, clock=clock)
    scheduler.submit(["a", "b"])
    with pytest.raises(QueueFull, match="2 items queued; 2 more would exceed the limit of 3"):
        scheduler.submit(["c", "d"])
    assert scheduler.queued == 2
    scheduler.submit(["c"])
    assert scheduler.queued == 3


def test_static_waits_for_a_full_batch_or_the_delay(clock):
    scheduler = Scheduler(max_batch=3, max_queued=100, mode="static", max_delay=0.010, clock=clock)
    scheduler.submit(["a"])
    assert scheduler.admit(running=0) == []
    assert scheduler.wake_after() == pytest.approx(0.010)
    clock.now += 0.004
    scheduler.submit(["b"])
    assert scheduler.admit(running=0) == []
    clock.now += 0.006  # the oldest item has now waited max_delay
    assert [i.payload for i in scheduler.admit(running=0)] == ["a", "b"]


def test_static_starts_a_full_batch_at_once_but_never_joins_a_running_one(clock):
    scheduler = Scheduler(max_batch=2, max_queued=100, mode="static", max_delay=10.0, clock=clock)
    scheduler.submit(["a", "b", "c"])
    assert [i.payload for i in scheduler.admit(running=0)] == ["a", "b"]
    clock.now += 60
    assert scheduler.admit(running=1) == []  # "c" waits for the running batch to finish
    assert [i.payload for i in scheduler.admit(running=0)] == ["c"]


def test_cancelled_and_expired_requests_leave_queue_and_batch(clock):
    scheduler = Scheduler(max_batch=10, max_queued=100, clock=clock)
    cancelled, _ = scheduler.submit(["x1", "x2"])
    expiring, _ = scheduler.submit(["y1"], deadline=clock.now + 1.0)
    kept, _ = scheduler.submit(["z1"])
    running = scheduler.admit(running=0)
    scheduler.submit(["w1"])
    late, _ = scheduler.submit(["v1"], deadline=clock.now + 0.5)
    scheduler.cancel(cancelled)
    clock.now += 2.0
    assert sorted(i.payload for i in scheduler.dropped(running)) == ["x1", "x2", "y1"]
    assert [i.payload for i in scheduler.purge()] == ["v1"]
    assert [i.payload for i in scheduler.admit(running=1)] == ["w1"]
    assert not kept.expired(clock.now) and expiring.expired(clock.now) and late.expired(clock.now)


def test_invalid_settings_are_refused(clock):
    with pytest.raises(ValueError, match="batching mode"):
        Scheduler(max_batch=1, max_queued=1, mode="dynamic", clock=clock)
    with pytest.raises(ValueError, match=">= 1"):
        Scheduler(max_batch=0, max_queued=1, clock=clock)
