"""A new model kind for an existing task is its model and one registration: this module defines
a tiny ODE classifier, registers it as a kind, saves a checkpoint, and a real server on
127.0.0.1 loads it and answers Classify (odeserve.v1, through the SDK) and Open Inference's
ModelInfer with what the model computes in process. Nothing in server/ or training/ names it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from live_server import start_server
from torch import Tensor, nn

from neuralode.checkpoint import save_checkpoint
from neuralode.models import CLASSIFY, ModelSpec, Signature, Start, TensorSpec, register, unregister
from neuralode.solvers import rms_norm, solve_ivp

KIND = "tiny-ode"


class TinyODEClassifier(nn.Module):
    """Images → a linear encoder to ``width`` → dz/dt = tanh(W [z, t]) over [0, 1] → a linear
    head; only the servable-model protocol (neuralode.models.servable), no forward needed."""

    def __init__(self, width: int = 8, first_step: float | None = None) -> None:
        super().__init__()
        self.encoder, self.f, self.head = nn.Linear(784, width), nn.Linear(width + 1, width), nn.Linear(width, 10)
        self.width, self.first_step = width, first_step

    def signatures(self) -> tuple[Signature, ...]:
        return (
            Signature(
                "classify",
                (TensorSpec("images", ("uint8", "float32"), (-1, 28, 28), "MNIST digits"),),
                (
                    TensorSpec("probabilities", ("float32",), (-1, 10), "class probabilities"),
                    TensorSpec("labels", ("int32",), (-1,), "the most probable class"),
                ),
            ),
        )

    def initial_rows(self, operation: str, inputs: Mapping[str, Any], generator: torch.Generator) -> Tensor:
        return inputs["images"].flatten(1)

    def encode(self, operation: str, rows: Tensor) -> Start:
        t0 = torch.zeros(len(rows), dtype=rows.dtype, device=rows.device)
        return Start(self.encoder(rows), t0, t0 + 1.0)

    def ode_dynamics(self, t: Tensor, y: Tensor) -> Tensor:
        return torch.tanh(self.f(torch.cat([y, t.to(y.dtype).reshape(-1, 1).expand(len(y), 1)], 1)))

    def decode(self, operation: str, y1: Tensor) -> dict[str, Tensor]:
        return {"probabilities": torch.softmax(self.head(y1), 1)}

    error_norm = staticmethod(rms_norm)

    def state_size(self, operation: str) -> int:
        return self.width

    def encode_bytes(self, operation: str) -> int:
        return 0


def register_kind() -> None:
    register(
        ModelSpec(
            KIND,
            CLASSIFY,
            TinyODEClassifier,
            has_ode=True,
            adjoint=True,
            hyper={"width": 8},
            description="a tiny ODE classifier (tests)",
        )
    )


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    register_kind()  # for save_checkpoint's card here; the server process registers it itself
    try:
        folder = tmp_path_factory.mktemp("tiny-kind")
        torch.manual_seed(0)
        model = TinyODEClassifier().eval()
        save_checkpoint(folder / "tiny.pt", model, {"kind": KIND, "hyper": {"width": 8}, "training": {"tol": 1e-3}})
        code = "import sys, test_model_kind; test_model_kind.register_kind(); from server.app import main; sys.exit(main())"
        path = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
        running = start_server(
            folder, tmp_path_factory.mktemp("tiny-server"), python=("-c", code), env={"PYTHONPATH": path}
        )
        yield running, model
        assert running.stop() == 0
    finally:
        unregister(KIND)


def test_a_kind_defined_and_registered_here_is_served_over_grpc(tiny_server, mnist_test_digits):
    from client import Client
    from server.oip import grpc_predict_v2_pb2 as oip
    from server.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    running, model = tiny_server
    assert running.target.startswith("127.0.0.1:")
    digits = mnist_test_digits[0][:12]
    pixels = torch.from_numpy(digits.astype(np.float32) / 255)
    with torch.no_grad():
        start = model.encode("classify", model.initial_rows("classify", {"images": pixels}, torch.Generator()))
        solution = solve_ivp(model.ode_dynamics, start.y0, (0.0, 1.0), method="dopri5", rtol=1e-3, atol=1e-3)
        expected = model.decode("classify", solution.y1)["probabilities"].numpy()

    with Client(running.target, timeout_s=60) as client:
        assert [m.name for m in client.models()] == ["tiny"]
        result = client.classify(digits, model="tiny", tol=1e-3)
    np.testing.assert_allclose(result.probabilities, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.labels, expected.argmax(1))
    assert list(result.items.nfe) == solution.nfe.tolist()

    request = oip.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="UINT8", shape=digits.shape)
    request.raw_input_contents.append(digits.tobytes())
    request.parameters["tol"].double_param = 1e-3
    with grpc.insecure_channel(running.target) as channel:
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    outputs = {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents)}
    np.testing.assert_array_equal(np.frombuffer(outputs["labels"], "<i4"), expected.argmax(1))
    np.testing.assert_allclose(np.frombuffer(outputs["probabilities"], "<f4").reshape(12, 10), expected, atol=1e-5)
