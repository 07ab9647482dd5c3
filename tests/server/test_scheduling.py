"""Engine v2 through a real server: fair share with preemption, priorities, NFE budgets, input
ranges and load-adaptive tolerance, on the shipped checkpoints and real MNIST."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, metric, scrape, value

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

MOONS = DENSITIES[1]


@pytest.fixture(scope="module")
def images(mnist_dir):
    from training.data import load_mnist

    return load_mnist(mnist_dir, train=False, download=False).images[:600, 0].numpy()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def _classify(images: np.ndarray, **accuracy) -> pb.ClassifyRequest:
    scheduling = {k: accuracy.pop(k) for k in ("priority", "max_total_nfe") if k in accuracy}
    return pb.ClassifyRequest(
        model=CLASSIFIER,
        images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()),
        accuracy=pb.Accuracy(**accuracy),
        scheduling=pb.Scheduling(**scheduling),
    )


def _timed(call, request, **kwargs):
    begin = time.monotonic()
    response = call(request, **kwargs)
    return response, time.monotonic() - begin


def _wait_until_running(metrics_url: str, model: str, at_least: int, call, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while metric(metrics_url, "odeserve_running_items", model=model) < at_least:
        assert not call.done(), f"the big request ended early: {call.exception() or 'OK'}"
        assert time.monotonic() < end, "the big request never started"
        time.sleep(0.05)


def test_a_small_loose_request_is_served_while_a_big_tight_one_holds_the_batch(server, stub, images):
    """The issue's case: 512 images at tol 1e-8, then 1 image at tol 1e-1. Before Engine v2
    the small one queued behind the big one for 14 s."""
    idle = min(_timed(stub.Classify, _classify(images[:1], tol=1e-1), timeout=60)[1] for _ in range(3))
    preempted_before = metric(server.metrics_url, "odeserve_preemptions_total", model=CLASSIFIER)
    big = stub.Classify.future(_classify(images[:512], tol=1e-8), timeout=600)
    try:
        _wait_until_running(server.metrics_url, CLASSIFIER, 128, big)
        small, seconds = _timed(stub.Classify, _classify(images[512:513], tol=1e-1), timeout=60)
        assert not big.done(), "the big request should still be running"
        assert small.items.status == [pb.SOLVE_STATUS_SUCCESS] and small.labels[0] >= 0
        assert metric(server.metrics_url, "odeserve_preemptions_total", model=CLASSIFIER) > preempted_before
        # The target, max(5x idle, 500 ms), is measured by bench/serve_load.py; here a bound that
        # the FIFO engine (14 s) fails by far and a loaded 2-core CI machine still meets.
        assert seconds < max(10 * idle, 3.0), f"small request took {seconds:.2f} s (idle {idle:.3f} s)"
    finally:
        big.cancel()


def test_a_hostile_density_request_gets_only_its_share(server, stub):
    """1,024 points as costly as a request can be (tol 1e-8, up to the NFE limit each) beside a
    Sample n=1: the sample is served at once; before, it waited 57 s."""
    with grpc.insecure_channel(server.target) as channel:
        density = pb_grpc.InferenceStub(channel)
        points = np.random.default_rng(0).normal(scale=3.0, size=(1024, 2))
        hostile = density.LogDensity.future(
            pb.LogDensityRequest(
                model=MOONS,
                points=pb.Tensor(dtype="float64", shape=[1024, 2], data=points.astype("<f8").tobytes()),
                accuracy=pb.Accuracy(tol=1e-8),
            ),
            timeout=600,
        )
        try:
            _wait_until_running(server.metrics_url, MOONS, 128, hostile)
            sample, seconds = _timed(
                stub.Sample, pb.SampleRequest(model=MOONS, n=1, accuracy=pb.Accuracy(tol=1e-1)), timeout=60
            )
            assert not hostile.done()
            assert sample.items.status == [pb.SOLVE_STATUS_SUCCESS]
            assert seconds < 3.0, f"Sample n=1 took {seconds:.2f} s beside the hostile request"
        finally:
            hostile.cancel()


@pytest.mark.parametrize(
    ("points", "dtype", "message"),
    [
        (
            [[1e300, 0.0]] * 1024,
            "float64",
            "points: item 0 is beyond float32's range (about ±3.4e38), which the model computes in",
        ),
        ([[0.0, 0.0], [2e6, 0.0]], "float32", "points: coordinates must lie within ±1e+06 (item 1)"),
    ],
)
def test_points_beyond_what_the_model_computes_in_are_refused(stub, points, dtype, message):
    array = np.asarray(points, dtype=dtype)
    request = pb.LogDensityRequest(
        model=MOONS, points=pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())
    )
    with pytest.raises(grpc.RpcError) as raised:
        stub.LogDensity(request, timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message


def test_priority_levels_are_validated_and_labelled(server, stub, images):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(_classify(images[:1], tol=1e-2, priority=4), timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "scheduling.priority must be 0 (the default, 2) or 1 .. 3, got 4"
    with pytest.raises(grpc.RpcError) as raised:  # more urgent than the default needs a token granted it
        stub.Classify(_classify(images[:1], tol=1e-2, priority=1), timeout=30)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    for priority in (2, 3):
        stub.Classify(_classify(images[:2], tol=1e-2, priority=priority), timeout=30)
    samples = scrape(server.metrics_url)
    for level in ("2", "3"):  # level 1, granted by a token: test_fairness.py
        assert value(samples, "odeserve_queue_wait_seconds_count", model=CLASSIFIER, priority=level) >= 1


def test_an_nfe_budget_is_a_hard_limit(server, stub, images):
    before = metric(server.metrics_url, "odeserve_budget_exhausted_total", model=CLASSIFIER)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(_classify(images[:4], tol=1e-2, max_total_nfe=20), timeout=30)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget of 20 cannot pay for 4 items" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(_classify(images[:4], tol=1e-6, max_total_nfe=100), timeout=60)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget of 100 is spent" in raised.value.details()
    within = stub.Classify(_classify(images[:4], tol=1e-1, max_total_nfe=1000), timeout=60)
    assert sum(within.items.nfe) <= 1000 and all(s == pb.SOLVE_STATUS_SUCCESS for s in within.items.status)
    assert metric(server.metrics_url, "odeserve_budget_exhausted_total", model=CLASSIFIER) == before + 2


def test_auto_tolerance_reports_what_it_used(server, stub, images, shipped):
    from neuralode.checkpoint import read_card

    card_tolerances = sorted(row.tol for row in read_card(shipped / f"{CLASSIFIER}.pt").metrics.table)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(_classify(images[:1], auto_tol=True))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "accuracy.auto_tol needs latency_target_seconds or a deadline on the call"
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(_classify(images[:1], auto_tol=True, tol=1e-3), timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    before = metric(server.metrics_url, "odeserve_auto_tolerance_count", model=CLASSIFIER)
    relaxed = stub.Classify(_classify(images[:8], auto_tol=True), timeout=30)
    assert relaxed.solved.rtol == relaxed.solved.atol == card_tolerances[0]  # idle, 30 s: the tightest
    hurried = stub.Classify(_classify(images[:8], auto_tol=True, latency_target_seconds=1e-6), timeout=30)
    assert hurried.solved.rtol == card_tolerances[-1]  # nothing meets 1 µs: the loosest
    assert np.mean(hurried.items.nfe) < np.mean(relaxed.items.nfe)
    assert metric(server.metrics_url, "odeserve_auto_tolerance_count", model=CLASSIFIER) == before + 2
    fixed = stub.Classify(_classify(images[:1], tol=1e-2), timeout=30)
    assert (fixed.solved.rtol, fixed.solved.atol, fixed.solved.method) == (1e-2, 1e-2, "dopri5")
