"""The gRPC servicer: translates requests to engine work and results or errors back to the
wire. Every failure leaves as a precise status code with a message naming the field."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import numpy as np

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

from . import wire
from .config import ServerConfig
from .engine import (
    BudgetExhausted,
    Engine,
    EngineClosed,
    QueueFull,
    RequestCancelled,
    RequestExpired,
    Result,
    WorkerFailed,
    WorkerRetired,
)
from .models import ServedModel
from .stats import RequestStats, StatsSink

log = logging.getLogger("server.servicer")


_SUBMIT_ATTEMPTS = 3
_NO_DEADLINE = 10 * 365 * 24 * 3600.0  # seconds; gRPC reports "no deadline" as a far-off one


class Draining(Exception):
    """The server is shutting down: new requests go elsewhere."""


_ERRORS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (wire.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (wire.NotFound, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BudgetExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkerFailed, grpc.StatusCode.INTERNAL),
    (EngineClosed, grpc.StatusCode.UNAVAILABLE),
    (RequestExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (FutureTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
]


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, models: dict[str, ServedModel], engine: Engine, config: ServerConfig, stats: StatsSink) -> None:
        self.models, self.engine, self.config, self.stats = models, engine, config, stats
        self.draining = threading.Event()

    # ---- compute RPCs -------------------------------------------------------------------
    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        return self._compute("Classify", "classify", request, context, wire.classify_work, _classify_response)

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> pb.SampleResponse:
        return self._compute("Sample", "density", request, context, wire.sample_work, _sample_response)

    def LogDensity(self, request: pb.LogDensityRequest, context: grpc.ServicerContext) -> pb.LogDensityResponse:
        return self._compute("LogDensity", "density", request, context, wire.log_density_work, _log_density_response)

    # ---- model cards ----------------------------------------------------------------------
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[wire.model_info(m) for m in self.models.values()])

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        model = self.models.get(request.name)
        if model is None or (request.version and request.version != model.version):
            what = repr(request.name) + (f" version {request.version!r}" if request.version else "")
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {what} is not served (see ListModels)")
        return wire.model_info(model)

    # ---- the one path every compute request takes ------------------------------------------
    def _compute(
        self,
        rpc: str,
        task: str,
        request,
        context: grpc.ServicerContext,
        to_work: Callable,
        to_response: Callable[[Result, ServedModel, str], object],
    ):
        begin = time.perf_counter()
        model_label, method_label = "unknown", "none"
        result: Result | None = None
        scheduling = None
        code, message = grpc.StatusCode.OK, ""
        try:
            if self.draining.is_set():
                raise Draining("the server is shutting down; retry on another replica")
            for attempt in range(_SUBMIT_ATTEMPTS):
                model = wire.find_model(self.models, request.model, request.version, task, rpc)
                model_label = model.name
                works = to_work(request, model, self.config)
                method_label = works[0].method
                remaining = context.time_remaining()
                if remaining is not None and remaining > _NO_DEADLINE:  # gRPC's stand-in for "no deadline"
                    remaining = None
                if remaining is not None and remaining <= 0:
                    raise RequestExpired()
                scheduling = wire.scheduling_settings(request.accuracy, request.scheduling, remaining, self.config)
                try:
                    engine_request, future = self.engine.submit(model.key, works, timeout=remaining, scheduling=scheduling)
                    break
                except WorkerRetired:  # reloaded between lookup and submit: the new version takes it
                    if attempt == _SUBMIT_ATTEMPTS - 1 or self.draining.is_set():
                        raise
            if not context.add_callback(lambda: self.engine.cancel(model.key, engine_request)):
                self.engine.cancel(model.key, engine_request)
            try:
                result = future.result(timeout=remaining)
            except FutureTimeout:
                self.engine.cancel(model.key, engine_request)
                raise
            response = to_response(result, model, method_label)
        except Exception as error:  # noqa: BLE001 - mapped to a status below, never swallowed
            code, message = _status_for(error)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s on %s failed", rpc, model_label)
        finally:
            self.stats(
                RequestStats(
                    model=model_label,
                    method=method_label,
                    rpc=rpc,
                    code=code.name,
                    latency_seconds=time.perf_counter() - begin,
                    queue_seconds=None if result is None else result.queue_seconds,
                    compute_seconds=None if result is None else result.compute_seconds,
                    expected_nfe=None if result is None else _expected_nfe(model, works[0].method, result.rtol, len(works)),
                    priority=None if scheduling is None else scheduling.priority,
                    auto_tol=result.rtol if result is not None and scheduling.auto else None,
                )
            )
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)
        return response


def _expected_nfe(model: ServedModel, method: str, tol: float, items: int) -> float | None:
    """The card's NFE for a request's items, which share one method and tolerance."""
    per_item = model.expected_nfe(method, tol)
    return None if per_item is None else per_item * items


def _status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in _ERRORS:
        if isinstance(error, kind):
            text = str(error)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED and not text:
                text = "the request's deadline passed before it finished; its items were stopped"
            if code is grpc.StatusCode.CANCELLED and not text:
                text = "the request was cancelled; its items were stopped"
            return code, text
    return grpc.StatusCode.INTERNAL, "internal error; the server logged the details"


def _timing(result: Result) -> pb.Timing:
    return pb.Timing(queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds)


def _classify_response(result: Result, model: ServedModel, method: str) -> pb.ClassifyResponse:
    probabilities = result.outputs["probabilities"].astype(np.float32)
    labels = np.where(np.isnan(probabilities).any(1), -1, probabilities.argmax(1))
    return pb.ClassifyResponse(
        labels=labels.tolist(),
        probabilities=wire.encode_tensor(probabilities),
        items=wire.item_stats(result.nfe, result.statuses),
        timing=_timing(result),
        model_version=model.version,
        solved=wire.solved(result.rtol, result.atol, method, result.preemptions),
    )


def _sample_response(result: Result, model: ServedModel, method: str) -> pb.SampleResponse:
    return pb.SampleResponse(
        points=wire.encode_tensor(result.outputs["points"].astype(np.float32)),
        log_density=wire.encode_tensor(result.outputs["log_density"].astype(np.float32)),
        items=wire.item_stats(result.nfe, result.statuses),
        timing=_timing(result),
        model_version=model.version,
        solved=wire.solved(result.rtol, result.atol, method, result.preemptions),
    )


def _log_density_response(result: Result, model: ServedModel, method: str) -> pb.LogDensityResponse:
    return pb.LogDensityResponse(
        log_density=wire.encode_tensor(result.outputs["log_density"].astype(np.float32)),
        items=wire.item_stats(result.nfe, result.statuses),
        timing=_timing(result),
        model_version=model.version,
        solved=wire.solved(result.rtol, result.atol, method, result.preemptions),
    )
