"""Run by tests/server/test_open_inference.py in a venv of its own with the stock
``tritonclient[grpc]`` (no odeserve code): classify real MNIST through the Open Inference
Protocol at two tolerances and report as JSON. Arguments: server address, MNIST raw folder."""

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

target, raw = sys.argv[1], Path(sys.argv[2])
images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)[:64]
labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)[:64]
client = triton.InferenceServerClient(target)
report = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("odenet-mnist"),
    "server": client.get_server_metadata(as_json=True),
    "repository": [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]],
    "metadata": client.get_model_metadata("odenet-mnist", as_json=True),
}
for tol in (1e-1, 1e-4):
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer("odenet-mnist", [tensor], parameters={"tol": tol}, priority=3, timeout=60_000_000)
    report[str(tol)] = {
        "accuracy": float((result.as_numpy("labels") == labels).mean()),
        "probabilities_shape": list(result.as_numpy("probabilities").shape),
        "nfe": float(result.as_numpy("nfe").mean()),
        "status": sorted(set(result.as_numpy("status").tolist())),
        "rtol": result.get_response(as_json=True)["parameters"]["rtol"]["double_param"],
    }
tensor = triton.InferInput("images", list(images[:2].shape), "UINT8")
tensor.set_data_from_numpy(images[:2])
try:
    client.infer("odenet-mnist", [tensor], parameters={"tol": -1.0})
    report["negative_tol"] = "accepted"
except InferenceServerException as error:
    report["negative_tol"] = {"status": error.status(), "message": error.message()}
print(json.dumps(report))
