"""The Open Inference Protocol over HTTP/REST (KServe v2's REST API, with Triton's binary
tensor data extension): a thin translator from JSON (and raw tensor bytes) to the protocol's
gRPC messages, answered by the same :class:`~server.open_inference.OpenInference` methods, so
parameters, validation, limits, auth, metrics and error messages are those of the gRPC port.
Errors are ``{"error": message}`` with the HTTP status of their code."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf.message import Message

from server.oip import grpc_predict_v2_pb2 as oip

from .api import Code, RequestError, invalid, quoted
from .auth import Token, identify, unauthenticated
from .calls import CallRunner
from .config import ServerConfig
from .httpd import Limits, application
from .open_inference import DATATYPES, OpenInference
from .service import Call
from .wire import check_shape

HTTP_STATUS = {
    Code.OK: 200,
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 408,  # a client that hangs up gets no answer: the one delivered is the read timeout
    Code.INTERNAL: 500,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
"""Each outcome's HTTP status, as gRPC-HTTP gateways map them."""

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension: JSON first, then raw tensors
JSON_TYPE, BINARY_TYPE = "application/json", "application/octet-stream"
UNKNOWN = "unknown"

Translate = Callable[[web.Request, Call], Awaitable[web.Response]]


def error_response(code: Code, message: str) -> web.Response:
    return web.json_response({"error": message}, status=HTTP_STATUS[code])


