"""The served models: every checkpoint in a folder, loaded safely, by name."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from neuralode.checkpoint import CheckpointError, load_checkpoint

from .adapters import Adapter, adapter_for

log = logging.getLogger("server.models")


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str  # content hash of the checkpoint file
    kind: str
    task: str  # "classify" or "density"
    card: dict
    adapter: Adapter
    default_tol: float
    device: str


def load_models(directory: Path, device: torch.device) -> dict[str, ServedModel]:
    """Every loadable ``*.pt`` in ``directory``; anything unsafe, corrupt or not servable is
    skipped with the reason logged, so one bad file never takes the others down."""
    models: dict[str, ServedModel] = {}
    for path in sorted(Path(directory).glob("*.pt")):
        try:
            checkpoint = load_checkpoint(path, device)
            adapter = adapter_for(checkpoint.model)
        except (CheckpointError, TypeError, OSError) as error:
            log.error("not serving %s: %s", path.name, error)
            continue
        version = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        default_tol = float(checkpoint.card.get("training", {}).get("tol") or 1e-3)
        models[path.stem] = ServedModel(
            name=path.stem,
            version=version,
            kind=checkpoint.kind,
            task=adapter.task,
            card=checkpoint.card,
            adapter=adapter,
            default_tol=default_tol,
            device=str(device),
        )
        log.info("serving %s (%s, %s, version %s) on %s", path.stem, checkpoint.kind, adapter.task, version, device)
    return models
