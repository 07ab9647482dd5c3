"""What the two shells share: a channel with odeserve's options, errors, TLS, and the two ways
of turning a call's description (``client._calls``) into a method: ``blocking`` for
``Client`` and ``awaitable`` for ``AsyncClient``. Either method has the description's
docstring and signature (``help()`` shows them), with the request options spelled out."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import grpc

from ._calls import Call, options_of

P = ParamSpec("P")
R = TypeVar("R")
SERVICE = "odeserve.v1.Inference"


class OdeServeError(Exception):
    """A failed call: ``code`` is the gRPC status code name (e.g. "INVALID_ARGUMENT");
    ``request_id`` names the call in the server's logs ("" from a server that sent none)."""

    def __init__(self, code: str, message: str, request_id: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> OdeServeError:
        return cls(error.code().name, error.details() or "", request_id_of(error.trailing_metadata()))


REQUEST_ID = "x-request-id"


def request_id_of(metadata: Any) -> str:
    """The server's id of a call, from its trailing metadata ("" when it sent none)."""
    return next((str(value) for key, value in metadata or () if key == REQUEST_ID), "")


def _with_request_id(result: R, request_id: str) -> R:
    """``result`` naming its call, where it has a ``request_id`` field."""
    if dataclasses.is_dataclass(result) and any(f.name == "request_id" for f in dataclasses.fields(result)):
        return cast(R, dataclasses.replace(cast(Any, result), request_id=request_id))
    return result


@dataclass(frozen=True)
class TLS:
    """Server verification (``root_certificates``) and, for mutual TLS, a client identity."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    @staticmethod
    def from_files(ca: str | Path | None = None, key: str | Path | None = None, cert: str | Path | None = None) -> TLS:
        read = lambda p: None if p is None else Path(p).read_bytes()  # noqa: E731
        return TLS(read(ca), read(key), read(cert))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def channel_options(
    max_message_bytes: int, retries: int, load_balancing: str = "pick_first"
) -> list[tuple[str, object]]:
    """Retry, with backoff via the service config, what a restarting or draining server
    answers: UNAVAILABLE, and CANCELLED, which gRPC gives calls a shutting-down server had
    received but not yet handed to a handler (grpc/grpc#41785). odeserve itself never
    cancels a call, so a CANCELLED status from the server always means "not processed"."""
    if load_balancing not in ("pick_first", "round_robin"):
        raise ValueError(f"load_balancing must be pick_first or round_robin, got {load_balancing!r}")
    service_config = {
        "loadBalancingConfig": [{load_balancing: {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": max(2, retries + 1),
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
    }
    return [
        ("grpc.service_config", json.dumps(service_config)),
        # after a server restart, reconnect within ~2 s instead of gRPC's default of up to 2 min
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class Connection:
    """A channel to a server (or to replicas behind one name) and the stubs on it; a shell
    sets ``_grpc`` (``grpc`` or ``grpc.aio``) and adds the calls."""

    _grpc: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        tls: TLS | bool | None = None,
        token: str | None = None,
        retries: int = 3,
        max_message_bytes: int = 16 * 1024 * 1024,
        load_balancing: str = "pick_first",
    ) -> None:
        options = channel_options(max_message_bytes, retries, load_balancing)
        if tls:
            credentials = (tls if isinstance(tls, TLS) else TLS()).credentials()
            self._channel = self._grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = self._grpc.insecure_channel(target, options=options)
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stubs: dict[type, Any] = {}

    def _rpc(self, call: Call[Any]) -> tuple[Any, dict[str, Any]]:
        """The stub method that sends ``call``, and the keywords to send it with."""
        stub = self._stubs.get(call.stub)
        if stub is None:
            stub = self._stubs[call.stub] = call.stub(self._channel)
        return getattr(stub, call.method), {"timeout": call.timeout_s or self.timeout_s, "metadata": self._metadata}


def blocking(describe: Callable[P, Call[R]]) -> Callable[Concatenate[Connection, P], R]:
    """A method of ``Client``: sends the call ``describe`` returns and waits for its result."""

    def method(self: Connection, /, *args: P.args, **kwargs: P.kwargs) -> R:
        call = describe(*args, **kwargs)
        rpc, options = self._rpc(call)
        try:
            response, answered = rpc.with_call(call.request, **options)
        except grpc.RpcError as error:
            raise OdeServeError.from_rpc(error) from None
        return _with_request_id(call.result(response), request_id_of(answered.trailing_metadata()))

    return _presented_as(describe, method)


def awaitable(describe: Callable[P, Call[R]]) -> Callable[Concatenate[Connection, P], Coroutine[Any, Any, R]]:
    """A method of ``AsyncClient``: sends the call ``describe`` returns; awaiting gives its result."""

    async def method(self: Connection, /, *args: P.args, **kwargs: P.kwargs) -> R:
        call = describe(*args, **kwargs)
        rpc, options = self._rpc(call)
        try:
            answered = rpc(call.request, **options)
            response = await answered
            trailing = await answered.trailing_metadata()
        except grpc.RpcError as error:
            raise OdeServeError.from_rpc(error) from None
        return _with_request_id(call.result(response), request_id_of(trailing))

    return _presented_as(describe, method)


def _presented_as(describe: Callable[..., Call[Any]], method: Callable[..., Any]) -> Any:
    """``method`` with ``describe``'s name, docstring and signature as written in its source:
    ``self`` first, ``**options: Unpack[SomeOptions]`` spelled out as keywords (their
    docstring appended), and the result's type, not ``Call[...]``, as the return."""
    hints = typing.get_type_hints(describe, include_extras=True)
    returns = re.fullmatch(r"Call\[(.+)\]", str(describe.__annotations__["return"]))
    if typing.get_origin(hints["return"]) is not Call or returns is None:
        raise TypeError(
            f"{describe.__qualname__} must be annotated to return Call[<result type>], as a string "
            "(from __future__ import annotations)"
        )
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    doc = inspect.getdoc(describe) or ""
    for parameter in inspect.signature(describe).parameters.values():
        hint = hints.get(parameter.name)
        if parameter.kind is parameter.VAR_KEYWORD and typing.get_origin(hint) is typing.Unpack:
            (typed_dict,) = typing.get_args(hint)
            options = options_of(typed_dict)
            parameters += [
                inspect.Parameter(
                    o.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=inspect.formatannotation(o.hint)
                )
                for o in options
            ]
            table = "\n".join(f"    {o.name:<9} {o.help}" for o in options)
            doc += f"\n\n{inspect.getdoc(typed_dict)}\n{table}"
        else:
            parameters.append(parameter)
    method.__signature__ = inspect.Signature(parameters, return_annotation=returns.group(1))  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = describe.__name__
    method.__module__, method.__doc__ = describe.__module__, doc
    return method
