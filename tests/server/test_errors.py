"""Bad input gets a precise status and a message naming the field, and the server keeps
serving; deadlines, cancellation, queue overflow and SIGTERM behave as documented."""

import math
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, start_server

from client import Client, OdeServeError
from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

DENSITY = DENSITIES[0]
IMAGE = np.zeros((1, 28, 28), dtype=np.uint8)


def tensor(array: np.ndarray, dtype: str | None = None, shape=None, data: bytes | None = None) -> pb.Tensor:
    return pb.Tensor(
        dtype=dtype or str(array.dtype),
        shape=list(array.shape if shape is None else shape),
        data=array.tobytes() if data is None else data,
    )


def classify(images=IMAGE, model=CLASSIFIER, version="", **accuracy) -> tuple[str, pb.ClassifyRequest]:
    images_tensor = images if isinstance(images, pb.Tensor) else tensor(images)
    return "Classify", pb.ClassifyRequest(
        model=model, version=version, images=images_tensor, accuracy=pb.Accuracy(**accuracy)
    )


def sample(n=4, model=DENSITY, **accuracy) -> tuple[str, pb.SampleRequest]:
    return "Sample", pb.SampleRequest(model=model, n=n, seed=1, accuracy=pb.Accuracy(**accuracy))


def log_density(points, model=DENSITY, **accuracy) -> tuple[str, pb.LogDensityRequest]:
    points_tensor = points if isinstance(points, pb.Tensor) else tensor(points)
    return "LogDensity", pb.LogDensityRequest(model=model, points=points_tensor, accuracy=pb.Accuracy(**accuracy))


POINTS = np.zeros((3, 2), dtype=np.float32)
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

