"""The Open Inference Protocol over HTTP/REST, against a real server: raw HTTP requests as curl
sends them, the stock ``tritonclient[http]`` in a venv of its own, the same answers and errors
as the gRPC port, and the port's protections (huge bodies, slow senders, idle connections)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import numpy as np
import pytest
from live_server import CLASSIFIER, DENSITIES, metric, start_server

from server.oip import grpc_predict_v2_pb2 as oip
from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc

DENSITY = DENSITIES[0]
HERE = Path(__file__).parent


def request(
    base: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    address = urlsplit(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def infer_json(base: str, model: str, document: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = request(base, "POST", f"/v2/models/{model}/infer", document, headers)
    return status, json.loads(body)


def images_document(images: np.ndarray, **parameters) -> dict:
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "UINT8", "data": images.ravel().tolist()}
    return {"id": "rest-1", "inputs": [tensor], "parameters": parameters}


def outputs_of(document: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in document["outputs"]}


@pytest.fixture(scope="module")
def digits(mnist_test_digits) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_test_digits
    return images[:32], labels[:32]


def test_health_metadata_and_the_repository(server):
    base = server.http_url
    assert request(base, "GET", "/v2/health/live")[0] == 200
    assert request(base, "GET", "/v2/health/ready")[0] == 200
    assert request(base, "GET", f"/v2/models/{CLASSIFIER}/ready")[0] == 200
    status, _, body = request(base, "GET", "/v2/models/no-such-model/ready")
    assert status == 400 and "no-such-model" in json.loads(body)["error"]
    status, _, body = request(base, "GET", "/v2")
    assert status == 200 and json.loads(body)["name"] == "odeserve"
    status, headers, body = request(base, "GET", f"/v2/models/{CLASSIFIER}")
    metadata = json.loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert metadata["name"] == CLASSIFIER and [i["name"] for i in metadata["inputs"]] == ["images"]
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "labels", "nfe", "status"}
    version = metadata["versions"][0]
    assert request(base, "GET", f"/v2/models/{CLASSIFIER}/versions/{version}")[0] == 200
    status, _, body = request(base, "GET", f"/v2/models/{CLASSIFIER}/versions/nope")
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, _, body = request(base, "POST", "/v2/repository/index", b"")
    assert status == 200 and {m["name"] for m in json.loads(body)} == {CLASSIFIER, *DENSITIES}


def test_classifies_real_mnist_and_looser_tolerances_cost_fewer_evaluations(server, digits):
    images, labels = digits
    answers = {}
    for tol in (1e-1, 1e-4):
        status, document = infer_json(server.http_url, CLASSIFIER, images_document(images, tol=tol))
        assert status == 200, document
        answers[tol] = outputs_of(document)
        assert document["id"] == "rest-1" and document["parameters"]["rtol"] == tol
        assert (answers[tol]["labels"] == labels).mean() >= 0.95
        assert answers[tol]["status"].tolist() == [1] * len(images)
    assert answers[1e-1]["nfe"].mean() < answers[1e-4]["nfe"].mean()


def test_rest_and_grpc_give_the_same_answers(server, digits):
    images = digits[0][:8]
    status, document = infer_json(server.http_url, CLASSIFIER, images_document(images, tol=1e-3))
    assert status == 200
    message = oip.ModelInferRequest(model_name=CLASSIFIER)
    message.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    message.raw_input_contents.append(images.tobytes())
    message.parameters["tol"].double_param = 1e-3
    with grpc.insecure_channel(server.target) as channel:
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=60)
    by_grpc = {
        o.name: np.frombuffer(raw, {"FP32": "<f4", "INT32": "<i4", "UINT32": "<u4"}[o.datatype])
        for o, raw in zip(response.outputs, response.raw_output_contents)
    }
    by_rest = outputs_of(document)
    for name, values in by_grpc.items():
        np.testing.assert_array_equal(by_rest[name].ravel().astype(values.dtype), values, err_msg=name)


def test_binary_tensors_in_and_out_give_the_json_answers(server):
    points = np.array([[0.5, -1.0], [2.0, 0.25], [0.0, 0.0]], np.float32)
    head = {
        "inputs": [
            {"name": "points", "shape": [3, 2], "datatype": "FP32", "parameters": {"binary_data_size": points.nbytes}}
        ],
        "outputs": [{"name": "log_density", "parameters": {"binary_data": True}}, {"name": "nfe"}],
        "parameters": {"tol": 1e-4},
    }
    encoded = json.dumps(head).encode()
    status, headers, body = request(
        server.http_url,
        "POST",
        f"/v2/models/{DENSITY}/infer",
        encoded + points.tobytes(),
        {"Inference-Header-Content-Length": str(len(encoded)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200, body[:500]
    length = int(headers["Inference-Header-Content-Length"])
    document = json.loads(body[:length])
    (density,) = [o for o in document["outputs"] if o["name"] == "log_density"]
    (nfe,) = [o for o in document["outputs"] if o["name"] == "nfe"]
    assert density["parameters"]["binary_data_size"] == 12 and "data" not in density and len(nfe["data"]) == 3
    binary = np.frombuffer(body[length:], "<f4")
    as_json = {"name": "points", "shape": [3, 2], "datatype": "FP32", "data": points.tolist()}
    status, document = infer_json(server.http_url, DENSITY, {"inputs": [as_json], "parameters": {"tol": 1e-4}})
    assert status == 200
    np.testing.assert_array_equal(np.asarray(outputs_of(document)["log_density"], np.float32), binary)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "the request is not valid JSON"),
        (b"[1, 2]", 400, "the request must be a JSON object with 'inputs'"),
        ({"inputs": {}}, 400, "inputs must be a JSON array of tensors"),
        (
            {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [1, 2]}]},
            400,
            "inputs[0].data has 2 values, but shape [1, 28, 28] needs 784",
        ),
        (
            {"inputs": [{"name": "images", "shape": [1, 2], "datatype": "UINT8", "data": [1, 300]}]},
            400,
            "inputs[0].data[1] is 300, not an integer in 0 .. 255",
        ),
        (
            {"inputs": [{"name": "images", "shape": [2], "datatype": "UINT8", "data": ["a", "b"]}]},
            400,
            "inputs[0].data must hold numbers only",
        ),
        (
            {"inputs": [{"name": "images", "shape": "28x28", "datatype": "UINT8", "data": []}]},
            400,
            "inputs[0].shape must be a JSON array of integers",
        ),
        (
            {
                "inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
                "parameters": {"tol": [1]},
            },
            400,
            "parameters.tol must be a boolean, number or string",
        ),
    ],
)
def test_malformed_requests_get_a_400_naming_the_field(server, body, status, message):
    answer = request(server.http_url, "POST", f"/v2/models/{CLASSIFIER}/infer", body)
    assert answer[0] == status and json.loads(answer[2])["error"].startswith(message), answer[2]


def test_refusals_carry_the_grpc_ports_messages_and_http_statuses(server, digits):
    images = digits[0][:2]
    status, document = infer_json(server.http_url, CLASSIFIER, images_document(images, tol=-1))
    assert status == 400 and document["error"].startswith("parameters.tol must be > 0")
    message = oip.ModelInferRequest(model_name=CLASSIFIER)
    message.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    message.raw_input_contents.append(images.tobytes())
    message.parameters["tol"].double_param = -1
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as raised:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=60)
    assert raised.value.details() == document["error"]
    status, document = infer_json(server.http_url, "no-such-model", images_document(images))
    assert status == 404 and "no-such-model" in document["error"]
    status, document = infer_json(server.http_url, CLASSIFIER, images_document(images, tol=1e-2, priority=1))
    assert status == 403 and "priority" in document["error"]
    status, _, body = request(server.http_url, "GET", "/v3/anything")
    assert status == 404 and "/v3/anything" in json.loads(body)["error"]
    status, _, body = request(server.http_url, "DELETE", f"/v2/models/{CLASSIFIER}")
    assert status == 405 and json.loads(body)["error"].startswith("DELETE")
    assert metric(server.metrics_url, "odeserve_requests_total", rpc="ModelInfer", code="INVALID_ARGUMENT") >= 1
    assert metric(server.metrics_url, "odeserve_requests_total", rpc="unknown", code="UNIMPLEMENTED") >= 2


@pytest.fixture(scope="module")
def guarded(density_only, tmp_path_factory):
    """A server with a small HTTP connection cap and short timeouts."""
    running = start_server(
        density_only,
        tmp_path_factory.mktemp("rest-guarded"),
        *("--http-max-connections", "4", "--request-read-timeout-s", "1", "--http-idle-timeout-s", "2"),
        *("--max-message-bytes", "65536", "--tokens", "rest-secret"),
    )
    yield running
    assert running.stop() == 0


def _connect(base: str) -> socket.socket:
    address = urlsplit(base)
    return socket.create_connection((address.hostname, address.port), timeout=10)


def _closed_by_server(connection: socket.socket, within: float) -> bool:
    connection.settimeout(within)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


AUTH = {"Authorization": "Bearer rest-secret"}


def _points(n: int = 2) -> dict:
    return {"inputs": [{"name": "points", "shape": [n, 2], "datatype": "FP32", "data": [0.0] * (2 * n)}]}


def test_tokens_guard_inference_but_not_the_health_probes(guarded):
    base = guarded.http_url
    assert request(base, "GET", "/v2/health/ready")[0] == 200
    status, document = infer_json(base, DENSITY, _points())
    assert status == 401 and document["error"] == "missing 'authorization: Bearer <token>' header"
    status, document = infer_json(base, DENSITY, _points(), {"Authorization": "Bearer wrong"})
    assert status == 401 and document["error"] == "the bearer token is not accepted"
    status, document = infer_json(base, DENSITY, _points(), AUTH)
    assert status == 200 and outputs_of(document)["status"].tolist() == [1, 1]


def test_a_body_over_the_message_limit_is_refused_unread(guarded):
    status, _, body = request(guarded.http_url, "POST", f"/v2/models/{DENSITY}/infer", b"x" * 70_000, AUTH)
    assert status == 413 and "max_message_bytes of 65536" in json.loads(body)["error"]
    huge = _points(10_000)  # JSON longer than 64 KiB, sent in chunks (no Content-Length to refuse it by)
    chunks = iter([json.dumps(huge).encode()])
    status, _, body = request(guarded.http_url, "POST", f"/v2/models/{DENSITY}/infer", chunks, AUTH)  # type: ignore[arg-type]
    assert status == 429 and "max_message_bytes" in json.loads(body)["error"]


def test_slow_senders_and_idle_connections_are_dropped_and_others_still_served(guarded):
    base = guarded.http_url
    slow_head = _connect(base)
    slow_head.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    slow_body = _connect(base)
    slow_body.sendall(
        b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer rest-secret\r\n"
        b"Content-Length: 1000\r\n\r\n{" % DENSITY.encode()
    )
    began = time.monotonic()
    assert _closed_by_server(slow_head, within=5), "a head sent slower than request_read_timeout_s kept its connection"
    assert time.monotonic() - began < 1.8  # request_read_timeout_s (1 s), not the idle timeout (2 s)
    answer = slow_body.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
    status, _, _ = request(base, "GET", "/v2/health/live")
    assert status == 200


def test_the_connection_cap_drops_the_longest_idle_connection_not_new_clients(guarded):
    base = guarded.http_url
    idle = [_connect(base) for _ in range(4)]
    for connection in idle:  # answered, so the server holds each as idle (kept alive), oldest first
        connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
    status, document = infer_json(base, DENSITY, _points(), AUTH)
    assert status == 200
    assert _closed_by_server(idle[0], within=2)
    for connection in idle:
        connection.close()


def test_the_stock_tritonclient_http_classifies_real_mnist(tritonclient_venv, server, mnist_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run(
        [
            str(tritonclient_venv / "bin" / "python"),
            "-I",
            str(HERE / "oip_tritonclient_http.py"),
            urlsplit(server.http_url).netloc,
            str(mnist_dir / "MNIST" / "raw"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["live"] and report["ready"] and report["model_ready"] and not report["unknown_model_ready"]
    assert report["server"]["name"] == "odeserve" and set(report["repository"]) == {CLASSIFIER, *DENSITIES}
    assert [i["name"] for i in report["metadata"]["inputs"]] == ["images"]
    for tol in ("0.1", "0.0001"):
        binary, as_json = report[f"{tol} binary"], report[f"{tol} json"]
        assert binary["accuracy"] >= 0.95 and binary["status"] == [1] and binary["rtol"] == float(tol)
        assert binary["probabilities"] == as_json["probabilities"] and binary["nfe"] == as_json["nfe"]
    assert report["0.1 binary"]["nfe"] < report["0.0001 binary"]["nfe"]
    assert report["negative_tol"]["status"] == "400"
    assert report["negative_tol"]["message"].startswith("parameters.tol must be > 0")
