"""Limits that bound compute: a request at an extreme tolerance cannot monopolise the server,
and cancelled or expired requests stop consuming solver steps (seen through /metrics)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, metric, scrape, start_server, value

from client import Client, OdeServeError
from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

DENSITY = DENSITIES[0]
MAX_NFE = 3000


@pytest.fixture(scope="module")
def permissive(shipped, tmp_path_factory):
    """A server that lets requests ask for tol 1e-12, bounded only by max NFE per item."""
    running = start_server(
        shipped, tmp_path_factory.mktemp("permissive"), "--min-tol", "1e-12", "--max-nfe", str(MAX_NFE)
    )
    yield running
    assert running.stop() == 0


def test_an_extreme_tolerance_cannot_monopolise_the_server(permissive):
    noise = np.random.default_rng(0).integers(0, 255, (16, 28, 28), dtype=np.uint8)  # stiff inputs, too
    digit = np.zeros((1, 28, 28), np.uint8)
    with Client(permissive.target, timeout_s=300) as client:
        alone = [_timed(lambda: client.classify(digit, model=CLASSIFIER, tol=1e-1))[1] for _ in range(5)]
        hog: dict = {}

        def monopolise():
            hog["result"], hog["seconds"] = _timed(lambda: client.classify(noise, model=CLASSIFIER, tol=1e-12))
            hog["finished"] = time.monotonic()

        thread = threading.Thread(target=monopolise)
        thread.start()
        time.sleep(0.5)
        beside = []
        while thread.is_alive() and len(beside) < 20:
            result, seconds = _timed(lambda: client.classify(digit, model=CLASSIFIER, tol=1e-1))
            assert result.items.all_succeeded
            beside.append((seconds, time.monotonic()))
        thread.join(300)
    statuses, nfe = hog["result"].items.status, hog["result"].items.nfe
    assert set(statuses) == {"MAX_NFE"} and nfe.max() <= MAX_NFE  # stopped by the limit, per item
    assert len(beside) >= 5, "too few normal requests completed while the hog ran"
    assert all(done < hog["finished"] for _, done in beside[:5])  # served while it was still running
    # Each normal request waits for a handful of shared steps, not for the hog to finish.
    slowest = max(seconds for seconds, _ in beside)
    assert slowest < hog["seconds"] / 5, (slowest, hog["seconds"], np.median(alone))


def test_a_deadline_bounds_an_extreme_tolerance(permissive):
    noise = np.random.default_rng(1).integers(0, 255, (16, 28, 28), dtype=np.uint8)
    with Client(permissive.target, timeout_s=60) as client:
        begin = time.monotonic()
        with pytest.raises(OdeServeError) as error:
            client.classify(noise, model=CLASSIFIER, tol=1e-12, timeout_s=1.0)
        assert error.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - begin < 3.0


@pytest.mark.parametrize("ending", ["deadline", "cancel"])
def test_ended_requests_stop_consuming_solver_steps(density_only, tmp_path, ending):
    running = start_server(density_only, tmp_path, "--min-tol", "1e-12")
    steps = "odeserve_solver_steps_total"
    points = np.random.default_rng(2).normal(size=(1024, 2)).astype(np.float32) * 3
    tol = 1e-10  # about 800 NFE per point: seconds of work, far beyond the 0.5 s deadline
    try:
        with Client(running.target, timeout_s=60, retries=0) as client:
            if ending == "deadline":
                with pytest.raises(OdeServeError) as error:
                    client.log_density(points, model=DENSITY, tol=tol, timeout_s=0.5)
                assert error.value.code == "DEADLINE_EXCEEDED"
            else:
                # The SDK's blocking calls cannot be cancelled; a raw stub's future can.
                channel = grpc.insecure_channel(running.target)
                points_tensor = pb.Tensor(dtype="float32", shape=list(points.shape), data=points.tobytes())
                request = pb.LogDensityRequest(model=DENSITY, points=points_tensor, accuracy=pb.Accuracy(tol=tol))
                call = pb_grpc.InferenceStub(channel).LogDensity.future(request, timeout=60)
                deadline = time.monotonic() + 30
                while metric(running.metrics_url, steps, model=DENSITY) == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert call.cancel()
                channel.close()
            deadline = time.monotonic() + 30  # the worker drops the items after the step in progress

            def ended() -> bool:  # a step was taken, and the batch emptied since
                samples = scrape(running.metrics_url)
                return (
                    value(samples, steps, model=DENSITY) > 0
                    and value(samples, "odeserve_running_items", model=DENSITY) == 0
                )

            while not ended() and time.monotonic() < deadline:
                time.sleep(0.05)
            spent = metric(running.metrics_url, steps, model=DENSITY)
            time.sleep(1.0)
            assert metric(running.metrics_url, steps, model=DENSITY) == spent > 0  # no steps after the end
            assert metric(running.metrics_url, "odeserve_running_items", model=DENSITY) == 0
            assert metric(running.metrics_url, "odeserve_queued_items", model=DENSITY) == 0
            assert client.log_density(points[:4], model=DENSITY, tol=1e-3).items.all_succeeded
    finally:
        assert running.stop() == 0


def _timed(function):
    begin = time.monotonic()
    result = function()
    return result, time.monotonic() - begin
