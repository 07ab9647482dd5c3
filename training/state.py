"""Resumable training: everything a run needs to continue exactly where it stopped, in one file.

A long training (ODE-Net to the paper's error is hours on this CPU) outlives a sitting. The
state file holds the weights, the optimizer and learning-rate schedule, every random stream
(torch's global one, the data order and crops, the regularisers' noise), the current epoch's
data order and the position in it, the elapsed time, the evaluation history and the best
evaluated weights. A run resumed from it takes the same steps on the same batches as the run
that never stopped, so its weights are bit-identical.

The file is written atomically (a temporary file, then a rename) and read with
``torch.load(weights_only=True)``: plain containers and tensors only, never pickled code. The
``recipe`` it records (model, hyper-parameters, optimizer, schedule, data, seed) must equal the
resuming run's, so a state is never continued under another recipe by mistake.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "odeserve-training-state/1"


class TrainingStateError(ValueError):
    """The file is not a training state we can continue, or it belongs to another recipe."""


@dataclass
class Position:
    """Where a run stands. ``epoch`` counts epochs started; ``batch`` the batches of that epoch
    already trained on (0 when the next step starts a new epoch)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    sittings: int = 1
    history: list[dict[str, float]] = field(default_factory=list)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` under ``path`` so that a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        torch.save({"format": FORMAT, **state}, file)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)


def load_state(path: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """The state in ``path``, refused with a message naming the cause if it cannot be read or
    was written by another recipe than ``recipe``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingStateError(f"--resume {path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingStateError(f"--resume {path}: not a readable training-state file ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingStateError(f"--resume {path}: not a training-state file of this version (expected {FORMAT})")
    saved = state.get("recipe")
    if saved != recipe:
        differences = sorted(k for k in set(recipe) | set(saved or {}) if (saved or {}).get(k) != recipe.get(k))
        detail = ", ".join(f"{k}: state {(saved or {}).get(k)!r}, this run {recipe.get(k)!r}" for k in differences)
        raise TrainingStateError(f"--resume {path}: the state was written by another recipe ({detail})")
    return state


def position_dict(position: Position) -> dict[str, Any]:
    return asdict(position)


def position_from(state: dict[str, Any]) -> Position:
    return Position(**state["position"])


def generator_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    return {name: generator.get_state() for name, generator in generators.items()}


def restore_generators(generators: dict[str, torch.Generator], states: dict[str, torch.Tensor]) -> None:
    for name, generator in generators.items():
        generator.set_state(states[name])
