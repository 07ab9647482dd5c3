"""The Open Inference Protocol (KServe v2, ``inference.GRPCInferenceService``): a second thin
translator onto the same protocol-neutral request as ``odeserve.v1``, so validation, limits,
scheduling, auth and metrics are the same code, and errors the same codes and messages.

A model's inputs and outputs are those of its kinds' signatures, plus per-item ``nfe`` and
``status`` outputs. A density model samples when given ``n`` (and optionally ``seed``) and
evaluates log-densities when given ``points``."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast, overload

import numpy as np

from server.oip import grpc_predict_v2_pb2 as oip

from .api import NO_MODEL, Accuracy, Code, InferenceRequest, Kind, RequestError, Scheduling, Signature, invalid, quoted
from .frontend import Rpc
from .models import ServedModel
from .service import Call, InferenceService
from .wire import check_shape

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("model_repository", "parameters")
MAX_ID = 256  # characters of a request id echoed back
# A bound on the bytes a response holds beyond its outputs' raw contents: the model's name and
# version, the id, the solved parameters (fixed), and per output its name, datatype, shape (at
# most MAX_DIMENSIONS dimensions) and the tags and lengths around them.
_RESPONSE_BYTES, _OUTPUT_BYTES = 512, 160

# Datatype names of the protocol, their little-endian numpy types and the typed-contents field.
DATATYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "BOOL": (np.dtype("?"), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
NAME_OF = {str(dtype): name for name, (dtype, _) in DATATYPES.items()}
COUNT_INPUTS = ("n", "seed")  # Sample's scalars: any integer datatype, shape [] or [1]
PER_ITEM = (
    ("nfe", "UINT32", "function evaluations of each item"),
    (
        "status",
        "INT32",
        "how each item's solve ended: 1 SUCCESS, 2 MAX_STEPS, 3 MAX_NFE, 4 STEP_SIZE_UNDERFLOW, 5 NON_FINITE",
    ),
)


SPEC_DATATYPES = {
    "uint8": "UINT8",
    "int32": "INT32",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "float32": "FP32",
    "float64": "FP64",
}


class OpenInference:
    """The RPCs of ``inference.GRPCInferenceService`` over an :class:`InferenceService`."""

    def __init__(self, service: InferenceService, version: str) -> None:
        self.service, self.version = service, version

    def rpcs(self) -> list[Rpc]:
        open_probes: list[tuple[str, type, Callable[[Any, Call], Awaitable[Any]]]] = [
            ("ServerLive", oip.ServerLiveRequest, self.server_live),
            ("ServerReady", oip.ServerReadyRequest, self.server_ready),
        ]
        calls = [
            ("ModelReady", oip.ModelReadyRequest, self.model_ready),
            ("ServerMetadata", oip.ServerMetadataRequest, self.server_metadata),
            ("ModelMetadata", oip.ModelMetadataRequest, self.model_metadata),
            ("ModelInfer", oip.ModelInferRequest, self.model_infer),
            ("RepositoryIndex", oip.RepositoryIndexRequest, self.repository_index),
        ]
        return [
            *(Rpc(SERVICE, name, request, handle, protected=False) for name, request, handle in open_probes),
            *(Rpc(SERVICE, name, request, handle) for name, request, handle in calls),
        ]

    # ---- server and models ------------------------------------------------------------------
    async def server_live(self, message: oip.ServerLiveRequest, call: Call) -> oip.ServerLiveResponse:
        call.record.model = NO_MODEL
        return oip.ServerLiveResponse(live=True)

    async def server_ready(self, message: oip.ServerReadyRequest, call: Call) -> oip.ServerReadyResponse:
        call.record.model = NO_MODEL
        return oip.ServerReadyResponse(ready=not self.service.draining and bool(self.service.models))

    async def model_ready(self, message: oip.ModelReadyRequest, call: Call) -> oip.ModelReadyResponse:
        model = self.service.models.get(message.name)
        ready = model is not None and message.version in ("", model.version) and not self.service.draining
        return oip.ModelReadyResponse(ready=ready)

    async def server_metadata(self, message: oip.ServerMetadataRequest, call: Call) -> oip.ServerMetadataResponse:
        call.record.model = NO_MODEL
        return oip.ServerMetadataResponse(name="odeserve", version=self.version, extensions=EXTENSIONS)

    async def model_metadata(self, message: oip.ModelMetadataRequest, call: Call) -> oip.ModelMetadataResponse:
        model = self.service.model(message.name, message.version)
        call.record.model = model.name
        inputs, outputs = _tensors(model)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        properties = {"task": model.task.value, "default_tol": repr(model.default_tol), "kind": model.kind}
        if len(model.adapter.signatures) > 1:  # which inputs ask for which kind
            properties.update(
                (kind.value, _described(signature)) for kind, signature in model.adapter.signatures.items()
            )
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform="odeserve_neural_ode",
            inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in inputs],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in outputs],
            properties=properties,
        )

    async def repository_index(self, message: oip.RepositoryIndexRequest, call: Call) -> oip.RepositoryIndexResponse:
        call.record.model = NO_MODEL
        entry = oip.RepositoryIndexResponse.ModelIndex
        models = [entry(name=m.name, version=m.version, state="READY") for m in self.service.models.values()]
        return oip.RepositoryIndexResponse(models=models)

    # ---- inference ---------------------------------------------------------------------------
    async def model_infer(self, message: oip.ModelInferRequest, call: Call) -> oip.ModelInferResponse:
        if len(message.id) > MAX_ID:
            raise invalid(f"id is {len(message.id)} characters long; at most {MAX_ID} are echoed back")
        call.name_request(message.id)
        model = self.service.model(message.model_name, message.model_version)
        kind = _kind(model, [tensor.name for tensor in message.inputs])
        requested = _requested_outputs(model, kind, [tensor.name for tensor in message.outputs])
        parameters = _Parameters(message.parameters)
        accuracy, scheduling, timeout = parameters.accuracy(), parameters.scheduling(), parameters.timeout()
        if timeout is not None:
            call = _with_timeout(call, timeout)
        request = InferenceRequest(
            kind, model.name, message.model_version, lambda: _decode_inputs(message), accuracy, scheduling
        )
        try:
            result = await self.service.infer(request, call)
        except RequestError as error:
            raise in_parameters_terms(error) from None
        produced = {**result.outputs, "nfe": result.nfe, "status": result.status}
        wanted = requested or list(produced)
        # Bounded and charged before any of it is built: never more than one message, and held
        # against max_inflight_bytes like the request.
        size = response_bytes(model.name, model.version, message.id, [produced[name] for name in wanted])
        limit = self.service.config.max_message_bytes
        if size > limit:
            raise RequestError(
                Code.RESOURCE_EXHAUSTED,
                f"the response would take up to {size} bytes, over the server's max_message_bytes of "
                f"{limit}: ask for fewer items or outputs",
            )
        call.reservation.add(size)
        solved = result.solved
        response = oip.ModelInferResponse(model_name=model.name, model_version=model.version, id=message.id)
        response.parameters["rtol"].double_param = solved.rtol
        response.parameters["atol"].double_param = solved.atol
        response.parameters["method"].string_param = solved.method
        response.parameters["preemptions"].int64_param = solved.preemptions
        response.parameters["precision"].string_param = solved.precision
        for name in wanted:
            array = np.ascontiguousarray(produced[name])
            datatype = NAME_OF[str(array.dtype.newbyteorder("<"))]
            response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            response.raw_output_contents.append(array.astype(DATATYPES[datatype][0], copy=False).tobytes())
        return response


def response_bytes(model: str, version: str, id_: str, arrays: list[np.ndarray]) -> int:
    """An upper bound on the serialized size of a response holding ``arrays``."""
    fixed = _RESPONSE_BYTES + len(model.encode()) + len(version.encode()) + len(id_.encode())
    return fixed + sum(_OUTPUT_BYTES + array.nbytes for array in arrays)


def _requested_outputs(model: ServedModel, kind: Kind, names: list[str]) -> list[str]:
    """The outputs a request asks for, each at most once (none: all), checked before any work."""
    signature = model.adapter.signatures.get(kind)
    if signature is None:  # the service refuses the request
        return names
    produced = [spec.name for spec in signature.outputs] + [name for name, _, _ in PER_ITEM]
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name not in produced:
            raise invalid(
                f"outputs: model {quoted(model.name)} has no output {quoted(name)} (outputs: {', '.join(produced)})"
            )
        if name in seen:
            raise invalid(f"outputs[{index}]: output {quoted(name)} is asked for twice; ask for each output once")
        seen.add(name)
    return names


def _tensors(model: ServedModel) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, datatype, shape) of a model's inputs and outputs over all its kinds, each once."""
    inputs: dict[str, tuple[str, str, list[int]]] = {}
    outputs: dict[str, tuple[str, str, list[int]]] = {}
    for signature in model.adapter.signatures.values():
        for spec in signature.inputs:
            shape = list(spec.shape) or [1]
            inputs.setdefault(spec.name, (spec.name, SPEC_DATATYPES[spec.dtypes[0]], shape))
        for spec in signature.outputs:
            outputs.setdefault(spec.name, (spec.name, SPEC_DATATYPES[spec.dtypes[0]], list(spec.shape)))
    for name, datatype, _ in PER_ITEM:
        outputs[name] = (name, datatype, [-1])
    return list(inputs.values()), list(outputs.values())


