"""The ``odeserve.v1.Inference`` protocol: a thin translator between its messages and the
protocol-neutral :mod:`server.api`. One spec per RPC says which kind of work it asks for, how
its inputs decode and how its outputs encode; everything else happens once, in the service."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import Message

from odeserve.v1 import odeserve_pb2 as pb

from . import wire
from .api import NO_MODEL, Accuracy, InferenceRequest, InferenceResult, Kind, Scheduling, TensorSpec
from .frontend import Rpc
from .models import ServedModel
from .service import Call, InferenceService
from .validation import SERVED_METHODS

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
TENSOR_ENCODING = (
    "Tensor.data holds prod(shape) elements, row-major, little-endian, of the type Tensor.dtype names "
    "(uint8, float32, float64); in JSON, data is base64"
)


@dataclass(frozen=True)
class Compute:
    """A compute RPC: the kind of work it asks a model for, its inputs from the request and
    its response fields from the outputs."""

    name: str
    request: type[Message]
    response: type[Message]
    kind: Kind
    inputs: Callable[[Message], dict[str, np.ndarray]]
    outputs: Callable[[dict[str, np.ndarray]], dict]


COMPUTE = (
    Compute(
        "Classify",
        pb.ClassifyRequest,
        pb.ClassifyResponse,
        Kind.CLASSIFY,
        inputs=lambda m: {"images": wire.decode_tensor(m.images, "images")},
        outputs=lambda o: {"labels": o["labels"].tolist(), "probabilities": wire.encode_tensor(o["probabilities"])},
    ),
    Compute(
        "Sample",
        pb.SampleRequest,
        pb.SampleResponse,
        Kind.SAMPLE,
        inputs=lambda m: {"n": np.asarray(m.n, np.uint32), "seed": np.asarray(m.seed, np.uint64)},
        outputs=lambda o: {
            "points": wire.encode_tensor(o["points"]),
            "log_density": wire.encode_tensor(o["log_density"]),
        },
    ),
    Compute(
        "LogDensity",
        pb.LogDensityRequest,
        pb.LogDensityResponse,
        Kind.LOG_DENSITY,
        inputs=lambda m: {"points": wire.decode_tensor(m.points, "points")},
        outputs=lambda o: {"log_density": wire.encode_tensor(o["log_density"])},
    ),
)
RPC_OF_KIND = {spec.kind: spec.name for spec in COMPUTE}


def _accuracy(message: pb.Accuracy) -> Accuracy:
    return Accuracy(
        tol=message.tol,
        rtol=message.rtol,
        atol=message.atol,
        method=message.method,
        max_nfe=message.max_nfe,
        auto_tol=message.auto_tol,
        latency_target_seconds=message.latency_target_seconds,
        precision=message.precision,
    )


def _scheduling(message: pb.Scheduling) -> Scheduling:
    return Scheduling(priority=message.priority, max_total_nfe=message.max_total_nfe)


def _tensor_info(spec: TensorSpec) -> pb.TensorInfo:
    return pb.TensorInfo(name=spec.name, dtypes=spec.dtypes, shape=spec.shape, description=spec.description)


class V1:
    """The RPCs of ``odeserve.v1.Inference`` over an :class:`InferenceService`."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def rpcs(self) -> list[Rpc]:
        compute = [Rpc(SERVICE, spec.name, spec.request, self._compute(spec)) for spec in COMPUTE]
        return [
            *compute,
            Rpc(SERVICE, "ListModels", pb.ListModelsRequest, self.list_models),
            Rpc(SERVICE, "GetModel", pb.GetModelRequest, self.get_model),
        ]

    def _compute(self, spec: Compute):
        async def handle(message: Message, call: Call) -> Message:
            request = InferenceRequest(
                spec.kind,
                message.model,
                message.version,
                lambda: spec.inputs(message),
                _accuracy(message.accuracy),
                _scheduling(message.scheduling),
            )
            result = await self.service.infer(request, call)
            return spec.response(**spec.outputs(result.outputs), **_common(result))

        return handle

    async def list_models(self, message: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        call.record.model = NO_MODEL
        return pb.ListModelsResponse(models=[self.model_info(m) for m in self.service.models.values()])

    async def get_model(self, message: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        model = self.service.model(message.name, message.version)
        call.record.model = model.name
        return self.model_info(model)

    def model_info(self, model: ServedModel) -> pb.ModelInfo:
        config = self.service.config
        signatures = [
            pb.RpcSignature(
                rpc=RPC_OF_KIND[kind], inputs=map(_tensor_info, sig.inputs), outputs=map(_tensor_info, sig.outputs)
            )
            for kind, sig in model.adapter.signatures.items()
        ]
        limits = pb.Limits(
            min_tol=config.min_tol,
            max_tol=config.max_tol,
            max_items_per_request=config.max_items_per_request,
            max_nfe=config.max_nfe,
            max_request_nfe=config.max_request_nfe,
            priority_levels=config.priority_levels,
            default_priority=config.default_priority,
            methods=SERVED_METHODS,
        )
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            kind=model.kind,
            task=model.task.value,
            card_json=json.dumps(model.card.to_dict(), sort_keys=True),
            default_tol=model.default_tol,
            device=model.device,
            signatures=signatures,
            limits=limits,
            tensor_encoding=TENSOR_ENCODING,
        )


def _common(result: InferenceResult) -> dict:
    solved = result.solved
    return {
        "items": pb.ItemStats(nfe=result.nfe.tolist(), status=result.status.tolist()),
        "timing": pb.Timing(queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds),
        "model_version": result.model_version,
        "solved": pb.Solved(
            rtol=solved.rtol,
            atol=solved.atol,
            method=solved.method,
            preemptions=solved.preemptions,
            precision=solved.precision,
        ),
    }
