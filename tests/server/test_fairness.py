"""Sharing the server between clients, through a real server on the shipped classifier and real
MNIST: priority is bound to the caller's bearer token, a flood of urgent work never starves the
other levels, and one client's burst cannot fill the queue for the others (issue 29)."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest
from live_server import CLASSIFIER, metric, start_server

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

# "ops" may ask for level 1; "hog" and "small" have no grant: the default level (2) and below.
TOKENS = "ops priority=1, hog, small"


@pytest.fixture(scope="module")
def shared(shipped, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier-only")
    shutil.copy(shipped / f"{CLASSIFIER}.pt", folder / f"{CLASSIFIER}.pt")
    running = start_server(folder, tmp_path_factory.mktemp("fairness"), env={"ODESERVE_TOKENS": TOKENS})
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def digits(mnist_test_digits) -> np.ndarray:
    return mnist_test_digits[0][:1024]


@pytest.fixture(scope="module")
def stub(shared):
    with grpc.insecure_channel(shared.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def _as(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _classify(images: np.ndarray, tol: float, priority: int = 0) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=CLASSIFIER,
        images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()),
        accuracy=pb.Accuracy(tol=tol),
        scheduling=pb.Scheduling(priority=priority),
    )


def _wait_until_running(metrics_url: str, at_least: int, calls, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while metric(metrics_url, "odeserve_running_items", model=CLASSIFIER) < at_least:
        assert not any(call.done() and call.code() is grpc.StatusCode.OK for call in calls), "it ended early"
        assert time.monotonic() < end, "the big requests never started"
        time.sleep(0.05)


def _wait_until_idle(metrics_url: str, timeout: float = 60.0) -> None:
    """Until what earlier tests cancelled has left the queue and the batch."""
    end = time.monotonic() + timeout
    while any(
        metric(metrics_url, name, model=CLASSIFIER) for name in ("odeserve_queued_items", "odeserve_running_items")
    ):
        assert time.monotonic() < end, "the server never became idle"
        time.sleep(0.05)


def test_priority_above_the_default_needs_a_token_granted_it(shared, stub, digits):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(_classify(digits[:1], 1e-2, priority=1), timeout=30, metadata=_as("small"))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == (
        "scheduling.priority 1 is more urgent than this caller may ask for (2 .. 3): levels above the default need a "
        "bearer token granted them (token_file: '<token> priority=N')"
    )
    for token, priority in (("small", 2), ("small", 3), ("ops", 1)):
        response = stub.Classify(_classify(digits[:1], 1e-2, priority=priority), timeout=30, metadata=_as(token))
        assert response.items.status == [pb.SOLVE_STATUS_SUCCESS]
    assert metric(shared.metrics_url, "odeserve_requests_total", rpc="Classify", code="PERMISSION_DENIED") == 1
    assert metric(shared.metrics_url, "odeserve_queue_wait_seconds_count", model=CLASSIFIER, priority="1") == 1


def test_the_open_inference_timeout_parameter_keeps_the_callers_grant(shared, digits):
    """A deadline from OIP's ``timeout`` parameter once replaced the call with an anonymous one:
    a granted caller lost its priority (PERMISSION_DENIED) and its identity for fair admission."""
    from server.oip import grpc_predict_v2_pb2 as oip
    from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    request = oip.ModelInferRequest(model_name=CLASSIFIER)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(digits[:1].tobytes())
    request.parameters["tol"].double_param = 1e-2
    request.parameters["priority"].int64_param = 1
    request.parameters["timeout"].int64_param = 30_000_000  # microseconds
    with grpc.insecure_channel(shared.target) as channel:
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, metadata=_as("ops"))
    status = [i for i, output in enumerate(response.outputs) if output.name == "status"]
    assert np.frombuffer(response.raw_output_contents[status[0]], "<i4").tolist() == [1]  # SUCCESS
    with pytest.raises(grpc.RpcError) as raised, grpc.insecure_channel(shared.target) as channel:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, metadata=_as("small"))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_default_client_keeps_its_latency_beside_a_privileged_priority_1_flood(shared, stub, digits):
    """The issue's starvation: 1,024 images at tol 1e-8 with priority 1 took every slot, and a
    default-priority 1-image tol 1e-2 client got no answer in 30 s. Now the flood needs a granted
    token, and even then the lower levels keep a share of every step (target: p99 <= 1 s)."""
    idle = [stub.Classify(_classify(digits[1:2], 1e-2), timeout=30, metadata=_as("small")) for _ in range(2)]
    assert all(r.items.status == [pb.SOLVE_STATUS_SUCCESS] for r in idle)
    flood = stub.Classify.future(_classify(digits, 1e-8, priority=1), timeout=600, metadata=_as("ops"))
    try:
        _wait_until_running(shared.metrics_url, 200, [flood])
        seconds = []
        for index in range(30):
            begin = time.monotonic()
            response = stub.Classify(_classify(digits[index : index + 1], 1e-2), timeout=10, metadata=_as("small"))
            seconds.append(time.monotonic() - begin)
            assert response.items.status == [pb.SOLVE_STATUS_SUCCESS]
        assert not flood.done(), "the flood should still be running"
    finally:
        flood.cancel()
    p50, p99 = np.percentile(seconds, [50, 99])
    print(f"default client beside a priority-1 flood: p50 {p50:.3f} s, p99 {p99:.3f} s, max {max(seconds):.3f} s")
    # The target is p99 <= 1 s (measured in docs/server.md); a loaded 2-core CI machine gets slack.
    assert p99 < 3.0


def test_one_client_cannot_fill_the_queue_for_another(shared, stub, digits):
    """The issue's case: one client's 4 x 1,024 + 256 items at tol 1e-8 filled
    max_queued_items (4,096), and a 1-image client got RESOURCE_EXHAUSTED on 31 of 43 calls."""
    _wait_until_idle(shared.metrics_url)
    hog = [
        stub.Classify.future(_classify(images, 1e-8), timeout=600, metadata=_as("hog"))
        for images in (digits, digits, digits, digits, digits[:256])
    ]
    try:
        end = time.monotonic() + 60
        while metric(shared.metrics_url, "odeserve_queued_items", model=CLASSIFIER) < 768:
            assert time.monotonic() < end, "the hog's requests never queued"
            time.sleep(0.05)
        time.sleep(1.0)  # the hog's five calls have all arrived
        answered = 0
        for index in range(10):
            response = stub.Classify(_classify(digits[index : index + 1], 1e-1), timeout=30, metadata=_as("small"))
            answered += response.items.status == [pb.SOLVE_STATUS_SUCCESS]
        assert answered == 10
        refused = [call for call in hog if call.done()]
        # Half the room, and rows of the batch parked for the small client's items (they count as queued).
        queued = metric(shared.metrics_url, "odeserve_queued_items", model=CLASSIFIER)
        assert len(refused) >= 2 and queued <= 2048 + 256
        for call in refused:  # what the hog may not queue is refused at once
            assert call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "this client holds" in call.details() and "its share of the queue" in call.details()
    finally:
        for call in hog:
            call.cancel()


def test_token_grants_come_from_both_sources_and_a_bad_one_stops_the_server(density_only, tmp_path):
    from server.auth import Token, read_tokens
    from server.config import ServerConfig

    file = tmp_path / "tokens.txt"
    file.write_text("# on-call\nops-secret priority=1  # pages\n\nuser-secret\n")
    config = ServerConfig(tokens="a, b priority=2", token_file=str(file))
    assert read_tokens(config) == [Token(b"a"), Token(b"b", 2), Token(b"ops-secret", 1), Token(b"user-secret")]
    for bad in ("s3cret priority=3", "s3cret priority=0", "s3cret prio=1", "s3cret other-secret"):
        with pytest.raises(ValueError) as raised:
            read_tokens(ServerConfig(tokens=bad))
        assert (
            str(raised.value) == "tokens entry 1: a token may only be followed by 'priority=N', N in 1 .. 2 "
            "(default_priority)"
        )
    file.write_text("ops-secret priority=1\ns3cret priority=high\n")
    with pytest.raises(RuntimeError) as raised:
        start_server(density_only, tmp_path, "--token-file", str(file))
    assert f"{file} line 2: a token may only be followed by 'priority=N'" in str(raised.value)
    assert "s3cret" not in str(raised.value)