BAD_REQUESTS = [
    ("unknown model", classify(model="nope"), NOT_FOUND, "model 'nope' is not served"),
    ("path traversal name", classify(model="../checkpoints/odenet-mnist"), NOT_FOUND, "is not served"),
    (
        "misspelt model",
        classify(model="odenet-mnst"),
        NOT_FOUND,
        "model 'odenet-mnst' is not served; did you mean 'odenet-mnist'? (served: cnf-8gaussians, cnf-moons, "
        "odenet-mnist)",
    ),
    ("unknown model lists the served", classify(model="nope"), NOT_FOUND, "nope' is not served (served: cnf-8g"),
    ("empty model name", classify(model=""), INVALID, "model must name a served model"),
    ("unknown version", classify(version="v999"), NOT_FOUND, "has no version 'v999'"),
    ("classify a density model", classify(model=DENSITY), INVALID, "is a density model"),
    ("sample a classifier", sample(model=CLASSIFIER), INVALID, "is a classify model"),
    ("unsupported dtype", classify(tensor(IMAGE, dtype="int32")), INVALID, "images.dtype must be one of"),
    ("byte length mismatch", classify(tensor(IMAGE, data=b"\x00" * 100)), INVALID, "images.data has 100 bytes"),
    ("wrong image size", classify(np.zeros((2, 27, 28), np.uint8)), INVALID, "images must have shape"),
    ("three channels", classify(np.zeros((2, 3, 28, 28), np.uint8)), INVALID, "images must have shape"),
    ("no images", classify(np.zeros((0, 28, 28), np.uint8)), INVALID, "images must hold at least one item"),
    ("NaN pixel", classify(np.full((2, 28, 28), math.nan, np.float32)), INVALID, "images contains NaN or Inf (item 0)"),
    (
        "Inf pixel",
        classify(
            np.where(np.arange(2)[:, None, None] == 1, np.inf, 0).astype(np.float32) * np.ones((2, 28, 28), np.float32)
        ),
        INVALID,
        "NaN or Inf (item 1)",
    ),
    ("pixel out of range", classify(np.full((1, 28, 28), 2.0, np.float32)), INVALID, "must lie in [0, 1]"),
    ("too many images", classify(np.zeros((1025, 28, 28), np.uint8)), INVALID, "limit per request is 1024"),
    ("negative tol", classify(tol=-1e-3), INVALID, "accuracy.tol must be > 0"),
    ("NaN tol", classify(tol=math.nan), INVALID, "accuracy.tol must be a finite number"),
    ("infinite tol", classify(tol=math.inf), INVALID, "accuracy.tol must be a finite number"),
    ("tol above the range", classify(tol=2.0), INVALID, "accuracy.tol must be between 1e-08 and 1"),
    ("tol below the range", classify(tol=1e-12), INVALID, "accuracy.tol must be between"),
    ("negative rtol", classify(rtol=-1.0, atol=1e-3), INVALID, "accuracy.rtol must be > 0"),
    ("atol below the range", classify(rtol=1e-3, atol=1e-30), INVALID, "accuracy.atol must be between"),
    ("tol and rtol", classify(tol=1e-3, rtol=1e-3), INVALID, "give tol, or rtol and atol, not both"),
    (
        "unknown method",
        classify(method="rk45"),
        INVALID,
        "accuracy.method must be one of adaptive_heun, bosh3, dopri5, dopri8, fehlberg2, tsit5",
    ),
    ("fixed-step method", classify(method="euler"), INVALID, "accuracy.method must be one of"),
    ("sample nothing", sample(n=0), INVALID, "n must hold at least one item"),
    ("sample too many", sample(n=1_000_000), INVALID, "n holds 1000000 items; the limit per request is 1024"),
    (
        "points of the wrong dimension",
        log_density(np.zeros((3, 3), np.float32)),
        INVALID,
        "points must have shape [N, 2]",
    ),
    ("flat points", log_density(np.zeros(4, np.float32)), INVALID, "points must have shape [N, 2]"),
    ("integer points", log_density(np.zeros((3, 2), np.uint8)), INVALID, "points.dtype must be float32 or float64"),
    (
        "infinite point",
        log_density(np.array([[0.0, np.inf]], np.float32)),
        INVALID,
        "points contains NaN or Inf (item 0)",
    ),
    ("negative shape", log_density(tensor(POINTS, shape=[-3, -2])), INVALID, "points.shape must not be negative"),
    (
        "huge empty images",
        classify(tensor(IMAGE, shape=[2**62, 2**62, 0], data=b"")),
        INVALID,
        f"images.shape [{2**62}, {2**62}, 0] is too large",
    ),
    ("huge empty points", log_density(tensor(POINTS, shape=[2**62, 2**62, 0], data=b"")), INVALID, "is too large"),
]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.mark.parametrize("name, call, code, message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_the_server_keeps_serving(stub, name, call, code, message):
    rpc, request = call
    with pytest.raises(grpc.RpcError) as error:
        getattr(stub, rpc)(request, timeout=30)
    assert error.value.code() == code, error.value.details()
    assert message in error.value.details()
    good = stub.Classify(classify(tol=1e-1)[1], timeout=30)
    assert list(good.items.status) == [pb.SOLVE_STATUS_SUCCESS]


def test_oversized_message_is_refused(stub):
    huge = np.zeros((22_000, 28, 28), dtype=np.uint8)  # 17 MB > the 4 MiB limit
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(classify(huge)[1], timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Classify(classify(tol=1e-1)[1], timeout=30).labels


def test_deadline_stops_the_request_and_others_are_unaffected(client):
    images = np.random.default_rng(0).integers(0, 255, (128, 28, 28), dtype=np.uint8)
    begin = time.monotonic()
    with pytest.raises(OdeServeError) as error:
        client.classify(images, model=CLASSIFIER, tol=1e-8, timeout_s=0.5)
    assert error.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - begin < 5
    assert client.classify(IMAGE, model=CLASSIFIER, tol=1e-1).items.all_succeeded


def test_an_already_expired_deadline_is_refused(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(classify()[1], timeout=1e-4)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancelled_request_reports_cancelled_and_others_are_unaffected(stub):
    images = np.random.default_rng(1).integers(0, 255, (128, 28, 28), dtype=np.uint8)
    call = stub.Classify.future(classify(images, tol=1e-8)[1], timeout=60)
    time.sleep(0.3)
    assert call.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    assert list(stub.Classify(classify(tol=1e-1)[1], timeout=30).items.status) == [pb.SOLVE_STATUS_SUCCESS]


@pytest.mark.parametrize("max_nfe", [1, 10])  # 1 cannot even pay for the start: the item never runs
def test_max_nfe_is_a_hard_cap_that_stops_an_item_with_its_status(client, max_nfe):
    result = client.classify(np.zeros((2, 28, 28), np.uint8), model=CLASSIFIER, tol=1e-6, max_nfe=max_nfe)
    assert result.items.status == ["MAX_NFE", "MAX_NFE"]
    assert (result.items.nfe <= max_nfe).all()
    assert (result.labels == -1).all() and np.isnan(result.probabilities).all()


def test_queue_overflow_is_refused_at_once(shipped, tmp_path):
    small = start_server(shipped, tmp_path, "--max-batch", "2", "--max-queued-items", "16")
    images = np.random.default_rng(2).integers(0, 255, (16, 28, 28), dtype=np.uint8)
    try:
        with Client(small.target, timeout_s=120, retries=0) as client:
            slow = threading.Thread(target=lambda: client.classify(images, model=CLASSIFIER, tol=1e-8))
            slow.start()
            time.sleep(0.3)  # 2 items run, 14 wait: 8 more do not fit
            begin = time.monotonic()
            with pytest.raises(OdeServeError) as error:
                client.classify(images[:8], model=CLASSIFIER, tol=1e-1)
            assert time.monotonic() - begin < 1.0
            assert error.value.code == "RESOURCE_EXHAUSTED" and "exceed the limit of 16" in error.value.message
            slow.join(120)
    finally:
        assert small.stop() == 0


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(shipped, tmp_path):
    draining = start_server(shipped, tmp_path, "--grace-seconds", "30")
    outcome = {}
    try:
        with Client(draining.target, timeout_s=120, retries=0) as client:
            images = np.random.default_rng(3).integers(0, 255, (256, 28, 28), dtype=np.uint8)

            def in_flight():
                outcome["result"] = client.classify(images, model=CLASSIFIER, tol=1e-8)

            thread = threading.Thread(target=in_flight)
            thread.start()
            time.sleep(0.5)
            draining.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(OdeServeError) as error:
                client.classify(IMAGE, model=CLASSIFIER, tol=1e-1)
            assert error.value.code == "UNAVAILABLE"
            thread.join(120)
        assert outcome["result"].items.all_succeeded
        begin = time.monotonic()
        assert draining.process.wait(30) == 0
        assert time.monotonic() - begin < 30
    finally:
        draining.stop(signal.SIGKILL)


def test_sigterm_past_the_grace_period_stops_the_solve_and_exits_cleanly(shipped, tmp_path):
    """A request that cannot finish within ``grace_seconds`` is stopped (UNAVAILABLE, so
    clients retry elsewhere) and the process exits 0 — never SIGABRT from a thread still in
    the middle of a solver step at interpreter exit."""
    draining = start_server(shipped, tmp_path, "--grace-seconds", "2")
    outcome = {}
    try:
        with Client(draining.target, timeout_s=120, retries=0) as client:
            images = np.random.default_rng(4).integers(0, 255, (1024, 28, 28), dtype=np.uint8)

            def in_flight():
                try:
                    outcome["result"] = client.classify(images, model=CLASSIFIER, tol=1e-8)
                except OdeServeError as error:
                    outcome["error"] = error

            thread = threading.Thread(target=in_flight)
            thread.start()
            time.sleep(2.0)
            begin = time.monotonic()
            draining.process.send_signal(signal.SIGTERM)
            status = draining.process.wait(60)
            seconds = time.monotonic() - begin
            thread.join(60)
    finally:
        draining.stop(signal.SIGKILL)
    log = draining.log.read_text()
    assert "terminate called" not in log, log[-2000:]
    assert status == 0, log[-2000:]
    assert seconds < 2 + 10
    assert "result" not in outcome, "the request finished within the grace period; make it slower"
    assert outcome["error"].code == "UNAVAILABLE", outcome["error"]
    assert "grace" in outcome["error"].message
    assert "stopped 1 request" in log
