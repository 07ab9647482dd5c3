"""The model card: what a checkpoint says about its model, typed, and checked on construction.

A card is a JSON object on disk (``neuralode.checkpoint`` stores it next to the weights) and a
:class:`ModelCard` in memory. ``ModelCard.from_dict`` reads one, ``to_dict`` gives the very
object back: a card read and written again is the same JSON, old cards included.

- Fields this project reads or writes are typed; a section of the card is a dataclass where it
  is one concept (``training``, ``metrics`` and its table rows, a CNF's ``directions``,
  ``dataset``, ``tuned``). ``hyper`` stays an object of constructor arguments: its fields are
  the model kind's (``neuralode.models.registry`` builds from it), and typing it would need a
  switch on the kind. ``input`` stays an object too (an image's shape for a classifier, a
  dimension for a density: again a switch, on the task), as do the regularisation weights (a
  weight per regulariser, by name) and the training's error curve.
- A key absent from the file stays absent, a ``null`` stays ``null``: a field left out of the
  constructor (or missing from the file) is ``None`` (an empty section, an empty table) to
  readers and is left out of ``to_dict``; one given as ``None`` is written as ``null``.
- Keys this project does not know (a newer writer's, say) are kept in each record's ``extra``
  and written back unchanged, so copying a card (``training tune``) never drops them.
- Nothing in a card is trusted before it is checked: constructing a :class:`ModelCard` (from a
  file or in code) checks every typed field's type and range and raises :class:`CardError`
  naming the first field that is not what this project reads there. Hyper-parameters are small
  numbers, short strings or short lists of them (a layer width is at most ``MAX_HYPER_INT``).

Records are frozen; change one with ``replace`` (``dataclasses.replace`` would forget which
fields were absent).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Self

from .models.registry import kinds
from .precision import PRECISIONS
from .solvers import METHODS

MAX_HYPER_INT = 4096
"""The largest integer a card's ``hyper`` may hold (a layer width, a dimension, a count)."""
MAX_HYPER_LIST = 64
"""The longest list a card's ``hyper`` may hold (say, the hidden layers' widths)."""
MAX_HYPER_TEXT = 64
"""The longest string a card's ``hyper`` may hold (a solver or trace name)."""
MAX_TABLE_ROWS = 64
"""The most rows of a card's evaluation table (``metrics.table``)."""


class CardError(ValueError):
    """A model card field is not what this project reads there (the message names it)."""


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()
"""A field's value when it was not given: read as None (an empty section), left out of the JSON."""


