"""Every call of the SDK, described once: its typed signature and docstring, how its request is
built, and how its response becomes the caller's result. ``Client`` and ``AsyncClient`` are
shells that send what these functions return (``client._shell``), so a new call, or a new
keyword, is written here and nowhere else.

A keyword every compute call takes (how its items are solved) is a field of ``RequestOptions``
and a line of ``_request_fields``: the signatures and docstrings of both shells and the
command line's flags follow from it. A keyword of one call is a parameter of its function.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypedDict, TypeVar, Unpack, cast

import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

from ._convert import (
    ClassifyResult,
    LogDensityResult,
    ModelInfo,
    SampleResult,
    classify_result,
    images_tensor,
    log_density_result,
    model_info,
    model_infos,
    points_tensor,
    sample_result,
)

R = TypeVar("R")


@dataclass(frozen=True)
class Call(Generic[R]):
    """One RPC ready to send: the generated stub class and its method, the request, what turns
    the response into the result, and the call's deadline (None: the client's default)."""

    stub: type
    method: str
    request: Any
    result: Callable[[Any], R]
    timeout_s: float | None


def _tolerance(text: str) -> float | str:
    """A tolerance on the command line: a number, or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"a number such as 1e-3, or auto; got {text!r}") from None


ADAPTIVE_METHODS = ("dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun")
"""The methods a request may name, the default first: the server's adaptive ones (the SDK has no
torch, so it cannot ask neuralode.solvers; tests/client/test_sdk.py checks that they agree)."""
_METHOD_HELP = f'"{ADAPTIVE_METHODS[0]}" (default), or another adaptive method: ' + ", ".join(
    f'"{name}"' for name in ADAPTIVE_METHODS[1:]
)


class RequestOptions(TypedDict, total=False):
    """Request options (keywords of classify, sample and log_density; left out or None: the
    server's default):"""

    tol: Annotated[
        float | Literal["auto"] | None,
        "rtol = atol = tol (default: the model card's tolerance); \"auto\": the tightest of the card's "
        "tolerances predicted to finish within latency_target_s or the call's deadline (result.solved says "
        "which)",
        _tolerance,
    ]
    rtol: Annotated[float | None, "relative tolerance, with atol, instead of tol"]
    atol: Annotated[float | None, "absolute tolerance, with rtol"]
    method: Annotated[str | None, _METHOD_HELP]
    max_nfe: Annotated[int | None, "stop each item after this many function evaluations (its status: MAX_NFE)"]
    precision: Annotated[
        str | None,
        'what f is evaluated in: "auto" (default: bfloat16 only where the model card shows it gives float32\'s '
        'answers, on hardware with bfloat16 units), "float32" or "bfloat16" (result.solved says which)',
    ]
    latency_target_s: Annotated[float | None, 'with tol="auto": the latency to aim for (default: the deadline)']
    priority: Annotated[int | None, "1 is the most urgent level (default: the server's default level)"]
    max_total_nfe: Annotated[int | None, "most function evaluations over all items; beyond: RESOURCE_EXHAUSTED"]


@dataclass(frozen=True)
class Option:
    """One request option as the shells' signatures and the command line present it."""

    name: str
    hint: Any  # e.g. float | None
    help: str
    parser: Callable[[str], Any] | None = None  # for the command line, where the type alone is not one

    @property
    def cli_type(self) -> Callable[[str], Any]:
        """What turns a value given on the command line into the option's: ``parser``, or the
        option's one type (float, for float | None)."""
        if self.parser is not None:
            return self.parser
        types = [t for t in typing.get_args(self.hint) or (self.hint,) if t is not type(None)]
        if len(types) != 1:
            raise TypeError(f"request option {self.name}: Annotated[{self.hint}, help, parser] needs the parser")
        return types[0]


def options_of(typed_dict: type) -> list[Option]:
    """The fields of an options TypedDict, each ``Annotated[type, "help"]`` or, where the
    command line cannot parse a value by calling the type, ``Annotated[type, "help", parser]``."""
    options = []
    for name, hint in typing.get_type_hints(typed_dict, include_extras=True).items():
        help_text, *parser = hint.__metadata__
        options.append(Option(name, typing.get_args(hint)[0], help_text, *parser))
    return options


