"""The served models: every checkpoint in a folder, loaded safely, by name."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from neuralode.card import ModelCard
from neuralode.checkpoint import load_checkpoint
from neuralode.solvers import get_method

from .adapters import Adapter, adapter_for
from .api import Task

log = logging.getLogger("server.models")


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str  # content hash of the checkpoint file
    kind: str
    task: Task
    card: ModelCard
    adapter: Adapter
    default_tol: float
    device: str

    @property
    def key(self) -> str:
        """Names this model's engine worker; a reloaded checkpoint gets a worker of its own."""
        return f"{self.name}@{self.version}"

    @cached_property
    def _card_nfe(self) -> list[tuple[float, float]]:
        """(log tol, log mean NFE) of the card's evaluation table, loosest tolerance last."""
        return [(math.log(tol), math.log(nfe)) for tol, nfe in self._card_table]

    @cached_property
    def _card_table(self) -> list[tuple[float, float]]:
        """(tol, mean NFE) of the card's evaluation table rows that have both (the card was
        checked on loading: they are positive numbers), tightest first."""
        rows = self.card.metrics.table
        return sorted((float(r.tol), float(r.nfe_mean)) for r in rows if r.tol and r.nfe_mean)

    @cached_property
    def bfloat16_from_tol(self) -> float | None:
        """The tightest tolerance from which, at every looser one the card measured, bfloat16
        gave float32's error and NFE (``metrics.precision_table``, written by ``training tune
        --precision-table``); None when the card has no such row (float32 only)."""
        verdicts = sorted(
            (float(r.tol), bool(r.matches_float32))
            for r in self.card.metrics.precision_table
            if r.precision == "bfloat16" and r.tol
        )
        floor = None
        for tol, matches in reversed(verdicts):  # loosest first
            if not matches:
                break
            floor = tol
        return floor

    @property
    def card_tolerances(self) -> list[float]:
        """The tolerances the card's evaluation table measured, tightest first."""
        return [tol for tol, _ in self._card_table]

    def expected_nfe(self, method: str, tol: float) -> float | None:
        """The model card's mean NFE per item at ``tol``, the baseline against which served
        NFE is watched for drift (inputs unlike the evaluation set need more steps).

        Interpolated linearly in (log tol, log NFE) between the card's evaluated tolerances,
        held at the loosest one's NFE above them (a solve never takes fewer steps than at a
        loose tolerance), as with a one-row table, and extrapolated below them along the
        tightest segment, but never steeper than the method's own rate: with an error estimate
        of order q, steps grow like tol^(-1/(q+1)) (a fifth of a decade per decade for dopri5).
        A model trained to solve in one step at loose tolerances has a steep tightest segment
        (shipped cnf-moons: 0.38 of a decade per decade from 1e-3 to 1e-4), and following it to
        1e-10 foretold 4,200 NFE against the 726 measured — enough to give up requests as
        hopeless that would have met their deadline. None when the card has no table or
        ``method`` is not the solver it was measured with. Sampling and log-density solves of a
        CNF share its table: they cost within 8% of each other (shipped CNFs, tol 1e-4..1e-1)."""
        points = self._card_nfe
        if not points or method != self.card.method:
            return None
        x = math.log(tol)
        if x >= points[-1][0] or len(points) == 1:
            return math.exp(points[-1][1])
        (x0, y0), (x1, y1) = next((a, b) for a, b in zip(points, points[1:]) if x <= b[0])
        slope = (y1 - y0) / (x1 - x0)
        if x < x0:
            error_order = getattr(get_method(method), "error_order", None)
            if error_order is not None:
                slope = max(slope, -1.0 / (error_order + 1))
        return math.exp(y0 + slope * (x - x0))


def load_models(
    directory: Path, device: torch.device, previous: dict[str, ServedModel] | None = None
) -> dict[str, ServedModel]:
    """Every loadable ``*.pt`` in ``directory``; anything unsafe, corrupt, with a malformed
    model card (checked field by field before anything is built) or not servable is skipped
    with the reason logged, so one bad file never takes the others down.

    With ``previous`` (a reload), unchanged files keep their loaded model, and a file that
    no longer loads keeps serving its previous version rather than vanishing."""
    previous = previous or {}
    models: dict[str, ServedModel] = {}
    for path in sorted(Path(directory).glob("*.pt")):
        name, old = path.stem, previous.get(path.stem)
        try:
            version = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            if old is not None and old.version == version:
                models[name] = old
                continue
            checkpoint = load_checkpoint(path, device)  # checks the card before building anything
            adapter = adapter_for(checkpoint.model)
            models[name] = ServedModel(
                name=name,
                version=version,
                kind=checkpoint.kind,
                task=adapter.task,
                card=checkpoint.card,
                adapter=adapter,
                default_tol=float(checkpoint.card.training.tol or 1e-3),
                device=str(device),
            )
            models[name]._card_nfe  # read the card's table here, inside the guard  # noqa: B018
        except Exception as error:  # noqa: BLE001 - one bad file must never take the others down
            if old is not None:
                log.error("not reloading %s: %s; still serving version %s", path.name, error, old.version)
                models[name] = old
            else:
                models.pop(name, None)
                log.error("not serving %s: %s", path.name, error)
            continue
        log.info("serving %s (%s, %s, version %s) on %s", name, checkpoint.kind, adapter.task.value, version, device)
    return models
