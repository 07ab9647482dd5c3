from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SolveStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOLVE_STATUS_UNSPECIFIED: _ClassVar[SolveStatus]
    SOLVE_STATUS_SUCCESS: _ClassVar[SolveStatus]
    SOLVE_STATUS_MAX_STEPS: _ClassVar[SolveStatus]
    SOLVE_STATUS_MAX_NFE: _ClassVar[SolveStatus]
    SOLVE_STATUS_STEP_SIZE_UNDERFLOW: _ClassVar[SolveStatus]
    SOLVE_STATUS_NON_FINITE: _ClassVar[SolveStatus]
SOLVE_STATUS_UNSPECIFIED: SolveStatus
SOLVE_STATUS_SUCCESS: SolveStatus
SOLVE_STATUS_MAX_STEPS: SolveStatus
SOLVE_STATUS_MAX_NFE: SolveStatus
SOLVE_STATUS_STEP_SIZE_UNDERFLOW: SolveStatus
SOLVE_STATUS_NON_FINITE: SolveStatus

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Accuracy(_message.Message):
    __slots__ = ("tol", "rtol", "atol", "method", "max_nfe", "auto_tol", "latency_target_seconds", "precision")
    TOL_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_NFE_FIELD_NUMBER: _ClassVar[int]
    AUTO_TOL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_TARGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    tol: float
    rtol: float
    atol: float
    method: str
    max_nfe: int
    auto_tol: bool
    latency_target_seconds: float
    precision: str
    def __init__(self, tol: _Optional[float] = ..., rtol: _Optional[float] = ..., atol: _Optional[float] = ..., method: _Optional[str] = ..., max_nfe: _Optional[int] = ..., auto_tol: _Optional[bool] = ..., latency_target_seconds: _Optional[float] = ..., precision: _Optional[str] = ...) -> None: ...

class Scheduling(_message.Message):
    __slots__ = ("priority", "max_total_nfe")
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_NFE_FIELD_NUMBER: _ClassVar[int]
    priority: int
    max_total_nfe: int
    def __init__(self, priority: _Optional[int] = ..., max_total_nfe: _Optional[int] = ...) -> None: ...

class Solved(_message.Message):
    __slots__ = ("rtol", "atol", "method", "preemptions", "precision")
    RTOL_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    rtol: float
    atol: float
    method: str
    preemptions: int
    precision: str
    def __init__(self, rtol: _Optional[float] = ..., atol: _Optional[float] = ..., method: _Optional[str] = ..., preemptions: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...

class ItemStats(_message.Message):
    __slots__ = ("nfe", "status")
    NFE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    nfe: _containers.RepeatedScalarFieldContainer[int]
    status: _containers.RepeatedScalarFieldContainer[SolveStatus]
    def __init__(self, nfe: _Optional[_Iterable[int]] = ..., status: _Optional[_Iterable[_Union[SolveStatus, str]]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_seconds", "compute_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    compute_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "images", "accuracy", "scheduling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    images: Tensor
    accuracy: Accuracy
    scheduling: Scheduling
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., accuracy: _Optional[_Union[Accuracy, _Mapping]] = ..., scheduling: _Optional[_Union[Scheduling, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("labels", "probabilities", "items", "timing", "model_version", "solved")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOLVED_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    probabilities: Tensor
    items: ItemStats
    timing: Timing
    model_version: str
    solved: Solved
    def __init__(self, labels: _Optional[_Iterable[int]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., items: _Optional[_Union[ItemStats, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., model_version: _Optional[str] = ..., solved: _Optional[_Union[Solved, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("model", "version", "n", "seed", "accuracy", "scheduling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    n: int
    seed: int
    accuracy: Accuracy
    scheduling: Scheduling
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., accuracy: _Optional[_Union[Accuracy, _Mapping]] = ..., scheduling: _Optional[_Union[Scheduling, _Mapping]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("points", "log_density", "items", "timing", "model_version", "solved")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    LOG_DENSITY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOLVED_FIELD_NUMBER: _ClassVar[int]
    points: Tensor
    log_density: Tensor
    items: ItemStats
    timing: Timing
    model_version: str
    solved: Solved
    def __init__(self, points: _Optional[_Union[Tensor, _Mapping]] = ..., log_density: _Optional[_Union[Tensor, _Mapping]] = ..., items: _Optional[_Union[ItemStats, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., model_version: _Optional[str] = ..., solved: _Optional[_Union[Solved, _Mapping]] = ...) -> None: ...

class LogDensityRequest(_message.Message):
    __slots__ = ("model", "version", "points", "accuracy", "scheduling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    points: Tensor
    accuracy: Accuracy
    scheduling: Scheduling
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., points: _Optional[_Union[Tensor, _Mapping]] = ..., accuracy: _Optional[_Union[Accuracy, _Mapping]] = ..., scheduling: _Optional[_Union[Scheduling, _Mapping]] = ...) -> None: ...

class LogDensityResponse(_message.Message):
    __slots__ = ("log_density", "items", "timing", "model_version", "solved")
    LOG_DENSITY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOLVED_FIELD_NUMBER: _ClassVar[int]
    log_density: Tensor
    items: ItemStats
    timing: Timing
    model_version: str
    solved: Solved
    def __init__(self, log_density: _Optional[_Union[Tensor, _Mapping]] = ..., items: _Optional[_Union[ItemStats, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., model_version: _Optional[str] = ..., solved: _Optional[_Union[Solved, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "task", "card_json", "default_tol", "device", "signatures", "limits", "tensor_encoding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ENCODING_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    kind: str
    task: str
    card_json: str
    default_tol: float
    device: str
    signatures: _containers.RepeatedCompositeFieldContainer[RpcSignature]
    limits: Limits
    tensor_encoding: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., task: _Optional[str] = ..., card_json: _Optional[str] = ..., default_tol: _Optional[float] = ..., device: _Optional[str] = ..., signatures: _Optional[_Iterable[_Union[RpcSignature, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., tensor_encoding: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtypes", "shape", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    shape: _containers.RepeatedScalarFieldContainer[int]
    description: str
    def __init__(self, name: _Optional[str] = ..., dtypes: _Optional[_Iterable[str]] = ..., shape: _Optional[_Iterable[int]] = ..., description: _Optional[str] = ...) -> None: ...

class RpcSignature(_message.Message):
    __slots__ = ("rpc", "inputs", "outputs")
    RPC_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    rpc: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, rpc: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("min_tol", "max_tol", "max_items_per_request", "max_nfe", "max_request_nfe", "priority_levels", "default_priority", "methods")
    MIN_TOL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOL_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_NFE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_NFE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    min_tol: float
    max_tol: float
    max_items_per_request: int
    max_nfe: int
    max_request_nfe: int
    priority_levels: int
    default_priority: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, min_tol: _Optional[float] = ..., max_tol: _Optional[float] = ..., max_items_per_request: _Optional[int] = ..., max_nfe: _Optional[int] = ..., max_request_nfe: _Optional[int] = ..., priority_levels: _Optional[int] = ..., default_priority: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...
