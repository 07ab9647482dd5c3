"""Property-based fuzzing of every RPC against a live server: whatever the fields hold, the
answer is a deliberate status (never INTERNAL or UNKNOWN), and the server keeps serving."""

from __future__ import annotations

from collections import Counter, defaultdict

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from live_server import CLASSIFIER, DENSITIES, start_server

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

MAX_ITEMS = 8
FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Codes a fuzzed request may deserve; DEADLINE_EXCEEDED only because each call is bounded.
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@pytest.fixture(scope="module")
def fuzz_server(shipped, tmp_path_factory):
    """Small limits so that any request the fuzzer invents stays cheap."""
    running = start_server(
        shipped,
        tmp_path_factory.mktemp("fuzz"),
        "--max-items-per-request",
        str(MAX_ITEMS),
        "--max-nfe",
        "200",
        "--min-tol",
        "1e-6",
        "--max-message-bytes",
        "65536",
    )
    channel = grpc.insecure_channel(running.target)
    yield running, pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel)
    channel.close()
    assert running.stop() == 0


names = st.one_of(
    st.sampled_from([CLASSIFIER, *DENSITIES, "", "..", "../checkpoints/cnf-moons", "/etc/passwd"]), st.text(max_size=40)
)
versions = st.one_of(st.just(""), st.text(max_size=20))
floats = st.one_of(
    st.just(0.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-12, 1e-6, 1e-3, 0.1, 1.0, 2.0, -1e-3]),
)
accuracies = st.builds(
    pb.Accuracy,
    tol=floats,
    rtol=floats,
    atol=floats,
    method=st.one_of(
        st.sampled_from(["", "dopri5", "tsit5", "bosh3", "euler", "rk4", "DOPRI5", "nope"]), st.text(max_size=10)
    ),
    max_nfe=st.integers(0, 2**32 - 1),
)
dtype_names = st.one_of(st.sampled_from(["uint8", "float32", "float64", "int32", "float16", ""]), st.text(max_size=8))
shapes = st.lists(st.integers(-(2**40), 2**40) | st.integers(-2, 40), max_size=6)


@st.composite
def well_formed(draw, item_shape: tuple[int, ...]) -> pb.Tensor:
    """Bytes that match dtype and shape, with any values (NaN, Inf, out of range)."""
    dtype = draw(st.sampled_from(["uint8", "float32", "float64"]))
    count = draw(st.integers(0, MAX_ITEMS + 2))
    array = draw(arrays(np.dtype(dtype).newbyteorder("<"), (count, *item_shape)))
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())


def tensors(item_shape: tuple[int, ...]):
    anything = st.builds(pb.Tensor, dtype=dtype_names, shape=shapes, data=st.binary(max_size=4096))
    return st.one_of(well_formed(item_shape), anything, st.just(pb.Tensor()))


SEEN: dict[str, Counter] = defaultdict(Counter)  # RPC -> status codes the fuzzer reached


def call(method, request) -> None:
    rpc = type(request).__name__.removesuffix("Request")
    try:
        method(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() not in NEVER, f"{error.code()}: {error.details()} for {request}"
        assert error.code() in DELIBERATE, f"{error.code()}: {error.details()} for {request}"
        assert error.details(), "a refusal must say why"
        SEEN[rpc][error.code().name] += 1
        return
    SEEN[rpc]["OK"] += 1


@st.composite
def mostly(draw, valid, fuzzed):
    """A valid field three times in four, so that whole requests often get through and the
    fuzzer explores the paths behind validation too."""
    return draw(fuzzed) if draw(st.integers(0, 3)) == 0 else draw(valid)


valid_accuracy = st.builds(
    pb.Accuracy, tol=st.sampled_from([1e-1, 1e-2, 1e-3]), method=st.sampled_from(["", "dopri5", "tsit5"])
)
images = st.integers(1, MAX_ITEMS).flatmap(lambda n: arrays(np.uint8, (n, 28, 28)))
points = st.integers(1, MAX_ITEMS).flatmap(
    lambda n: arrays(np.dtype("<f4"), (n, 2), elements=st.floats(-5, 5, width=32))
)


def tensor_of(arrays_strategy):
    return arrays_strategy.map(lambda a: pb.Tensor(dtype=a.dtype.name, shape=list(a.shape), data=a.tobytes()))


@FUZZ
@given(
    model=mostly(st.just(CLASSIFIER), names),
    version=mostly(st.just(""), versions),
    images=mostly(tensor_of(images), st.one_of(tensors((28, 28)), tensors((1, 28, 28)))),
    accuracy=mostly(valid_accuracy, accuracies),
)
def test_fuzz_classify(fuzz_server, model, version, images, accuracy):
    _, stub, _ = fuzz_server
    call(stub.Classify, pb.ClassifyRequest(model=model, version=version, images=images, accuracy=accuracy))


@FUZZ
@given(
    model=mostly(st.sampled_from(DENSITIES), names),
    version=mostly(st.just(""), versions),
    n=mostly(st.integers(1, MAX_ITEMS), st.integers(0, 2**32 - 1)),
    seed=st.integers(0, 2**64 - 1),
    accuracy=mostly(valid_accuracy, accuracies),
)
def test_fuzz_sample(fuzz_server, model, version, n, seed, accuracy):
    _, stub, _ = fuzz_server
    call(stub.Sample, pb.SampleRequest(model=model, version=version, n=n, seed=seed, accuracy=accuracy))


@FUZZ
@given(
    model=mostly(st.sampled_from(DENSITIES), names),
    version=mostly(st.just(""), versions),
    points=mostly(tensor_of(points), tensors((2,))),
    accuracy=mostly(valid_accuracy, accuracies),
)
def test_fuzz_log_density(fuzz_server, model, version, points, accuracy):
    _, stub, _ = fuzz_server
    call(stub.LogDensity, pb.LogDensityRequest(model=model, version=version, points=points, accuracy=accuracy))


@FUZZ
@given(name=mostly(st.sampled_from([CLASSIFIER, *DENSITIES]), names), version=mostly(st.just(""), versions))
def test_fuzz_get_model(fuzz_server, name, version):
    _, stub, _ = fuzz_server
    call(stub.GetModel, pb.GetModelRequest(name=name, version=version))


def test_after_fuzzing_the_server_is_healthy_and_answers(fuzz_server):
    running, stub, health = fuzz_server
    assert running.process.poll() is None
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    reply = stub.LogDensity(
        pb.LogDensityRequest(
            model=DENSITIES[0],
            points=pb.Tensor(dtype="float32", shape=[1, 2], data=bytes(8)),
            accuracy=pb.Accuracy(tol=1e-3),
        ),
        timeout=10,
    )
    assert list(reply.items.status) == [pb.SOLVE_STATUS_SUCCESS]
    assert "Traceback" not in running.log.read_text()
    for rpc in ("Classify", "Sample", "LogDensity", "GetModel"):  # the fuzzer reached both sides
        assert SEEN[rpc]["OK"] > 0 and SEEN[rpc]["INVALID_ARGUMENT"] + SEEN[rpc]["NOT_FOUND"] > 0, (rpc, SEEN[rpc])