def _described(signature: Signature) -> str:
    """A kind's inputs and outputs in words: ``inputs n (and seed); outputs points, ...``."""
    required = [spec.name for spec in signature.inputs if not spec.optional]
    optional = [spec.name for spec in signature.inputs if spec.optional]
    inputs = ("inputs " if len(signature.inputs) > 1 else "input ") + ", ".join(required)
    if optional:
        inputs += f" (and {', '.join(optional)})"
    outputs = [spec.name for spec in signature.outputs] + [name for name, _, _ in PER_ITEM]
    return f"{inputs}; outputs {', '.join(outputs)}"


def _kind(model: ServedModel, names: list[str]) -> Kind:
    """What the request asks of the model, from the names of its inputs and the model's
    signatures: the kind with the most of its required inputs given (ties: the one the model
    lists later); none given: the model's first kind."""
    given = set(names)
    signatures = list(model.adapter.signatures.values())

    def required(signature: Signature) -> set[str]:
        return {spec.name for spec in signature.inputs if not spec.optional}

    ranked = [(len(required(s) & given), index, s) for index, s in enumerate(signatures) if required(s) & given]
    signature = max(ranked, key=lambda entry: entry[:2])[2] if ranked else signatures[0]
    kind, expected = signature.kind, {spec.name for spec in signature.inputs}
    unknown = sorted(given - expected)
    if unknown:
        raise invalid(
            f"inputs: model {quoted(model.name)} has no input {quoted(unknown[0])} here "
            f"(for {kind.value}: {', '.join(sorted(expected))})"
        )
    missing = sorted(required(signature) - given)
    if missing:
        raise invalid(f"inputs: {kind.value} on model {quoted(model.name)} needs input {missing[0]!r}")
    return kind


