"""Run by tests/server/test_rest.py in a venv of its own with the stock ``tritonclient[http]``
(no odeserve code): classify real MNIST through the Open Inference Protocol's REST API, with
binary tensors (the client's default) and with JSON ones, and report as JSON. Arguments: the
server's HTTP address (host:port), the MNIST raw folder."""

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

target, raw = sys.argv[1], Path(sys.argv[2])
images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)[:64]
labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)[:64]
client = triton.InferenceServerClient(target)
report = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("odenet-mnist"),
    "unknown_model_ready": client.is_model_ready("no-such-model"),
    "server": client.get_server_metadata(),
    "repository": [m["name"] for m in client.get_model_repository_index()],
    "metadata": client.get_model_metadata("odenet-mnist"),
}
for tol in (1e-1, 1e-4):
    for binary in (True, False):
        tensor = triton.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("labels", "probabilities", "nfe")]
        outputs.append(triton.InferRequestedOutput("status", binary_data=binary))
        result = client.infer(
            "odenet-mnist", [tensor], outputs=outputs, parameters={"tol": tol}, priority=3, timeout=60_000_000
        )
        report[f"{tol} {'binary' if binary else 'json'}"] = {
            "accuracy": float((result.as_numpy("labels") == labels).mean()),
            "probabilities": result.as_numpy("probabilities").tolist(),
            "nfe": float(result.as_numpy("nfe").mean()),
            "status": sorted(set(result.as_numpy("status").tolist())),
            "rtol": result.get_response()["parameters"]["rtol"],
        }
tensor = triton.InferInput("images", list(images[:2].shape), "UINT8")
tensor.set_data_from_numpy(images[:2])
try:
    client.infer("odenet-mnist", [tensor], parameters={"tol": -1.0})
    report["negative_tol"] = "accepted"
except InferenceServerException as error:
    report["negative_tol"] = {"status": error.status(), "message": error.message()}
print(json.dumps(report))