class RestApi:
    """The REST routes over the Open Inference translator of the gRPC port."""

    def __init__(
        self, config: ServerConfig, oip_api: OpenInference, calls: CallRunner, tokens: Sequence[Token]
    ) -> None:
        self.config, self.oip, self.calls, self.tokens = config, oip_api, calls, list(tokens)

    def application(self) -> web.Application:
        config = self.config
        limits = Limits(
            max_connections=config.http_max_connections,
            head_timeout_s=config.request_read_timeout_s,
            idle_timeout_s=config.http_idle_timeout_s,
            max_body_bytes=config.max_message_bytes,
        )
        app = application(limits, self._unknown)
        routes = [
            ("GET", "/v2/health/live", "ServerLive", self._live, False),
            ("GET", "/v2/health/ready", "ServerReady", self._ready, False),
            ("GET", "/v2", "ServerMetadata", self._server_metadata, True),
            ("GET", "/v2/models/{name}", "ModelMetadata", self._model_metadata, True),
            ("GET", "/v2/models/{name}/versions/{version}", "ModelMetadata", self._model_metadata, True),
            ("GET", "/v2/models/{name}/ready", "ModelReady", self._model_ready, True),
            ("GET", "/v2/models/{name}/versions/{version}/ready", "ModelReady", self._model_ready, True),
            ("POST", "/v2/models/{name}/infer", "ModelInfer", self._infer, True),
            ("POST", "/v2/models/{name}/versions/{version}/infer", "ModelInfer", self._infer, True),
            ("POST", "/v2/repository/index", "RepositoryIndex", self._repository_index, True),
        ]
        for method, path, rpc, translate, protected in routes:
            app.router.add_route(method, path, self._handler(rpc, translate, protected))
        app.router.add_get("/", _page("index.html"))
        for name in PLAYGROUND_FILES:
            app.router.add_get(f"/playground/{name}", _page(name))
        return app

    def _handler(
        self, rpc: str, translate: Translate, protected: bool
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            header = request.headers.get("Authorization")
            if protected and self.tokens:
                problem = unauthenticated(self.tokens, header, "header")
                if problem is not None:
                    self.calls.refused(rpc, Code.UNAUTHENTICATED)
                    return error_response(Code.UNAUTHENTICATED, problem)
            size = request.content_length
            if size is not None and size > self.config.max_message_bytes:  # refused unread
                self.calls.refused(rpc, Code.RESOURCE_EXHAUSTED)
                return web.json_response({"error": _too_large(size, self.config).message}, status=413)
            peer = f"http:{request.remote or UNKNOWN}"
            answer = await self.calls.run(
                rpc,
                lambda call: translate(request, call),
                remaining=lambda: None,
                caller=lambda: identify(self.tokens, header, peer),
                headers=request.headers,  # looked up case-insensitively: x-request-id, traceparent
            )
            response = answer.response or error_response(answer.code, answer.message)
            response.headers["X-Request-Id"] = answer.request_id
            return response

        return handle

    async def _unknown(self, request: web.Request, status: int) -> web.Response:
        """Paths (404) and methods (405) of no route: counted as gRPC counts unknown methods."""
        self.calls.refused(UNKNOWN, Code.UNIMPLEMENTED)
        problem = "no such path" if status == 404 else f"{request.method} is not a method of this path"
        return web.json_response(
            {"error": f"{request.method} {request.path}: {problem} (the Open Inference Protocol's REST API: /v2/...)"},
            status=status,
        )

    # ---- health and metadata -----------------------------------------------------------------
    async def _live(self, request: web.Request, call: Call) -> web.Response:
        response = await self.oip.server_live(oip.ServerLiveRequest(), call)
        return _probe(response.live, "the server is not live")

    async def _ready(self, request: web.Request, call: Call) -> web.Response:
        response = await self.oip.server_ready(oip.ServerReadyRequest(), call)
        return _probe(response.ready, "the server is not ready (starting, or shutting down)")

    async def _model_ready(self, request: web.Request, call: Call) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        response = await self.oip.model_ready(oip.ModelReadyRequest(name=name, version=version), call)
        return _probe(response.ready, f"model {quoted(name)} is not ready")

    async def _server_metadata(self, request: web.Request, call: Call) -> web.Response:
        response = await self.oip.server_metadata(oip.ServerMetadataRequest(), call)
        return web.json_response(
            {"name": response.name, "version": response.version, "extensions": list(response.extensions)}
        )

    async def _model_metadata(self, request: web.Request, call: Call) -> web.Response:
        message = oip.ModelMetadataRequest(
            name=request.match_info["name"], version=request.match_info.get("version", "")
        )
        response = await self.oip.model_metadata(message, call)

        def tensors(entries: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in entries]

        return web.json_response(
            {
                "name": response.name,
                "versions": list(response.versions),
                "platform": response.platform,
                "inputs": tensors(response.inputs),
                "outputs": tensors(response.outputs),
                "properties": dict(response.properties),
            }
        )

    async def _repository_index(self, request: web.Request, call: Call) -> web.Response:
        response = await self.oip.repository_index(oip.RepositoryIndexRequest(), call)
        return web.json_response([{"name": m.name, "version": m.version, "state": m.state} for m in response.models])

    # ---- inference ---------------------------------------------------------------------------
    async def _infer(self, request: web.Request, call: Call) -> web.Response:
        body = await _read_body(request, self.config)
        call.reservation.add(len(body))
        message, binary_outputs = infer_request(
            body,
            request.headers.get(HEADER_LENGTH),
            request.match_info["name"],
            request.match_info.get("version", ""),
        )
        response = await self.oip.model_infer(message, call)
        return infer_response(response, binary_outputs)


PLAYGROUND_FILES = ("playground.js", "playground.css")
_CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def _page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A file of the playground (``server/playground/``), read once; the page may load nothing
    from elsewhere (Content-Security-Policy)."""
    body = (resources.files("server") / "playground" / name).read_bytes()
    headers = {"Content-Security-Policy": "default-src 'self'", "X-Content-Type-Options": "nosniff"}
    content_type = _CONTENT_TYPES[Path(name).suffix]

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)

    return page


def _probe(ok: bool, problem: str) -> web.Response:
    """The protocol's health answers: 200 for yes, a 4xx for no."""
    return web.Response(status=200) if ok else web.json_response({"error": problem}, status=400)


async def _read_body(request: web.Request, config: ServerConfig) -> bytes:
    """The whole body, within ``request_read_timeout_s`` and ``max_message_bytes``."""
    try:
        return await asyncio.wait_for(request.read(), config.request_read_timeout_s)
    except TimeoutError:
        raise RequestError(
            Code.CANCELLED,
            f"the request body did not arrive within {config.request_read_timeout_s:g} s; the server ended the call",
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None, config) from None


def _too_large(size: int | None, config: ServerConfig) -> RequestError:
    given = "" if size is None else f" ({size} bytes)"
    return RequestError(
        Code.RESOURCE_EXHAUSTED,
        f"the request body is larger{given} than the server's max_message_bytes of {config.max_message_bytes}",
    )


# ---- JSON <-> the protocol's messages --------------------------------------------------------
def infer_request(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[oip.ModelInferRequest, dict[str, bool]]:
    """The gRPC message a REST inference request means, and which outputs go back as raw bytes
    (the binary extension; absent names: the request's ``binary_data_output``, else JSON)."""
    if header_length is None:
        head, blobs = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise invalid(f"the {HEADER_LENGTH} header must be the JSON's length, at most the body's {len(body)} bytes")
        head, blobs = body[: int(header_length)], body[int(header_length) :]
    try:
        document = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(f"the request is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise invalid("the request must be a JSON object with 'inputs'")
    message = oip.ModelInferRequest(model_name=model, model_version=version, id=_string(document, "id", ""))
    parameters = _object(document, "parameters")
    binary_default = parameters.pop("binary_data_output", False) is True
    _set_parameters(message.parameters, parameters, "parameters")
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("inputs must be a JSON array of tensors")
    offset = 0
    for index, tensor in enumerate(inputs):
        field = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise invalid(f"{field} must be a JSON object")
        name, datatype = _string(tensor, "name", None, field), _string(tensor, "datatype", None, field)
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise invalid(f"{field}.shape must be a JSON array of integers")
        shape = check_shape(shape, field)
        if datatype not in DATATYPES:
            raise invalid(f"{field}.datatype must be one of {', '.join(DATATYPES)}, got {quoted(datatype)}")
        dtype = DATATYPES[datatype][0]
        tensor_parameters = _object(tensor, "parameters", field)
        size = tensor_parameters.pop("binary_data_size", None)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(blobs):
                raise invalid(f"{field}.parameters.binary_data_size must count bytes that follow the JSON")
            raw = blobs[offset : offset + size]
            offset += size
        else:
            raw = _json_data(tensor.get("data"), dtype, shape, f"{field}.data")
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_input_contents.append(raw)
    if offset != len(blobs):
        raise invalid(f"{len(blobs) - offset} bytes follow the JSON that no input's binary_data_size claims")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise invalid("outputs must be a JSON array")
    binary: dict[str, bool] = {}
    for index, output in enumerate(outputs):
        field = f"outputs[{index}]"
        if not isinstance(output, dict):
            raise invalid(f"{field} must be a JSON object")
        name = _string(output, "name", None, field)
        flag = _object(output, "parameters", field).get("binary_data", binary_default)
        binary[name] = flag is True
        message.outputs.add(name=name)
    binary[""] = binary_default
    return message, binary


def infer_response(response: oip.ModelInferResponse, binary: Mapping[str, bool]) -> web.Response:
    outputs, blobs = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary.get(output.name, binary[""]):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, DATATYPES[output.datatype][0]).tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["parameters"] = {name: _parameter_value(value) for name, value in response.parameters.items()}
    document["outputs"] = outputs
    head = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=head, content_type=JSON_TYPE)
    return web.Response(
        body=b"".join([head, *blobs]), content_type=BINARY_TYPE, headers={HEADER_LENGTH: str(len(head))}
    )


def _json_data(data: Any, dtype: np.dtype[Any], shape: list[int], field: str) -> bytes:
    """A tensor's JSON ``data`` (flat or nested, row-major) as little-endian bytes of ``dtype``."""
    if not isinstance(data, list):
        raise invalid(f"{field} must be a JSON array (or give parameters.binary_data_size)")
    try:
        values = np.asarray(data)
    except ValueError:
        raise invalid(f"{field} is a ragged array; give it flat or with equal-length rows") from None
    kind = values.dtype.kind
    if values.size and (kind not in "biuf" or (dtype.kind == "b") != (kind == "b")):
        expected = "true/false" if dtype.kind == "b" else "numbers"
        raise invalid(f"{field} must hold {expected} only")
    values = values.ravel()
    if values.size != math.prod(shape):
        raise invalid(f"{field} has {values.size} values, but shape {shape} needs {math.prod(shape)}")
    if dtype.kind in "iu" and values.size:
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        bad = np.flatnonzero((values != np.round(values)) | (values < low) | (values > high))
        if bad.size:
            raise invalid(f"{field}[{bad[0]}] is {values[bad[0]].item()!r}, not an integer in {low} .. {high}")
    return values.astype(dtype).tobytes()


def _string(document: dict[str, Any], key: str, default: str | None, field: str = "") -> str:
    value = document.get(key, default)
    if not isinstance(value, str):
        raise invalid(f"{field + '.' if field else ''}{key} must be a string")
    return value


def _object(document: dict[str, Any], key: str, field: str = "") -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise invalid(f"{field + '.' if field else ''}{key} must be a JSON object")
    return dict(value)


def _set_parameters(target: Any, parameters: dict[str, Any], field: str) -> None:
    for name, value in parameters.items():
        parameter = target[name]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise invalid(f"{field}.{name} must be a boolean, number or string")


def _parameter_value(parameter: Message) -> bool | int | float | str:
    return getattr(parameter, parameter.WhichOneof("parameter_choice") or "string_param")
