"""Checkpoints: weights plus a model card, in one file, loaded without executing any code.

The file is a ``torch.save`` of ``{"format", "card" (a JSON string), "state_dict"}`` and is
read with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain
containers: a file carrying a pickled object (the classic code-execution payload) is refused
before anything runs. The card says how to rebuild the model; the weights must then fit it
exactly, or loading fails with the names of what does not match.

Nothing in a card is trusted before it is checked: the card is read as a
:class:`~neuralode.card.ModelCard`, whose construction checks every field's type and range
(hyper-parameters are small numbers, short strings or short lists of them), and the model is
first built on the ``meta`` device — no memory — so a card whose architecture does not fit its
weights is refused before anything of its size is allocated.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import CardError, ModelCard
from .models.registry import build_model

FORMAT = "odeserve-checkpoint/1"


class CheckpointError(ValueError):
    """The file is not a checkpoint we can load safely, or its card and weights disagree."""


@dataclass(frozen=True)
class Checkpoint:
    card: ModelCard
    model: nn.Module

    @property
    def kind(self) -> str:
        return self.card.kind


def save_checkpoint(path: str | Path, model: nn.Module, card: ModelCard | dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``card`` (a JSON object is read as a :class:`ModelCard`
    first, so a card that would not load is never written). ``created``, ``code_version`` and
    ``parameters`` are filled in where the card leaves them out."""
    if not isinstance(card, ModelCard):
        card = ModelCard.from_dict(card)
    stamps = {
        "created": lambda: datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version,
        "parameters": lambda: sum(p.numel() for p in model.parameters()),
    }
    card = card.replace(**{name: stamp() for name, stamp in stamps.items() if name in card.absent})
    payload = {
        "format": FORMAT,
        "card": json.dumps(card.to_dict(), sort_keys=True),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # readers never see a half-written file
    return path


def read_card(path: str | Path) -> ModelCard:
    """The checkpoint's model card, checked, without building its model."""
    path = Path(path)
    return _card(path, _read(path)[0])


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | Callable[[ModelCard], dict[str, Any] | None] | None = None,
) -> Checkpoint:
    """Rebuild the model a card describes and load its weights, in eval mode.

    ``overrides`` change constructor settings of the card's ``hyper`` that leave the weights
    as they are (a solver setting such as ``first_step``); the returned card says so. Given
    as a function, it is asked with the file's card (for settings that depend on the kind)."""
    path = Path(path)
    data, state_dict = _read(path)
    if callable(overrides):
        overrides = overrides(_card(path, data))
    if overrides and isinstance(data.get("hyper"), dict):  # (a card whose hyper is no object is refused next)
        data = {**data, "hyper": {**data["hyper"], **overrides}}
    card = _card(path, data)
    try:
        with torch.device("meta"):  # shapes only: nothing of the card's size is allocated yet
            skeleton = build_model(card.kind, card.hyper)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the model card does not describe a model we can build: {error}") from None
    problem = _misfit(skeleton.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"{path}: weights do not match the model card ({card.kind}): {problem}")
    model = build_model(card.kind, card.hyper)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(f"{path}: weights do not match the model card ({card.kind}): {detail}") from None
    return Checkpoint(card=card, model=model.to(device).eval())


def _card(path: Path, data: dict[str, Any]) -> ModelCard:
    try:
        return ModelCard.from_dict(data)
    except CardError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _misfit(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What differs between a model's parameter names and shapes and a file's weights ('' if
    nothing), compared before the model is built for real."""
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    shapes = [
        f"{name} {tuple(given[name].shape)} for {tuple(expected[name].shape)}"
        for name in expected.keys() & given.keys()
        if given[name].shape != expected[name].shape
    ]
    parts = [
        f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        for label, names in (
            ("Missing key(s)", missing),
            ("Unexpected key(s)", unexpected),
            ("size mismatch", sorted(shapes)),
        )
        if names
    ]
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
