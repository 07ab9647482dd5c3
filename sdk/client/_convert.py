"""What the sync and asyncio clients share: arrays in, typed results out, errors, channel
options. numpy and the generated protocol only; no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from odeserve.v1 import odeserve_pb2 as pb

SERVICE = "odeserve.v1.Inference"
STATUS_NAMES = {value: name.removeprefix("SOLVE_STATUS_") for name, value in pb.SolveStatus.items()}
_DTYPES = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


class OdeServeError(Exception):
    """A failed call: ``code`` is the gRPC status code name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


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


@dataclass(frozen=True)
class Items:
    """Per item: function evaluations and how the solve ended ("SUCCESS", "MAX_NFE", ...)."""

    nfe: np.ndarray
    status: list[str]

    @property
    def all_succeeded(self) -> bool:
        return all(s == "SUCCESS" for s in self.status)


@dataclass(frozen=True)
class Timing:
    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True)
class ClassifyResult:
    labels: np.ndarray  # [N] int; -1 where the solve failed
    probabilities: np.ndarray  # [N, 10]
    items: Items
    timing: Timing
    model_version: str


@dataclass(frozen=True)
class SampleResult:
    points: np.ndarray  # [n, D]
    log_density: np.ndarray  # [n]
    items: Items
    timing: Timing
    model_version: str


@dataclass(frozen=True)
class LogDensityResult:
    log_density: np.ndarray  # [N]
    items: Items
    timing: Timing
    model_version: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    kind: str
    task: str
    default_tol: float
    device: str
    card: dict = field(repr=False)


def open_channel(grpc_module, target: str, tls: TLS | bool | None, max_message_bytes: int, retries: int,
                 load_balancing: str = "pick_first"):  # fmt: skip
    """A channel from ``grpc`` or ``grpc.aio``, secure when ``tls`` is given."""
    options = channel_options(max_message_bytes, retries, load_balancing)
    if tls:
        credentials = (tls if isinstance(tls, TLS) else TLS()).credentials()
        return grpc_module.secure_channel(target, credentials, options=options)
    return grpc_module.insecure_channel(target, options=options)


def channel_options(max_message_bytes: int, retries: int, load_balancing: str = "pick_first") -> list[tuple[str, object]]:
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
        ]
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


def metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def to_error(error: grpc.RpcError) -> OdeServeError:
    return OdeServeError(error.code().name, error.details() or "")


def encode(array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    for name, dtype in _DTYPES.items():
        if array.dtype.newbyteorder("<") == dtype:  # any byte order in; little-endian out
            return pb.Tensor(dtype=name, shape=list(array.shape), data=array.astype(dtype, copy=False).tobytes())
    raise TypeError(f"arrays must be uint8, float32 or float64, got {array.dtype}")


def decode(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=_DTYPES[tensor.dtype]).reshape(list(tensor.shape)).copy()


def images_tensor(images) -> pb.Tensor:
    array = np.asarray(images)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return encode(array)


def points_tensor(points) -> pb.Tensor:
    array = np.asarray(points)
    if array.dtype.kind != "f":
        array = array.astype(np.float32)
    return encode(array)


def accuracy(tol, rtol, atol, method, max_nfe) -> pb.Accuracy:
    return pb.Accuracy(tol=tol or 0.0, rtol=rtol or 0.0, atol=atol or 0.0, method=method or "", max_nfe=max_nfe or 0)


def items(message: pb.ItemStats) -> Items:
    return Items(np.asarray(message.nfe, dtype=np.int64), [STATUS_NAMES[s] for s in message.status])


def timing(message: pb.Timing) -> Timing:
    return Timing(message.queue_seconds, message.compute_seconds)


def classify_result(response: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(np.asarray(response.labels, dtype=np.int64), decode(response.probabilities),
                          items(response.items), timing(response.timing), response.model_version)  # fmt: skip


def sample_result(response: pb.SampleResponse) -> SampleResult:
    return SampleResult(decode(response.points), decode(response.log_density), items(response.items),
                        timing(response.timing), response.model_version)  # fmt: skip


def log_density_result(response: pb.LogDensityResponse) -> LogDensityResult:
    return LogDensityResult(decode(response.log_density), items(response.items), timing(response.timing),
                            response.model_version)  # fmt: skip


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(message.name, message.version, message.kind, message.task, message.default_tol, message.device,
                     json.loads(message.card_json or "{}"))  # fmt: skip
