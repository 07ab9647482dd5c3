"""JSON or binary tensors over REST, beside gRPC: is the binary data extension worth having?

A real server on the shipped checkpoints; real MNIST test digits classified at tol 1e-1 (the
cheapest solve, so the transport shows) as 1, 64 and 1,024 images per request, through the
REST API with JSON tensors, with binary tensors (Triton's extension: what ``tritonclient.http``
sends by default), and through the Open Inference Protocol over gRPC. Runs are interleaved;
medians of client-side latency and the request and response bodies' sizes are reported, with
each transport's latency as a ratio of gRPC's measured in the same run.

    python bench/rest_payloads.py --data-dir ../shared/data [--repeats 15]

Writes ``bench/results/rest_payloads_cpu.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers
sys.path.insert(0, str(ROOT))

from live_server import CLASSIFIER, SHIPPED, end_on_sigterm, start_server  # noqa: E402

from neuralode.devices import cpu_description  # noqa: E402
from server.oip import grpc_predict_v2_pb2 as oip  # noqa: E402
from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc  # noqa: E402

TOL = 1e-1


def _json_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "UINT8", "data": images.ravel().tolist()}
    return json.dumps({"inputs": [tensor], "parameters": {"tol": TOL}}).encode(), {}


def _binary_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    tensor = {
        "name": "images",
        "shape": list(images.shape),
        "datatype": "UINT8",
        "parameters": {"binary_data_size": images.nbytes},
    }
    head = json.dumps({"inputs": [tensor], "parameters": {"tol": TOL, "binary_data_output": True}}).encode()
    return head + images.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def _rest(connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> tuple[float, int]:
    begin = time.perf_counter()
    connection.request("POST", f"/v2/models/{CLASSIFIER}/infer", body=body, headers=headers)
    response = connection.getresponse()
    answer = response.read()
    seconds = time.perf_counter() - begin
    assert response.status == 200, answer[:300]
    return seconds, len(answer)


def _grpc(stub: oip_grpc.GRPCInferenceServiceStub, images: np.ndarray) -> tuple[float, int, int]:
    message = oip.ModelInferRequest(model_name=CLASSIFIER)
    message.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    message.raw_input_contents.append(images.tobytes())
    message.parameters["tol"].double_param = TOL
    begin = time.perf_counter()
    response = stub.ModelInfer(message, timeout=120)
    return time.perf_counter() - begin, message.ByteSize(), response.ByteSize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rest_payloads_cpu.json")
    args = parser.parse_args()
    end_on_sigterm()
    raw = args.data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    digits = np.fromfile(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(SHIPPED, Path(tmp))
        try:
            address = urlsplit(server.http_url)
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
            channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)])
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            rows = {}
            for size in args.sizes:
                images = np.ascontiguousarray(digits[:size])
                bodies = {"rest_json": _json_body(images), "rest_binary": _binary_body(images)}
                times: dict[str, list[float]] = {"rest_json": [], "rest_binary": [], "grpc": []}
                sizes: dict[str, tuple[int, int]] = {}
                for repeat in range(args.repeats + 1):  # the first round warms up, unrecorded
                    for name, (body, headers) in bodies.items():
                        seconds, answer = _rest(connection, body, headers)
                        sizes[name] = (len(body), answer)
                        if repeat:
                            times[name].append(seconds)
                    seconds, request_bytes, answer = _grpc(stub, images)
                    sizes["grpc"] = (request_bytes, answer)
                    if repeat:
                        times["grpc"].append(seconds)
                medians = {name: statistics.median(values) for name, values in times.items()}
                rows[str(size)] = {
                    name: {
                        "median_ms": round(1000 * medians[name], 2),
                        "vs_grpc": round(medians[name] / medians["grpc"], 2),
                        "request_bytes": sizes[name][0],
                        "response_bytes": sizes[name][1],
                    }
                    for name in times
                }
                print(
                    f"{size:>5} images: "
                    + "  ".join(
                        f"{name} {row['median_ms']:.1f} ms ({row['vs_grpc']:.2f}x gRPC, {row['request_bytes']} B in)"
                        for name, row in rows[str(size)].items()
                    )
                )
            channel.close()
            connection.close()
        finally:
            server.stop()
    document = {
        "benchmark": "rest_payloads",
        "machine": cpu_description(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/rest_payloads.py " + " ".join(sys.argv[1:]),
        "settings": {"tol": TOL, "repeats": args.repeats, "sizes": args.sizes, "model": CLASSIFIER},
        "images_per_request": rows,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
