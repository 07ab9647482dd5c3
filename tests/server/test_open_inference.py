"""The Open Inference Protocol on the same port as odeserve.v1: the stock ``tritonclient[grpc]``
in a venv of its own against a live server, and both protocols on the same inputs — one
implementation, two translators, the same answers, codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, metric, stock_client_venv

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc
from server.oip import grpc_predict_v2_pb2 as oip
from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc

DENSITY = DENSITIES[0]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def images(mnist_dir) -> np.ndarray:
    from training.data import load_mnist

    return load_mnist(mnist_dir, train=False, download=False).images[:16, 0].numpy()


@pytest.fixture(scope="module")
def stubs(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)


def _parameters(message, **values) -> None:
    for name, value in values.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(message.parameters[name], field, value)


def infer(
    model: str, inputs: dict[str, tuple[str, np.ndarray]], raw: bool = True, outputs=(), **parameters
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id="request-7")
    for name, (datatype, array) in inputs.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        else:
            field = {
                "UINT8": "uint_contents",
                "FP32": "fp32_contents",
                "FP64": "fp64_contents",
                "UINT32": "uint_contents",
                "UINT64": "uint64_contents",
            }[datatype]
            getattr(tensor.contents, field).extend(array.ravel().tolist())
    for name in outputs:
        request.outputs.add(name=name)
    _parameters(request, **parameters)
    return request


def huge_empty(model: str, name: str, datatype: str = "UINT8") -> oip.ModelInferRequest:
    """An empty tensor whose shape multiplies out beyond any size numpy can hold."""
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=[2**62, 2**62, 0])
    request.raw_input_contents.append(b"")
    return request


def as_arrays(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": "<f4", "INT32": "<i4", "UINT32": "<u4"}
    return {
        o.name: np.frombuffer(raw, dtypes[o.datatype]).reshape(o.shape)
        for o, raw in zip(response.outputs, response.raw_output_contents)
    }


def test_both_protocols_give_the_same_answers_on_the_same_inputs(stubs, images):
    v1, open_inference = stubs
    for raw in (True, False):
        mine = v1.Classify(
            pb.ClassifyRequest(
                model=CLASSIFIER,
                accuracy=pb.Accuracy(tol=1e-3),
                images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()),
            ),
            timeout=60,
        )
        theirs = open_inference.ModelInfer(
            infer(CLASSIFIER, {"images": ("UINT8", images)}, raw=raw, tol=1e-3), timeout=60
        )
        arrays = as_arrays(theirs)
        assert arrays["labels"].tolist() == list(mine.labels)
        np.testing.assert_array_equal(
            arrays["probabilities"], np.frombuffer(mine.probabilities.data, "<f4").reshape(-1, 10)
        )
        assert arrays["nfe"].tolist() == list(mine.items.nfe) and arrays["status"].tolist() == list(mine.items.status)
        assert theirs.id == "request-7" and theirs.model_version == mine.model_version
        assert theirs.parameters["rtol"].double_param == 1e-3 and theirs.parameters["method"].string_param == "dopri5"
    points = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    mine = v1.LogDensity(
        pb.LogDensityRequest(
            model=DENSITY,
            accuracy=pb.Accuracy(tol=1e-4),
            points=pb.Tensor(dtype="float32", shape=[6, 2], data=points.tobytes()),
        ),
        timeout=60,
    )
    theirs = as_arrays(open_inference.ModelInfer(infer(DENSITY, {"points": ("FP32", points)}, tol="1e-4"), timeout=60))
    np.testing.assert_array_equal(theirs["log_density"], np.frombuffer(mine.log_density.data, "<f4"))
    drawn = v1.Sample(pb.SampleRequest(model=DENSITY, n=5, seed=3, accuracy=pb.Accuracy(tol=1e-4)), timeout=60)
    sampled = as_arrays(
        open_inference.ModelInfer(
            infer(
                DENSITY,
                {"n": ("UINT32", np.array([5], np.uint32)), "seed": ("UINT64", np.array([3], np.uint64))},
                tol=1e-4,
            ),
            timeout=60,
        )
    )
    np.testing.assert_array_equal(sampled["points"], np.frombuffer(drawn.points.data, "<f4").reshape(5, 2))


ERRORS = [  # (v1 request, OIP request): the same problem in each protocol's terms
    ("unknown model", ("Classify", pb.ClassifyRequest(model="nope")), infer("nope", {})),
    (
        "negative tol",
        (
            "Classify",
            pb.ClassifyRequest(
                model=CLASSIFIER,
                accuracy=pb.Accuracy(tol=-1.0),
                images=pb.Tensor(dtype="uint8", shape=[1, 28, 28], data=bytes(784)),
            ),
        ),
        infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, tol=-1.0),
    ),
    (
        "wrong image shape",
        (
            "Classify",
            pb.ClassifyRequest(
                model=CLASSIFIER, images=pb.Tensor(dtype="uint8", shape=[2, 27, 28], data=bytes(2 * 27 * 28))
            ),
        ),
        infer(CLASSIFIER, {"images": ("UINT8", np.zeros((2, 27, 28), np.uint8))}),
    ),
    (
        "points beyond float32",
        (
            "LogDensity",
            pb.LogDensityRequest(
                model=DENSITY, points=pb.Tensor(dtype="float64", shape=[1, 2], data=np.array([[1e300, 0.0]]).tobytes())
            ),
        ),
        infer(DENSITY, {"points": ("FP64", np.array([[1e300, 0.0]]))}),
    ),
    (
        "priority out of range",
        (
            "Classify",
            pb.ClassifyRequest(
                model=CLASSIFIER,
                scheduling=pb.Scheduling(priority=7),
                images=pb.Tensor(dtype="uint8", shape=[1, 28, 28], data=bytes(784)),
            ),
        ),
        infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, priority=7),
    ),
]


@pytest.mark.parametrize("name, v1_call, oip_request", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_the_same_codes_and_messages_in_both_protocols(stubs, name, v1_call, oip_request):
    v1, open_inference = stubs
    rpc, request = v1_call
    with pytest.raises(grpc.RpcError) as mine:
        getattr(v1, rpc)(request, timeout=30)
    with pytest.raises(grpc.RpcError) as theirs:
        open_inference.ModelInfer(oip_request, timeout=30)
    # One message, each protocol naming its own fields (parameters.tol for accuracy.tol).
    in_their_terms = mine.value.details().replace("accuracy.", "parameters.").replace("scheduling.priority", "priority")
    assert theirs.value.code() == mine.value.code() and theirs.value.details() == in_their_terms


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            infer(CLASSIFIER, {"pixels": ("UINT8", np.zeros((1, 28, 28), np.uint8))}),
            "inputs: model 'odenet-mnist' has no input 'pixels' here (for classify: images)",
        ),
        (
            infer(DENSITY, {"n": ("FP32", np.array([2.0], np.float32))}),
            "inputs[0] ('n'): n must be one integer (shape [1]), got FP32 [1]",
        ),
        (
            infer(CLASSIFIER, {"images": ("FP16", np.zeros((1, 28, 28), np.float16))}),
            "inputs[0] ('images').datatype must be one of",
        ),
        (
            infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, outputs=["logits"]),
            "outputs: model 'odenet-mnist' has no output 'logits' (outputs: probabilities, labels, nfe, status)",
        ),
        (
            infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, tol="tight"),
            "parameters.tol must be a number, got 'tight'",
        ),
        (
            infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, tol=-1.0),
            "parameters.tol must be > 0",
        ),
        (
            infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, tol=1e-3, rtol=1e-3),
            "parameters: give tol, or rtol and atol, not both",
        ),
        (
            infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, method="rk45"),
            "parameters.method must be one of",
        ),
        (
            infer(CLASSIFIER, {"images": ("UINT8", np.zeros((1, 28, 28), np.uint8))}, tol="auto", method="tsit5"),
            'parameters.tol "auto" needs the method the model card was measured with (dopri5)',
        ),
        (huge_empty(CLASSIFIER, "images"), f"inputs[0] ('images').shape [{2**62}, {2**62}, 0] is too large"),
        (huge_empty(DENSITY, "points", "FP32"), f"inputs[0] ('points').shape [{2**62}, {2**62}, 0] is too large"),
        (
            infer(CLASSIFIER, {"images": ("UINT8", np.full((1, 28, 28), 300))}, raw=False),
            "inputs[0] ('images'): contents.uint_contents[0] is 300, outside UINT8's range 0 .. 255",
        ),
        (
            infer(
                CLASSIFIER,
                {"images": ("UINT8", np.where(np.arange(784).reshape(1, 28, 28) == 5, 2**32 - 1, 0))},
                raw=False,
            ),
            "inputs[0] ('images'): contents.uint_contents[5] is 4294967295, outside UINT8's range 0 .. 255",
        ),
    ],
    ids=[
        "unknown input",
        "fractional n",
        "unsupported datatype",
        "unknown output",
        "non-numeric tol",
        "negative tol",
        "tol and rtol",
        "unknown method",
        "auto with another method",
        "huge empty images",
        "huge empty points",
        "uint8 of 300",
        "uint8 of 2**32-1",
    ],
)
def test_open_inference_requests_are_checked_field_by_field(stubs, request_, message):
    with pytest.raises(grpc.RpcError) as raised:
        stubs[1].ModelInfer(request_, timeout=30)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and raised.value.details().startswith(message)


def test_requested_outputs_priority_timeout_and_auto(server, stubs, images):
    open_inference = stubs[1]
    request = infer(CLASSIFIER, {"images": ("UINT8", images[:4])}, outputs=["nfe", "labels"], tol="auto")
    request.parameters["priority"].uint64_param = 3  # 1 would need a token granted it (test_fairness.py)
    request.parameters["timeout"].int64_param = 30_000_000  # Triton's microseconds: the deadline auto aims for
    response = open_inference.ModelInfer(request, timeout=60)
    assert [o.name for o in response.outputs] == ["nfe", "labels"] and len(response.raw_output_contents) == 2
    assert response.parameters["rtol"].double_param == 1e-4  # idle, 30 s: the card's tightest
    samples_before = metric(server.metrics_url, "odeserve_queue_wait_seconds_count", model=CLASSIFIER, priority="3")
    assert samples_before >= 1
    hurried = infer(CLASSIFIER, {"images": ("UINT8", images[:4])}, tol="auto", latency_target_seconds=1e-6)
    assert open_inference.ModelInfer(hurried, timeout=60).parameters["rtol"].double_param == 1.0


def test_metadata_health_and_repository(stubs):
    open_inference = stubs[1]
    assert open_inference.ServerLive(oip.ServerLiveRequest(), timeout=10).live
    assert open_inference.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
    assert open_inference.ModelReady(oip.ModelReadyRequest(name=CLASSIFIER), timeout=10).ready
    assert not open_inference.ModelReady(oip.ModelReadyRequest(name="nope"), timeout=10).ready
    metadata = open_inference.ModelMetadata(oip.ModelMetadataRequest(name=DENSITY), timeout=10)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("n", "UINT32", [1]),
        ("seed", "UINT64", [1]),
        ("points", "FP32", [-1, 2]),
    ]
    assert {t.name for t in metadata.outputs} == {"points", "log_density", "nfe", "status"}
    assert "inputs n (and seed)" in metadata.properties["sample"]
    index = open_inference.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
    assert {m.name for m in index.models} == {CLASSIFIER, *DENSITIES} and {m.state for m in index.models} == {"READY"}


@pytest.fixture(scope="session")
def kserve_venv(tmp_path_factory) -> Path:
    return stock_client_venv(tmp_path_factory.mktemp("kserve") / "venv", "kserve")


def _report(venv: Path, script: str, server, mnist_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-I", str(HERE / script), server.target, str(mnist_dir / "MNIST" / "raw")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def _check_classifications(report: dict) -> None:
    loose, tight = report["0.1"], report["0.0001"]
    assert loose["accuracy"] >= 0.95 and tight["accuracy"] >= 0.95 and loose["status"] == tight["status"] == [1]
    assert loose["nfe"] < tight["nfe"]
    assert report["negative_tol"]["status"].endswith("INVALID_ARGUMENT")
    assert report["negative_tol"]["message"].startswith("parameters.tol must be > 0")


def test_the_stock_tritonclient_classifies_real_mnist(tritonclient_venv, server, mnist_dir):
    report = _report(tritonclient_venv, "oip_tritonclient.py", server, mnist_dir)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["server"]["name"] == "odeserve" and "model_repository" in report["server"]["extensions"]
    assert set(report["repository"]) == {CLASSIFIER, *DENSITIES}
    assert [i["name"] for i in report["metadata"]["inputs"]] == ["images"]
    _check_classifications(report)
    assert report["0.1"]["probabilities_shape"] == [64, 10]
    assert (report["0.1"]["rtol"], report["0.0001"]["rtol"]) == (0.1, 0.0001)


def test_the_documented_tritonclient_example_runs(tritonclient_venv, server, mnist_dir, tmp_path):
    import re

    from live_server import ROOT

    docs = (ROOT / "docs" / "server.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "tritonclient" in block]
    script = example.replace("../shared/data", str(mnist_dir)).replace("127.0.0.1:50051", server.target)
    script += (
        "\nprint(result.as_numpy('labels')[:10].tolist(), result.get_response().parameters['rtol'].double_param)\n"
    )
    (tmp_path / "example.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run(
        [str(tritonclient_venv / "bin" / "python"), "-I", str(tmp_path / "example.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    labels, rtol = run.stdout.strip().rsplit(" ", 1)
    assert labels == "[7, 2, 1, 0, 4, 1, 4, 9, 5, 9]" and float(rtol) == 1e-2


def test_the_kserve_sdk_classifies_real_mnist(kserve_venv, server, mnist_dir):
    report = _report(kserve_venv, "oip_kserve.py", server, mnist_dir)
    assert report["live"] and report["model_ready"]
    _check_classifications(report)


def test_tokens_guard_inference_but_not_the_probes(density_only, tmp_path):
    from live_server import start_server

    running = start_server(density_only, tmp_path, "--tokens", "oip-secret")
    points = np.zeros((2, 2), np.float32)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(oip.ServerLiveRequest(), timeout=10).live
            assert stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(infer(DENSITY, {"points": ("FP32", points)}), timeout=30)
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
            response = stub.ModelInfer(
                infer(DENSITY, {"points": ("FP32", points)}),
                timeout=30,
                metadata=[("authorization", "Bearer oip-secret")],
            )
            assert as_arrays(response)["status"].tolist() == [1, 1]
        assert metric(running.metrics_url, "odeserve_requests_total", rpc="ModelInfer", code="UNAUTHENTICATED") == 1
    finally:
        assert running.stop() == 0


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_repeated_outputs_are_refused_before_any_work(server, stubs, mnist_test_digits):
    """The issue's amplification: 1,024 real digits at tol 1e-1 with ``outputs`` naming
    ``probabilities`` 25,000 times (a 1.23 MB request). The server built one copy per name
    before any size check: RSS 0.64 -> 3.63 GB, health Check 4.5 s, four such calls 13 s."""
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    attack = infer(
        CLASSIFIER, {"images": ("UINT8", mnist_test_digits[0][:1024])}, outputs=["probabilities"] * 25_000, tol=1e-1
    )
    assert 1_200_000 < attack.ByteSize() < 1_300_000

    def refused() -> tuple[grpc.StatusCode, str, float]:
        begin = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            stubs[1].ModelInfer(attack, timeout=60)
        return raised.value.code(), raised.value.details(), time.monotonic() - begin

    rss_before = _rss_bytes(server.process.pid)
    with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(4) as pool:
        health = health_pb2_grpc.HealthStub(channel)
        calls = [pool.submit(refused) for _ in range(4)]
        checks = []
        while not checks or not all(call.done() for call in calls):
            begin = time.monotonic()
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            checks.append(time.monotonic() - begin)
        outcomes = [call.result() for call in calls]
    grown = _rss_bytes(server.process.pid) - rss_before
    print(
        f"4 amplification calls: {max(s for *_, s in outcomes):.3f} s each at most, RSS {rss_before / 2**20:.0f} MiB "
        f"-> {grown / 2**20:+.1f} MiB, health Check {max(checks) * 1000:.1f} ms at most"
    )
    for code, details, seconds in outcomes:
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert details == "outputs[1]: output 'probabilities' is asked for twice; ask for each output once"
        assert seconds < 2.0
    assert grown < 64 * 2**20 and max(checks) < 0.5


def test_a_response_over_the_message_limit_is_refused_before_it_is_built(density_only, tmp_path):
    """Sample n=1,024 answers 20 kB: over a 16 kB max_message_bytes the server says so, rather
    than building the response for gRPC to refuse to send."""
    from live_server import start_server

    running = start_server(density_only, tmp_path, "--max-message-bytes", "16384")
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            n = np.array([1024], np.uint32)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(infer(DENSITY, {"n": ("UINT32", n)}, tol=1e-1), timeout=60)
            assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert raised.value.details().startswith(
                "the response would take up to 21"
            ) and raised.value.details().endswith(
                " bytes, over the server's max_message_bytes of 16384: ask for fewer items or outputs"
            )
            response = stub.ModelInfer(
                infer(DENSITY, {"n": ("UINT32", n)}, outputs=["nfe", "status"], tol=1e-1), timeout=60
            )
            assert [o.name for o in response.outputs] == ["nfe", "status"] and response.ByteSize() < 16384
    finally:
        assert running.stop() == 0


def test_the_response_is_charged_to_the_inflight_bytes_and_its_bound_holds(density_only):
    """The response's bound is held against ``max_inflight_bytes`` before the response is built,
    and it is a true bound on the message's size."""
    import asyncio

    import torch

    from server.api import CallRecord, InferenceResult, RequestError, Solved
    from server.config import ServerConfig
    from server.models import load_models
    from server.open_inference import OpenInference, response_bytes
    from server.service import ByteBudget, Call

    model = load_models(density_only, torch.device("cpu"))[DENSITY]
    n = 1000
    outputs = {"points": np.zeros((n, 2), np.float32), "log_density": np.zeros(n, np.float32)}
    result = InferenceResult(
        model.name,
        model.version,
        outputs,
        np.ones(n, np.uint32),
        np.ones(n, np.int32),
        0.0,
        0.0,
        Solved(0.1, 0.1, "dopri5", 0, "float32"),
    )

    class Service:  # the service's part the translator uses, with a canned result
        config = ServerConfig()

        def model(self, name: str, version: str = ""):
            return model

        async def infer(self, request, call):
            return result

    request = infer(DENSITY, {"n": ("UINT32", np.array([n], np.uint32))}, tol=1e-1)
    request.id = "x" * 256
    bound = response_bytes(model.name, model.version, request.id, [*outputs.values(), result.nfe, result.status])
    translator = OpenInference(Service(), version="test")
    tight = ByteBudget(bound - 1).reservation()
    with pytest.raises(RequestError) as raised:
        asyncio.run(translator.model_infer(request, Call(lambda: None, CallRecord("ModelInfer"), tight)))
    assert raised.value.code.value == "RESOURCE_EXHAUSTED" and "(max_inflight_bytes)" in raised.value.message
    assert tight.held == 0
    enough = ByteBudget(bound).reservation()
    response = asyncio.run(translator.model_infer(request, Call(lambda: None, CallRecord("ModelInfer"), enough)))
    assert enough.held == bound and response.ByteSize() <= bound
    print(f"response {response.ByteSize()} bytes, bound {bound}")