def _decode_inputs(message: oip.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; give one per input")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        field = f"inputs[{index}] ({quoted(name)})"
        if name in inputs:
            raise invalid(f"{field}: input {quoted(name)} is given twice")
        if tensor.datatype not in DATATYPES:
            raise invalid(f"{field}.datatype must be one of {', '.join(DATATYPES)}, got {quoted(tensor.datatype)}")
        shape = check_shape(tensor.shape, field)
        dtype, contents = DATATYPES[tensor.datatype]
        count = math.prod(shape)
        if raw:
            if len(raw[index]) != count * dtype.itemsize:
                raise invalid(
                    f"{field}: raw_input_contents[{index}] has {len(raw[index])} bytes, but shape {shape} of "
                    f"{tensor.datatype} needs {count * dtype.itemsize}"
                )
            array = np.frombuffer(raw[index], dtype=dtype)
        else:
            values = getattr(tensor.contents, contents)
            if len(values) != count:
                raise invalid(f"{field}: contents.{contents} has {len(values)} values, but shape {shape} needs {count}")
            array = np.asarray(values)
            if dtype.kind in "iu" and array.size:  # uint_contents carries UINT8 as uint32: never wrap
                low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
                outside = np.flatnonzero((array < low) | (array > high))
                if outside.size:
                    raise invalid(
                        f"{field}: contents.{contents}[{outside[0]}] is {int(array[outside[0]])}, outside "
                        f"{tensor.datatype}'s range {low} .. {high}"
                    )
            array = array.astype(dtype)
        array = array.reshape(shape)
        if name in COUNT_INPUTS:
            if array.size != 1 or array.dtype.kind not in "iu":
                raise invalid(f"{field}: {name} must be one integer (shape [1]), got {tensor.datatype} {shape}")
            if int(array.reshape(())) < 0:
                raise invalid(f"{field}: {name} must not be negative")
            array = array.reshape(()).astype(np.uint64)
        inputs[name] = array
    return inputs


# odeserve.v1's field names in the shared request path's messages, as this protocol spells them
# (first match wins: the specific names before the message prefixes).
_FIELD_NAMES = (
    ("accuracy.auto_tol", 'parameters.tol "auto"'),
    ("accuracy: auto_tol", 'parameters: tol "auto"'),
    ("auto_tol", 'tol "auto"'),
    ("scheduling.priority", "priority"),
    ("accuracy.", "parameters."),
    ("scheduling.", "parameters."),
    ("accuracy:", "parameters:"),
)


def in_parameters_terms(error: RequestError) -> RequestError:
    """A refusal from the shared request path, naming this protocol's fields: ``parameters.tol``
    where odeserve.v1 says ``accuracy.tol``, ``priority`` for ``scheduling.priority``."""
    message = error.message
    for v1_name, name in _FIELD_NAMES:
        message = message.replace(v1_name, name)
    return RequestError(error.code, message)


class _Parameters:
    """Request parameters: numbers, or strings from clients that send every parameter as one."""

    def __init__(self, parameters: Mapping[str, oip.InferParameter]) -> None:
        self.parameters = parameters

    def _value(self, name: str) -> bool | int | float | str | None:
        if name not in self.parameters:
            return None
        parameter = self.parameters[name]
        return getattr(parameter, parameter.WhichOneof("parameter_choice") or "string_param")

    @overload
    def number(self, name: str, kind: type[int]) -> int | None: ...
    @overload
    def number(self, name: str, kind: type[float]) -> float | None: ...
    def number(self, name: str, kind: type) -> float | int | None:
        value = self._value(name)
        if value is None or isinstance(value, bool):
            if isinstance(value, bool):
                raise invalid(f"parameters.{name} must be a number, got {value!r}")
            return None
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise invalid(f"parameters.{name} must be a number, got {quoted(cast(str, value))}") from None  # a str
        if kind is int:
            if not float(number).is_integer() or number < 0:
                raise invalid(f"parameters.{name} must be a whole number >= 0, got {value!r}")
            return int(number)
        return float(number)

    def accuracy(self) -> Accuracy:
        tol = self._value("tol")
        auto = isinstance(tol, str) and tol.strip().lower() == "auto"
        method, precision = self.string("method"), self.string("precision")
        return Accuracy(
            tol=0.0 if auto else self.number("tol", float) or 0.0,
            rtol=self.number("rtol", float) or 0.0,
            atol=self.number("atol", float) or 0.0,
            method=method,
            precision=precision,
            max_nfe=self.number("max_nfe", int) or 0,
            auto_tol=auto,
            latency_target_seconds=self.number("latency_target_seconds", float) or 0.0,
        )

    def string(self, name: str) -> str:
        value = self._value(name)
        if value is not None and not isinstance(value, str):
            raise invalid(f"parameters.{name} must be a string, got {value!r}")
        return value or ""

    def scheduling(self) -> Scheduling:
        return Scheduling(
            priority=self.number("priority", int) or 0, max_total_nfe=self.number("max_total_nfe", int) or 0
        )

    def timeout(self) -> float | None:
        """Triton's ``timeout``, in microseconds, as seconds."""
        microseconds = self.number("timeout", int)
        return None if not microseconds else microseconds / 1e6


def _with_timeout(call: Call, timeout: float) -> Call:
    """The call, with its deadline at most ``timeout`` seconds from now."""
    end = time.monotonic() + timeout

    def remaining() -> float | None:
        left = end - time.monotonic()
        grpc_left = call.remaining()
        return left if grpc_left is None else min(left, grpc_left)

    return Call(remaining, call.record, call.reservation, call.caller)
