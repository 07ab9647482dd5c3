"""The protocol-neutral inference API: what every wire protocol translates to and from.

A wire protocol (``odeserve.v1``, the Open Inference Protocol) only decodes its messages into
an :class:`InferenceRequest` and encodes an :class:`InferenceResult` back; validation, limits,
scheduling, auth and metrics exist once, behind these types. No gRPC, no torch here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

MAX_QUOTED = 64
"""Characters of a client-chosen string that an error message may quote."""


class Code(enum.Enum):
    """Request outcomes, named as gRPC status codes (each protocol maps them to its own)."""

    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class RequestError(Exception):
    """A request that cannot be served, with the code and a message naming the field."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> RequestError:
    return RequestError(Code.INVALID_ARGUMENT, message)


def quoted(value: str) -> str:
    """``repr`` of a client-chosen string, cut to a short prefix: a message never echoes more
    than ``MAX_QUOTED`` characters of what a client sent."""
    if len(value) <= MAX_QUOTED:
        return repr(value)
    return f"{value[:MAX_QUOTED]!r}… ({len(value)} characters)"


class Task(enum.Enum):
    """What a served model answers."""

    CLASSIFY = "classify"
    DENSITY = "density"


class Kind(enum.Enum):
    """What one item asks of a model: each is an ODE solve per item."""

    CLASSIFY = "classify"
    SAMPLE = "sample"
    LOG_DENSITY = "log_density"

    @property
    def task(self) -> Task:
        return Task.CLASSIFY if self is Kind.CLASSIFY else Task.DENSITY


class SolveStatus(enum.IntEnum):
    """How an item's solve ended; the values are ``odeserve.v1.SolveStatus`` and
    ``neuralode.solvers.Status`` (a test pins all three together)."""

    SUCCESS = 1
    MAX_STEPS = 2
    MAX_NFE = 3
    STEP_SIZE_UNDERFLOW = 4
    NON_FINITE = 5


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a kind: its name, accepted dtypes, shape (-1: any length) and
    what it means, for model metadata any client can read; an ``optional`` input may be left
    out (the model's default applies)."""

    name: str
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    description: str
    optional: bool = False


@dataclass(frozen=True)
class Signature:
    kind: Kind
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Accuracy:
    """As the client asked; zero means "not set" (the model's or server's default)."""

    tol: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    method: str = ""
    max_nfe: int = 0
    auto_tol: bool = False
    latency_target_seconds: float = 0.0
    precision: str = ""  # "" is "auto"


@dataclass(frozen=True)
class Scheduling:
    """As the client asked; zero means "not set"."""

    priority: int = 0
    max_total_nfe: int = 0


@dataclass(frozen=True)
class InferenceRequest:
    """``inputs`` decodes the request's arrays (by the signature's input names; scalars as 0-d
    arrays) when the service asks, after the model and settings were checked: so every
    protocol reports a request's problems in the same order, with the same messages."""

    kind: Kind
    model: str
    version: str
    inputs: Callable[[], Mapping[str, np.ndarray]]
    accuracy: Accuracy = Accuracy()
    scheduling: Scheduling = Scheduling()


@dataclass(frozen=True)
class Solved:
    """The accuracy the items were solved with (the precision f was evaluated in included),
    and how often they were parked."""

    rtol: float
    atol: float
    method: str
    preemptions: int
    precision: str


@dataclass(frozen=True)
class Timeline:
    """When a request passed each stage, on the engine's clock (``time.monotonic`` in a
    server): submitted to the engine, its first items admitted to the batch, the end of the
    step they joined in (encoding and first evaluations), its last item finished. Kept so that
    traces are built after the fact, with nothing timed per solver step."""

    submitted: float
    started: float
    joined: float
    finished: float


@dataclass(frozen=True)
class InferenceResult:
    model: str
    model_version: str
    outputs: dict[str, np.ndarray]  # by the signature's output names, item-major
    nfe: np.ndarray  # [N] uint32
    status: np.ndarray  # [N] SolveStatus values
    queue_seconds: float
    compute_seconds: float
    solved: Solved
    steps: np.ndarray | None = None  # [N] accepted solver steps; None: not measured
    timeline: Timeline | None = None


@dataclass(frozen=True)
class Caller:
    """Who sent a call, as the front end identified them: ``key`` names them for fair
    admission (never a secret); ``max_priority`` is the most urgent level they may ask for
    (None: the server's ``default_priority``)."""

    key: str = ""
    max_priority: int | None = None


NO_MODEL = "none"
"""The model label of calls about no model (ListModels, the Open Inference server calls)."""


@dataclass
class CallRecord:
    """What a call resolved to, for metrics and traces: label values only ever from closed sets
    (known RPC names, served model names, served methods), filled in as the call is validated."""

    rpc: str
    request_id: str = ""  # names the call in logs, traces and response metadata (bounded)
    model: str = "unknown"  # a call naming no served model; NO_MODEL for RPCs that name none
    method: str = "none"
    precision: str = "none"
    priority: int | None = None
    result: InferenceResult | None = None
    expected_nfe: float | None = None
    auto_tol: float | None = None
