"""Checkpoints: weights plus a model card, in one file, loaded without executing any code.

The file is a ``torch.save`` of ``{"format", "card" (a JSON string), "state_dict"}`` and is
read with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain
containers: a file carrying a pickled object (the classic code-execution payload) is refused
before anything runs. The card says how to rebuild the model; the weights must then fit it
exactly, or loading fails with the names of what does not match.

Nothing in a card is trusted before it is checked (:func:`check_card`): the fields this project
reads have their types and ranges checked, hyper-parameters are small numbers, short strings or
short lists of them (a layer width is at most ``MAX_HYPER_INT``), and the model is first built
on the ``meta`` device — no memory — so a card whose architecture does not fit its weights is
refused before anything of its size is allocated.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.registry import build_model, kinds
from .precision import PRECISIONS
from .solvers import METHODS

FORMAT = "odeserve-checkpoint/1"
MAX_HYPER_INT = 4096
"""The largest integer a card's ``hyper`` may hold (a layer width, a dimension, a count)."""
MAX_HYPER_LIST = 64
"""The longest list a card's ``hyper`` may hold (say, the hidden layers' widths)."""
MAX_HYPER_TEXT = 64
"""The longest string a card's ``hyper`` may hold (a solver or trace name)."""
MAX_TABLE_ROWS = 64
"""The most rows of a card's evaluation table (``metrics.table``)."""


class CheckpointError(ValueError):
    """The file is not a checkpoint we can load safely, or its card and weights disagree."""


@dataclass(frozen=True)
class Checkpoint:
    card: dict[str, Any]
    model: nn.Module

    @property
    def kind(self) -> str:
        return self.card["kind"]


