"""``python -m training tune CHECKPOINT [--first-step T] [--precision-table] --out FILE``: the
same weights served with other solver settings, and a card whose tables were measured again
under them; ``--precision-table`` adds each tolerance measured in float32 and bfloat16 side by
side, which is what the server's ``precision=auto`` serves bfloat16 from.

A card's NFE table is what the server predicts deadlines, ``auto`` tolerances and drift
from, so a solver setting that changes NFE must never be changed without measuring the table
again. The new card keeps the training record and says what it was tuned from.
"""

from __future__ import annotations

import argparse
import hashlib
from datetime import date
from typing import cast

from neuralode.card import ABSENT, ModelCard, PrecisionRow, Tuned
from neuralode.checkpoint import load_checkpoint, read_card, save_checkpoint
from neuralode.models import CNF
from neuralode.models.registry import CLASSIFY, kinds, model_spec

from .common import command_line, device_name, resolve_device, setup_logging


def run(args: argparse.Namespace) -> ModelCard:
    device = resolve_device(args.device)
    setup_logging(None, True)
    source = read_card(args.checkpoint)
    if source.kind not in kinds(has_ode=True):
        raise SystemExit(
            f"{args.checkpoint}: a {source.kind} has no ODE solve to tune (tune one of {', '.join(kinds(has_ode=True))})"
        )
    if args.out.resolve() == args.checkpoint.resolve():
        raise SystemExit("--out must name a new file: the checkpoint being tuned stays as it is")
    if not hasattr(args, "first_step") and not args.precision_table:
        raise SystemExit("nothing to tune: give --first-step, --precision-table or both")
    settings = {"first_step": args.first_step} if hasattr(args, "first_step") else {}
    tuned = load_checkpoint(args.checkpoint, device, settings)
    on_data = isinstance(tuned.model, CNF) and not (source.dataset.name or "").startswith("energy ")
    if args.precision_table and model_spec(tuned.kind).task != CLASSIFY and not on_data:
        raise SystemExit(f"--precision-table measures classifiers and CNFs trained on data, not this {tuned.kind}")
    card = tuned.card.replace(created=ABSENT, code_version=ABSENT)  # this copy's own, when it is saved
    tol = card.training.tol
    if tol is None:
        raise SystemExit(
            f"{args.checkpoint}: its card has no training.tol, the tolerance its headline figure is measured at"
        )
    if model_spec(tuned.kind).task == CLASSIFY:
        from . import classifiers
        from .data import load_mnist

        test_set = load_mnist(args.data_dir, train=False).head(args.test_subset)
        metrics = classifiers.card_metrics(tuned.model, tuned.kind, test_set, device, tol)
        if args.precision_table:
            rows = classifiers.precision_table(tuned.model, tuned.kind, test_set, device)
            metrics = metrics.replace(precision_table=_rows(rows))
        card = card.replace(dataset=card.dataset.replace(test_images=len(test_set)))
    else:
        from . import densities

        name = card.dataset.name
        assert name is not None  # every density card names its data or target
        metrics = densities.card_metrics(tuned.model, tuned.kind, name, tol, device)
        if args.precision_table:
            points = args.test_subset or densities.TEST_POINTS
            rows = densities.precision_table(cast(CNF, tuned.model), name, device, points)
            metrics = metrics.replace(precision_table=_rows(rows))
    card = card.replace(
        metrics=card.metrics.updated(metrics).replace(eval_device=device_name(device)),
        tuned=Tuned(
            source={
                "file": args.checkpoint.name,
                "sha256": hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()[:12],
                "code_version": source.code_version,
                "created": source.created,
            },
            settings={**settings, **({"precision_table": True} if args.precision_table else {})},
            command=command_line(),
            date=date.today().isoformat(),
        ),
    )
    save_checkpoint(args.out, tuned.model, card)
    print(
        f"wrote {args.out}: {tuned.kind} with {card.tuned.settings}, its tables measured again on {device_name(device)}"
    )
    return card


def _rows(rows: list[dict]) -> tuple[PrecisionRow, ...]:
    return tuple(PrecisionRow.from_dict(row, f"metrics.precision_table[{index}]") for index, row in enumerate(rows))