# ---- field checks: each takes (path, value) and raises CardError; None is always allowed ----
def _shown(value: Any) -> str:
    """A value from a card, quoted short (a card is outside input)."""
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _positive(path: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise CardError(f"{path} must be a positive number, got {_shown(value)}")


def _number(path: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CardError(f"{path} must be a number, got {_shown(value)}")


def _integer(path: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CardError(f"{path} must be an integer, got {_shown(value)}")


def _text(path: str, value: Any) -> None:
    if not isinstance(value, str):
        raise CardError(f"{path} must be a string, got {_shown(value)}")


def _flag(path: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise CardError(f"{path} must be true or false, got {_shown(value)}")


def _precision(path: str, value: Any) -> None:
    if value not in PRECISIONS:
        raise CardError(f"{path} must be one of {', '.join(PRECISIONS)}, got {_shown(value)}")


def _object(path: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise CardError(f"{path} must be an object, got {_shown(value)}")


def _numbers(path: str, value: Any) -> None:
    """An object of numbers by name (regularisation weights, peak memory by kind)."""
    _object(path, value)
    for key, entry in value.items():
        _number(f"{path}.{str(key)[:MAX_HYPER_TEXT]}", entry)


def _objects(path: str, value: Any) -> None:
    """A list of objects (the training's error curve)."""
    if not isinstance(value, list):
        raise CardError(f"{path} must be a list, got {_shown(value)}")
    for index, entry in enumerate(value):
        _object(f"{path}[{index}]", entry)


def _typed(check: Callable[[str, Any], None] | None = None, *, key: str | None = None, null: bool = True) -> Any:
    """A record field: None when absent, ``check``ed when given (a given null only where
    ``null`` is false), stored under ``key`` (its name by default)."""
    return field(default=ABSENT, metadata={"check": check, "key": key, "empty": None, "null": null})


# ---- records --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Record:
    """A JSON object with typed fields, the keys this project does not know in ``extra``."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)
    """Keys of the object that are no field of the record, kept as they are."""
    absent: frozenset[str] = field(default=frozenset(), init=False, repr=False)
    """The fields that were not given (left out of ``to_dict``)."""

    def __post_init__(self) -> None:
        absent = set()
        for spec in _fields(type(self)):
            if getattr(self, spec.name) is ABSENT:
                absent.add(spec.name)
                empty = spec.metadata["empty"]
                object.__setattr__(self, spec.name, None if empty is None else empty())
        object.__setattr__(self, "absent", frozenset(absent))

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Self:
        """The record of the JSON object ``data`` found at ``path`` (for messages)."""
        _object(path, data)
        values, known = {}, set()
        for spec in _fields(cls):
            key = spec.metadata["key"] or spec.name
            known.add(key)
            if key in data:
                values[spec.name] = _parse(spec, data[key], f"{path}.{key}")
        return cls(**values, extra={key: copy.deepcopy(value) for key, value in data.items() if key not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the given fields under their keys, then ``extra``."""
        out = {
            spec.metadata["key"] or spec.name: _dumped(getattr(self, spec.name))
            for spec in _fields(type(self))
            if spec.name not in self.absent
        }
        return out | copy.deepcopy(self.extra)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (``ABSENT`` removes a field); the other absent fields stay absent."""
        kept = {name: ABSENT for name in self.absent if name not in changes}
        return _replace(self, **kept, **changes)

    def updated(self, other: Self) -> Self:
        """``other``'s given fields and extra keys over this record's, as ``{**self, **other}``."""
        given = {spec.name: getattr(other, spec.name) for spec in _fields(type(self)) if spec.name not in other.absent}
        return self.replace(**given, extra={**self.extra, **other.extra})

    def check(self, path: str) -> None:
        """Raise :class:`CardError` naming the first field that is not what this project reads."""
        for spec in _fields(type(self)):
            value, where = getattr(self, spec.name), f"{path}.{spec.metadata['key'] or spec.name}"
            if "parse" in spec.metadata:  # a section, or a list of records
                _check_records(spec, where, value)
            elif spec.metadata["check"] is not None and (value is not None or not spec.metadata["null"]):
                if spec.name not in self.absent:
                    spec.metadata["check"](where, value)


def _fields(cls: type) -> list:
    return [spec for spec in fields(cls) if spec.init and spec.name != "extra"]


def _replace(record: _Record, **changes: Any) -> Any:
    extra = changes.pop("extra", record.extra)
    values = {spec.name: getattr(record, spec.name) for spec in _fields(type(record))}
    return type(record)(**(values | changes), extra=extra)


def _check_records(spec, path: str, value: Any) -> None:
    kind, limit = spec.metadata["empty"], spec.metadata.get("limit")
    if kind is tuple:
        if not isinstance(value, tuple) or (limit is not None and len(value) > limit):
            raise CardError(f"{path} must be a list" + (f" of at most {limit} rows" if limit is not None else ""))
        for index, row in enumerate(value):
            if not isinstance(row, _Record):
                raise CardError(f"{path}[{index}] must be an object, got {_shown(row)}")
            row.check(f"{path}[{index}]")
    elif isinstance(value, kind):
        value.check(path)
    else:
        raise CardError(f"{path} must be an object, got {_shown(value)}")


def _parse(spec, value: Any, path: str) -> Any:
    """A field's value from JSON: a record for a section, records for a table; as is otherwise."""
    parse = spec.metadata.get("parse")
    return copy.deepcopy(value) if parse is None or value is None else parse(value, path)


def _dumped(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_dumped(entry) for entry in value]
    return copy.deepcopy(value)


def _section(cls: type[_Record]) -> Any:
    """A field holding a record (an empty one when absent)."""
    return field(default=ABSENT, metadata={"check": None, "key": None, "empty": cls, "parse": cls.from_dict})


def _rows(cls: type[_Record], limit: int | None = None) -> Any:
    """A field holding a list of records (an empty tuple when absent)."""

    def parse(value: Any, path: str) -> tuple:
        if not isinstance(value, list) or (limit is not None and len(value) > limit):
            raise CardError(f"{path} must be a list" + (f" of at most {limit} rows" if limit is not None else ""))
        return tuple(cls.from_dict(row, f"{path}[{index}]") for index, row in enumerate(value))

    return field(default=ABSENT, metadata={"check": None, "key": None, "empty": tuple, "parse": parse, "limit": limit})


@dataclass(frozen=True)
class Dataset(_Record):
    """What the model was trained and measured on."""

    name: str | None = _typed(_text)
    """"MNIST", a toy density's name, or "energy U1" … for an energy target."""
    train_images: int | None = _typed(_integer)
    test_images: int | None = _typed(_integer)
    augmentation: str | None = _typed(_text)
    test_points: int | None = _typed(_integer)
    test_seed: int | None = _typed(_integer)


@dataclass(frozen=True)
class Training(_Record):
    """The recipe and what running it took. ``tol`` is the server's default tolerance."""

    command: str | None = _typed(_text)
    objective: str | None = _typed(_text)
    tol: float | None = _typed(_positive)
    method: str | None = _typed(_text)
    adjoint: bool | None = _typed(_flag)
    epochs: int | None = _typed(_integer)
    steps: int | None = _typed(_integer)
    batch_size: int | None = _typed(_integer)
    world_size: int | None = _typed(_integer)
    preset: str | None = _typed(_text)
    time_budget_s: float | None = _typed(_number)
    tf32: bool | None = _typed(_flag)
    precision: str | None = _typed(_text)
    """What f (and ODE-Net's downsampling and head) was evaluated in during training; None: float32."""
    optimizer: str | None = _typed(_text)
    lr: float | None = _typed(_number)
    weight_decay: float | None = _typed(_number)
    warmup: float | None = _typed(_number)
    seed: int | None = _typed(_integer)
    device: str | None = _typed(_text)
    regularisation: dict[str, float] | None = _typed(_numbers)
    """Each regulariser's weight by name (``Regularisation.card()``); None for a model without one."""
    duration_s: float | None = _typed(_number)
    sittings: int | None = _typed(_integer)
    images_per_s: float | None = _typed(_number)
    peak_memory_mib: dict[str, float] | None = _typed(_numbers)
    """``host_rss`` and, on a GPU, ``cuda_allocated``."""
    test_error_history: list[dict[str, Any]] | None = _typed(_objects)
    """The test error after each evaluated epoch: ``epoch``, ``step``, ``test_error``, ``elapsed_s``."""


@dataclass(frozen=True)
class TableRow(_Record):
    """One tolerance of the evaluation table (``tol`` None: a model without an ODE). A
    classifier's rows carry ``test_error``, a density's ``test_log_likelihood`` or, for an
    energy target, ``kl_plus_log_z``."""

    tol: float | None = _typed(_positive)
    nfe_mean: float | None = _typed(_positive)
    nfe_max: int | None = _typed(_integer)
    time_per_1000_s: float | None = _typed(_number)
    test_error: float | None = _typed(_number)
    test_log_likelihood: float | None = _typed(_number)
    kl_plus_log_z: float | None = _typed(_number)


@dataclass(frozen=True)
class DirectionRow(_Record):
    """One tolerance of a CNF's error in both directions it is served, per point, against ``reference_tol``."""

    tol: float | None = _typed(_positive)
    back_nfe_mean: float | None = _typed(_number)
    back_log_density_error: float | None = _typed(_number)
    forward_nfe_mean: float | None = _typed(_number)
    forward_log_density_error: float | None = _typed(_number)


@dataclass(frozen=True)
class Directions(_Record):
    """What each tolerance buys a CNF's client back from the data (``LogDensity``) and forward
    from the base (``Sample``)."""

    reference_tol: float | None = _typed(_positive)
    points: int | None = _typed(_integer)
    rows: tuple[DirectionRow, ...] = _rows(DirectionRow, MAX_TABLE_ROWS)


@dataclass(frozen=True)
class PrecisionRow(_Record):
    """One tolerance measured with f in one precision (``training tune --precision-table``),
    beside float32 on the same data; on a bfloat16 row, ``matches_float32`` says whether it gave
    float32's answers there (the server's ``precision=auto`` reads it). A classifier's rows carry
    the table's fields, a CNF's its directions' fields."""

    tol: float | None = _typed(_positive)
    precision: str | None = _typed(_precision)
    matches_float32: bool | None = _typed(_flag)
    nfe_mean: float | None = _typed(_positive)
    nfe_max: int | None = _typed(_integer)
    time_per_1000_s: float | None = _typed(_number)
    test_error: float | None = _typed(_number)
    back_nfe_mean: float | None = _typed(_number)
    back_log_density_error: float | None = _typed(_number)
    forward_nfe_mean: float | None = _typed(_number)
    forward_log_density_error: float | None = _typed(_number)


@dataclass(frozen=True)
class Metrics(_Record):
    """The model measured on held-out data: the headline figure at the training tolerance and
    the table over tolerances (the server's expected NFE and ``auto`` tolerances come from it)."""

    test_error: float | None = _typed(_number)
    test_log_likelihood: float | None = _typed(_number)
    kl_plus_log_z: float | None = _typed(_number)
    final_train_loss: float | None = _typed(_number)
    table: tuple[TableRow, ...] = _rows(TableRow, MAX_TABLE_ROWS)
    directions: Directions = _section(Directions)
    precision_table: tuple[PrecisionRow, ...] = _rows(PrecisionRow, MAX_TABLE_ROWS)
    eval_device: str | None = _typed(_text)


@dataclass(frozen=True)
class Tuned(_Record):
    """For a copy made by ``training tune``: what it was tuned from (``file``, ``sha256``,
    ``code_version``, ``created``; the JSON key is ``from``) and how."""

    source: dict[str, Any] | None = _typed(_object, key="from")
    settings: dict[str, Any] | None = _typed(_object)
    command: str | None = _typed(_text)
    date: str | None = _typed(_text)


@dataclass(frozen=True)
class ModelCard(_Record):
    """A checkpoint's model card; see the module's docstring. ``kind`` and ``hyper`` say how to
    rebuild the model (``build_model(card.kind, card.hyper)``)."""

    kind: str = _typed()
    hyper: dict[str, Any] = _typed()
    """The kind's constructor arguments (a solver's ``method``, ``tol``, ``first_step`` among them)."""
    task: str | None = _typed(_text)
    input: dict[str, Any] | None = _typed(_object, null=False)
    dataset: Dataset = _section(Dataset)
    training: Training = _section(Training)
    metrics: Metrics = _section(Metrics)
    parameters: int | None = _typed(_integer)
    created: str | None = _typed(_text)
    code_version: str | None = _typed(_text)
    tuned: Tuned = _section(Tuned)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("card")

    @classmethod
    def from_dict(cls, data: Any, path: str = "card") -> Self:
        """The card of a JSON object; :class:`CardError` names the first field that is not
        what this project reads there."""
        if not isinstance(data, dict):
            raise CardError(f"{path} must be an object, got {_shown(data)}")
        _check_kind(data.get("kind"))
        _check_hyper(data.get("hyper"))
        return super().from_dict(data, path)

    def check(self, path: str = "card") -> None:
        """``kind`` (a known kind), ``hyper`` (small numbers, short strings, short lists; a
        positive ``tol`` and ``first_step``, a known ``method``), then every typed field: among
        them ``training.tol`` (a positive number, the server's default tolerance) and
        ``metrics.table`` (rows whose ``tol`` and ``nfe_mean`` are positive numbers or null)."""
        _check_kind(self.kind)
        _check_hyper(self.hyper)
        super().check(path)

    @property
    def method(self) -> str | None:
        """The solver the model solves with (and its table was measured with), if it has an ODE."""
        return self.hyper.get("method")


def _check_kind(kind: Any) -> None:
    if not isinstance(kind, str) or kind not in kinds():
        raise CardError(
            f"card.kind: unknown model kind {_shown(None if kind is ABSENT else kind)}; known: {', '.join(kinds())}"
        )


def _check_hyper(hyper: Any) -> None:
    if not isinstance(hyper, dict):
        raise CardError(
            f"card.hyper must be an object of constructor arguments, got {_shown(None if hyper is ABSENT else hyper)}"
        )
    for key, value in hyper.items():
        _check_hyper_value(f"card.hyper.{str(key)[:MAX_HYPER_TEXT]}", value, nested=False)
    for key in ("tol", "first_step"):
        if hyper.get(key) is not None:
            _positive(f"card.hyper.{key}", hyper[key])
    if hyper.get("method") is not None and hyper["method"] not in METHODS:
        raise CardError(f"card.hyper.method must be a known solver, got {_shown(hyper['method'])}")


def _check_hyper_value(path: str, value: Any, *, nested: bool) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_HYPER_INT:
            raise CardError(f"{path} must be at most {MAX_HYPER_INT} in magnitude, got {value}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CardError(f"{path} must be a finite number, got {value}")
    elif isinstance(value, str):
        if len(value) > MAX_HYPER_TEXT:
            raise CardError(f"{path} must be at most {MAX_HYPER_TEXT} characters long")
    elif isinstance(value, list) and not nested:
        if len(value) > MAX_HYPER_LIST:
            raise CardError(f"{path} must be a list of at most {MAX_HYPER_LIST} entries, got {len(value)}")
        for index, entry in enumerate(value):
            _check_hyper_value(f"{path}[{index}]", entry, nested=True)
    else:
        raise CardError(f"{path} must be a number, a string or a list of them, got {_shown(value)}")
