"""The asyncio front end against clients written elsewhere: half-open calls, made-up paths,
undecodable and oversized-in-rank requests, huge names, slow /metrics clients, the memory
budget — each answered precisely, with the server serving everyone else."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live_server import CLASSIFIER, DENSITIES, ROOT, metric, scrape, start_server, value

from neuralode.solvers import Status
from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc
from server.api import SolveStatus

DENSITY = DENSITIES[0]
IMAGE = np.zeros((1, 28, 28), dtype=np.uint8)


def _classify(images=IMAGE, model=CLASSIFIER, **accuracy) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=model,
        images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()),
        accuracy=pb.Accuracy(**accuracy),
    )


def _timed(call):
    begin = time.monotonic()
    result = call()
    return result, time.monotonic() - begin


def _own_connection(target: str) -> grpc.Channel:
    """A channel on a connection of its own (gRPC shares one between channels by default),
    as another process's would be."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _threads(pid: int) -> int:
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


@pytest.fixture(scope="module")
def quick_timeout(shipped, tmp_path_factory):
    """A server that ends calls without a request message after 3 s."""
    running = start_server(shipped, tmp_path_factory.mktemp("quick"), "--request-read-timeout-s", "3")
    yield running
    assert running.stop() == 0


def test_300_half_open_calls_lock_nobody_out_and_are_ended(quick_timeout):
    released = threading.Event()

    def never_sends():
        released.wait(60)
        yield from ()

    half_open_channel = _own_connection(quick_timeout.target)
    call = half_open_channel.stream_unary(
        "/odeserve.v1.Inference/Classify", request_serializer=bytes, response_deserializer=bytes
    )
    pending = [call.future(never_sends(), timeout=60) for _ in range(300)]
    try:
        time.sleep(1.0)  # 256 are open on the server, the most one connection may have; the rest are refused
        with _own_connection(quick_timeout.target) as channel:  # a probe or another client
            health, seconds = _timed(
                lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING and seconds < 1.0
            response, seconds = _timed(lambda: pb_grpc.InferenceStub(channel).Classify(_classify(tol=1e-1), timeout=5))
            assert list(response.items.status) == [pb.SOLVE_STATUS_SUCCESS] and seconds < 1.0
        end = time.monotonic() + 30
        errors = [f.exception(timeout=max(0.0, end - time.monotonic())) for f in pending]  # raises if one hangs
        ended = [e for e in errors if e.code() is grpc.StatusCode.CANCELLED]
        refused = [e for e in errors if e.code() is grpc.StatusCode.UNAVAILABLE]
        assert len(ended) >= 256 and len(ended) + len(refused) == 300  # calls beyond the limit waited, or were refused
        assert all("no request message arrived within 3 s" in error.details() for error in ended)
    finally:
        released.set()
        half_open_channel.close()


def test_undecodable_and_high_rank_requests_are_invalid_and_counted(server):
    before = metric(server.metrics_url, "odeserve_requests_total", rpc="Classify", code="INVALID_ARGUMENT")
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary(
            "/odeserve.v1.Inference/Classify", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.RpcError) as raised:
            raw(b"\x0a\x03\xff\xfe\xfd", timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "the request is not a valid odeserve.v1.ClassifyRequest message"
        deep = pb.ClassifyRequest(model=CLASSIFIER, images=pb.Tensor(dtype="uint8", shape=[1] * 65, data=b"\x00"))
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.InferenceStub(channel).Classify(deep, timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "images.shape has 65 dimensions; at most 8 are accepted"
    assert metric(server.metrics_url, "odeserve_requests_total", rpc="Classify", code="INVALID_ARGUMENT") == before + 2


@pytest.mark.parametrize("field", ["model", "version", "method"])
def test_long_client_strings_are_quoted_as_a_short_prefix(server, field):
    huge = "x" * 10_000
    request = _classify(**({"method": huge} if field == "method" else {}))
    if field != "method":
        setattr(request, field, huge)
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.InferenceStub(channel).Classify(request, timeout=10)
    assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert "(10000 characters)" in raised.value.details() and len(raised.value.details()) < 200


def test_messages_print_the_value_received_and_zero_means_the_default(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Classify(_classify(tol=1.0000001), timeout=10)
        assert raised.value.details() == "accuracy.tol must be between 1e-08 and 1, got 1.0000001"
        defaulted = stub.Classify(_classify(tol=0.0), timeout=30)
        info = stub.GetModel(pb.GetModelRequest(name=CLASSIFIER), timeout=10)
        assert defaulted.solved.rtol == defaulted.solved.atol == info.default_tol


def test_metadata_lets_a_client_build_its_requests(server):
    with grpc.insecure_channel(server.target) as channel:
        info = pb_grpc.InferenceStub(channel).GetModel(pb.GetModelRequest(name=CLASSIFIER), timeout=10)
        density = pb_grpc.InferenceStub(channel).GetModel(pb.GetModelRequest(name=DENSITY), timeout=10)
    (classify,) = info.signatures
    assert classify.rpc == "Classify"
    images = {t.name: t for t in classify.inputs}["images"]
    assert list(images.dtypes) == ["uint8", "float32"] and list(images.shape) == [-1, 28, 28]
    assert [(t.name, list(t.dtypes), list(t.shape)) for t in classify.outputs] == [
        ("probabilities", ["float32"], [-1, 10]),
        ("labels", ["int32"], [-1]),
    ]
    assert {s.rpc for s in density.signatures} == {"Sample", "LogDensity"}
    assert info.limits.max_items_per_request == 1024 and list(info.limits.methods) == [
        "adaptive_heun",
        "bosh3",
        "dopri5",
        "dopri8",
        "fehlberg2",
        "tsit5",
    ]
    assert "little-endian" in info.tensor_encoding and "base64" in info.tensor_encoding


def test_the_documented_json_call_works(server):
    """docs/server.md's grpcurl-style JSON (bytes as base64), sent as written there."""
    from google.protobuf import json_format

    docs = (ROOT / "docs" / "server.md").read_text()
    body = re.search(r"grpcurl -plaintext -d '(\{.*?\})' \S+ odeserve\.v1\.Inference/LogDensity", docs, re.S).group(1)
    request = json_format.Parse(body, pb.LogDensityRequest())
    with grpc.insecure_channel(server.target) as channel:
        response = pb_grpc.InferenceStub(channel).LogDensity(request, timeout=30)
    assert json.loads(json_format.MessageToJson(response))["items"]["status"] == ["SOLVE_STATUS_SUCCESS"] * 2


def test_made_up_paths_without_a_token_do_not_grow_metrics(density_only, tmp_path):
    running = start_server(density_only, tmp_path, "--tokens", "secret")

    def made_up_calls(channel, count: int, offset: int) -> None:
        for i in range(offset, offset + count):  # under the protected service, and anywhere, some 6 kB long
            path = f"/odeserve.v1.Inference/Made{i}" if i % 2 else f"/x{i}.{'y' * (i % 7 * 1000)}/Z"
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(b"", timeout=10)
            assert raised.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)

    try:
        with grpc.insecure_channel(running.target) as channel:
            made_up_calls(channel, 2, 0)  # the first refusal of each kind creates its series
            before = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode().splitlines()
            made_up_calls(channel, 700, 2)
        after = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode().splitlines()
        assert len(after) - len(before) <= 3 and max(map(len, after)) < 300
        assert value(scrape(running.metrics_url), "odeserve_requests_total", rpc="unknown") == 702
    finally:
        assert running.stop() == 0


def test_slow_metrics_clients_add_no_threads_and_scrapes_still_work(server):
    pid = server.process.pid
    before = _threads(pid)
    host, port = server.metrics_url.removeprefix("http://").split("/")[0].split(":")
    slow = [socket.create_connection((host, int(port))) for _ in range(500)]
    try:
        for sock in slow:
            sock.sendall(b"GET /metr")  # and never the rest
        # Connections are accepted in arrival order: once this scrape is answered, all 500 were.
        assert metric(server.metrics_url, "odeserve_queue_capacity_items", model=CLASSIFIER) > 0
        assert _threads(pid) <= before + 2
    finally:
        for sock in slow:
            sock.close()


def test_the_memory_budget_refuses_what_would_exceed_it(density_only, tmp_path):
    running = start_server(density_only, tmp_path, "--max-inflight-bytes", "32768")
    points = np.zeros((1024, 2), np.float32)  # 8 kB of message, 12 kB of rows, 24 kB of solver state
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.LogDensityRequest(
                model=DENSITY, points=pb.Tensor(dtype="float32", shape=[1024, 2], data=points.tobytes())
            )
            with pytest.raises(grpc.RpcError) as raised:
                stub.LogDensity(request, timeout=30)
            assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceed its limit of 0 MiB (max_inflight_bytes)" in raised.value.details()
            small = pb.LogDensityRequest(
                model=DENSITY, points=pb.Tensor(dtype="float32", shape=[8, 2], data=points[:8].tobytes())
            )
            assert len(stub.LogDensity(small, timeout=30).items.nfe) == 8
    finally:
        assert running.stop() == 0


def test_solver_status_codes_are_the_wire_codes():
    wire = {name.removeprefix("SOLVE_STATUS_"): number for name, number in pb.SolveStatus.items() if number}
    assert wire == {status.name: int(status) for status in SolveStatus}
    assert {status.name: int(status) for status in Status if status is not Status.RUNNING} == wire