def _request_fields(options: RequestOptions) -> dict[str, Any]:
    """The fields every compute request has, from the caller's request options."""
    unknown = sorted(options.keys() - RequestOptions.__annotations__.keys())
    if unknown:
        raise TypeError(
            f"unexpected keyword argument {unknown[0]!r}; the request options are "
            f"{', '.join(RequestOptions.__annotations__)}"
        )
    _check_types(options)
    tol = options.get("tol")
    auto = tol == "auto"
    accuracy = pb.Accuracy(
        tol=0.0 if auto else cast(float | None, tol) or 0.0,
        rtol=options.get("rtol") or 0.0,
        atol=options.get("atol") or 0.0,
        method=options.get("method") or "",
        max_nfe=options.get("max_nfe") or 0,
        auto_tol=auto,
        latency_target_seconds=options.get("latency_target_s") or 0.0,
        precision=options.get("precision") or "",
    )
    scheduling = pb.Scheduling(priority=options.get("priority") or 0, max_total_nfe=options.get("max_total_nfe") or 0)
    return {"accuracy": accuracy, "scheduling": scheduling}


def _check_types(options: RequestOptions) -> None:
    """A clear TypeError for an option of the wrong type (say ``tol="1e-2"``), before protobuf's
    own, which names no option."""
    hints = typing.get_type_hints(RequestOptions)
    for name, value in options.items():
        if value is None:
            continue
        allowed = typing.get_args(hints[name]) or (hints[name],)
        numeric = [t for t in allowed if t in (int, float)]
        literals = [a for t in allowed if typing.get_origin(t) is Literal for a in typing.get_args(t)]
        if value in literals or isinstance(value, str) and str in allowed:
            continue
        wanted = numbers.Integral if numeric == [int] else numbers.Real
        if numeric and isinstance(value, wanted) and not isinstance(value, bool):
            continue
        kind = "an integer" if numeric == [int] else "a number" if numeric else "a string"
        also = "".join(f" or {a!r}" for a in literals)
        raise TypeError(f"{name} must be {kind}{also}, got {value!r} ({type(value).__name__})")


def classify(
    images: npt.ArrayLike,
    *,
    model: str,
    version: str = "",
    timeout_s: float | None = None,
    **options: Unpack[RequestOptions],
) -> Call[ClassifyResult]:
    """Labels and class probabilities of MNIST-shaped images, and what each solve cost.

    images: uint8 in 0..255 or float32 in [0, 1] (float64 is sent as float32), shaped
    [N, 28, 28] or [N, 1, 28, 28]. version: "" for whichever version is served. timeout_s:
    this call's deadline instead of the client's.
    """
    request = pb.ClassifyRequest(model=model, version=version, images=images_tensor(images), **_request_fields(options))
    return Call(pb_grpc.InferenceStub, "Classify", request, classify_result, timeout_s)


def sample(
    n: int,
    *,
    model: str,
    seed: int = 0,
    version: str = "",
    timeout_s: float | None = None,
    **options: Unpack[RequestOptions],
) -> Call[SampleResult]:
    """``n`` points drawn from a density model, with their log-densities; the same seed gives
    the same points."""
    request = pb.SampleRequest(model=model, version=version, n=n, seed=seed, **_request_fields(options))
    return Call(pb_grpc.InferenceStub, "Sample", request, sample_result, timeout_s)


def log_density(
    points: npt.ArrayLike,
    *,
    model: str,
    version: str = "",
    timeout_s: float | None = None,
    **options: Unpack[RequestOptions],
) -> Call[LogDensityResult]:
    """Exact log-densities of points under a density model.

    points: float32 or float64, shaped [N, D] (other dtypes are sent as float32).
    """
    request = pb.LogDensityRequest(
        model=model, version=version, points=points_tensor(points), **_request_fields(options)
    )
    return Call(pb_grpc.InferenceStub, "LogDensity", request, log_density_result, timeout_s)


def models(timeout_s: float | None = None) -> Call[list[ModelInfo]]:
    """Every served model with its card."""
    return Call(pb_grpc.InferenceStub, "ListModels", pb.ListModelsRequest(), model_infos, timeout_s)


def model(name: str, version: str = "", timeout_s: float | None = None) -> Call[ModelInfo]:
    """One served model with its card; NOT_FOUND when there is none of that name."""
    return Call(
        pb_grpc.InferenceStub, "GetModel", pb.GetModelRequest(name=name, version=version), model_info, timeout_s
    )


def health(service: str = "", timeout_s: float | None = None) -> Call[str]:
    """The standard gRPC health status ("SERVING", "NOT_SERVING" while draining) of the
    server (``service=""``), its Inference service ("odeserve.v1.Inference"), or one model by
    name."""
    request = health_pb2.HealthCheckRequest(service=service)
    return Call(health_pb2_grpc.HealthStub, "Check", request, _serving_status, timeout_s)


def _serving_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