def save_checkpoint(path: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``card`` (which must name ``kind`` and ``hyper``)."""
    for key in ("kind", "hyper"):
        if key not in card:
            raise ValueError(f"a model card needs {key!r}")
    card = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "code_version": code_version(), **card}
    card.setdefault("parameters", sum(p.numel() for p in model.parameters()))
    payload = {
        "format": FORMAT,
        "card": json.dumps(card, sort_keys=True),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # readers never see a half-written file
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    return _read(Path(path))[0]


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", overrides: dict[str, Any] | None = None
) -> Checkpoint:
    """Rebuild the model a card describes and load its weights, in eval mode.

    ``overrides`` change constructor settings of the card's ``hyper`` that leave the weights
    as they are (a solver setting such as ``first_step``); the returned card says so."""
    path = Path(path)
    card, state_dict = _read(path)
    if overrides:
        card = {**card, "hyper": {**card.get("hyper", {}), **overrides}}
    try:
        check_card(card)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    try:
        with torch.device("meta"):  # shapes only: nothing of the card's size is allocated yet
            skeleton = build_model(card["kind"], card["hyper"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the model card does not describe a model we can build: {error}") from None
    problem = _misfit(skeleton.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"{path}: weights do not match the model card ({card['kind']}): {problem}")
    model = build_model(card["kind"], card["hyper"])
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(f"{path}: weights do not match the model card ({card['kind']}): {detail}") from None
    return Checkpoint(card=card, model=model.to(device).eval())


def check_card(card: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of ``card`` that is not what this project
    reads there: ``kind`` (a known kind), ``hyper`` (small numbers, short strings, short lists;
    a positive ``tol`` and ``first_step``, a known ``method``), ``training.tol`` (a positive
    number, the server's default tolerance), ``metrics.table`` (rows whose ``tol`` and
    ``nfe_mean`` are positive numbers or null) and ``metrics.precision_table`` (the same, and a
    known ``precision`` and a boolean ``matches_float32``)."""
    if not isinstance(card.get("kind"), str) or card["kind"] not in kinds():
        raise ValueError(f"card.kind: unknown model kind {_shown(card.get('kind'))}; known: {', '.join(kinds())}")
    hyper = card.get("hyper")
    if not isinstance(hyper, dict):
        raise ValueError(f"card.hyper must be an object of constructor arguments, got {_shown(hyper)}")
    for key, value in hyper.items():
        _check_hyper(f"card.hyper.{str(key)[:MAX_HYPER_TEXT]}", value, nested=False)
    for key in ("tol", "first_step"):
        if hyper.get(key) is not None:
            _positive(f"card.hyper.{key}", hyper[key])
    if hyper.get("method") is not None and hyper["method"] not in METHODS:
        raise ValueError(f"card.hyper.method must be a known solver, got {_shown(hyper['method'])}")
    for section in ("training", "metrics", "dataset", "input"):
        if section in card and not isinstance(card[section], dict):
            raise ValueError(f"card.{section} must be an object, got {_shown(card[section])}")
    training = card.get("training", {})
    if training.get("tol") is not None:
        _positive("card.training.tol", training["tol"])
    for name in ("table", "precision_table"):
        _check_table(f"card.metrics.{name}", card.get("metrics", {}).get(name, []))


def _check_table(field: str, table: Any) -> None:
    if not isinstance(table, list) or len(table) > MAX_TABLE_ROWS:
        raise ValueError(f"{field} must be a list of at most {MAX_TABLE_ROWS} rows")
    for index, row in enumerate(table):
        if not isinstance(row, dict):
            raise ValueError(f"{field}[{index}] must be an object, got {_shown(row)}")
        for key in ("tol", "nfe_mean"):
            if row.get(key) is not None:
                _positive(f"{field}[{index}].{key}", row[key])
        if "precision" in row and row["precision"] not in PRECISIONS:
            raise ValueError(
                f"{field}[{index}].precision must be one of {', '.join(PRECISIONS)}, got {_shown(row['precision'])}"
            )
        if "matches_float32" in row and not isinstance(row["matches_float32"], bool):
            raise ValueError(
                f"{field}[{index}].matches_float32 must be true or false, got {_shown(row['matches_float32'])}"
            )


def _check_hyper(field: str, value: Any, *, nested: bool) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_HYPER_INT:
            raise ValueError(f"{field} must be at most {MAX_HYPER_INT} in magnitude, got {value}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{field} must be a finite number, got {value}")
    elif isinstance(value, str):
        if len(value) > MAX_HYPER_TEXT:
            raise ValueError(f"{field} must be at most {MAX_HYPER_TEXT} characters long")
    elif isinstance(value, list) and not nested:
        if len(value) > MAX_HYPER_LIST:
            raise ValueError(f"{field} must be a list of at most {MAX_HYPER_LIST} entries, got {len(value)}")
        for index, entry in enumerate(value):
            _check_hyper(f"{field}[{index}]", entry, nested=True)
    else:
        raise ValueError(f"{field} must be a number, a string or a list of them, got {_shown(value)}")


def _positive(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{field} must be a positive number, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A value from a card, quoted short (a card is outside input)."""
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _misfit(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What differs between a model's parameter names and shapes and a file's weights ('' if
    nothing), compared before the model is built for real."""
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    shapes = [f"{name} {tuple(given[name].shape)} for {tuple(expected[name].shape)}"
              for name in expected.keys() & given.keys() if given[name].shape != expected[name].shape]  # fmt: skip
    parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
             for label, names in (("Missing key(s)", missing), ("Unexpected key(s)", unexpected), ("size mismatch", sorted(shapes)))
             if names]  # fmt: skip
    return "; ".join(parts)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - the weights-only unpickler fails in many ways on malformed bytes
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"{path}: not a safe odeserve checkpoint (refused without executing it): {reason}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} file")
    try:
        card = json.loads(payload["card"])
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable model card: {error}") from None
    state_dict = payload.get("state_dict")
    if not isinstance(card, dict) or not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: a checkpoint holds a model card and a state_dict")
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: the state_dict may only hold tensors")
    return card, state_dict


def code_version() -> str:
    """The git revision of this code, with ``-dirty`` if the work tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return revision + ("-dirty" if dirty else "")
