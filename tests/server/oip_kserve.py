"""Run by tests/server/test_open_inference.py in a venv of its own with the stock ``kserve``
SDK (no odeserve code): classify real MNIST through its gRPC client at two tolerances and
report as JSON. Arguments: server address, MNIST raw folder."""

import asyncio
import json
import sys
from pathlib import Path

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

target, raw = sys.argv[1], Path(sys.argv[2])
images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)[:64]
labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)[:64]


def request(batch: np.ndarray, tol: float) -> InferRequest:
    tensor = InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=True)
    # The SDK sends str, bool and int parameters only: the tolerance travels as a string.
    return InferRequest(model_name="odenet-mnist", infer_inputs=[tensor], parameters={"tol": str(tol)})


async def main() -> dict:
    client = InferenceGRPCClient(target, retries=0)
    report = {"live": await client.is_server_live(), "model_ready": await client.is_model_ready("odenet-mnist")}
    for tol in (1e-1, 1e-4):
        response = await client.infer(request(images, tol))
        outputs = {output.name: output.as_numpy() for output in response.outputs}
        report[str(tol)] = {
            "accuracy": float((outputs["labels"] == labels).mean()),
            "nfe": float(outputs["nfe"].mean()),
            "status": sorted(set(outputs["status"].tolist())),
        }
    try:
        await client.infer(request(images[:2], -1.0))
        report["negative_tol"] = "accepted"
    except grpc.aio.AioRpcError as error:
        report["negative_tol"] = {"status": error.code().name, "message": error.details()}
    await client.close()
    return report


print(json.dumps(asyncio.run(main())))
