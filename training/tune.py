"""``python -m training tune CHECKPOINT --first-step T --out FILE``: the same weights served
with other solver settings, and a card whose tables were measured again under them.

A card's NFE table is what the server predicts deadlines, ``auto`` tolerances and drift
from, so a solver setting that changes NFE must never be changed without measuring the table
again. The new card keeps the training record and says what it was tuned from.
"""

from __future__ import annotations

import argparse
import hashlib
from datetime import date

from neuralode.card import ABSENT, ModelCard, Tuned
from neuralode.checkpoint import load_checkpoint, read_card, save_checkpoint
from neuralode.models.registry import CLASSIFIERS, ODE_KINDS

from .common import command_line, device_name, resolve_device, setup_logging


def run(args: argparse.Namespace) -> ModelCard:
    device = resolve_device(args.device)
    setup_logging(None, True)
    source = read_card(args.checkpoint)
    if source.kind not in ODE_KINDS:
        raise SystemExit(
            f"{args.checkpoint}: a {source.kind} has no ODE solve to tune (tune one of {', '.join(sorted(ODE_KINDS))})"
        )
    if args.out.resolve() == args.checkpoint.resolve():
        raise SystemExit("--out must name a new file: the checkpoint being tuned stays as it is")
    settings = {"first_step": args.first_step}
    tuned = load_checkpoint(args.checkpoint, device, settings)
    card = tuned.card.replace(created=ABSENT, code_version=ABSENT)  # this copy's own, when it is saved
    tol = card.training.tol
    if tuned.kind in CLASSIFIERS:
        from .classifiers import card_metrics
        from .data import load_mnist

        test_set = load_mnist(args.data_dir, train=False).head(args.test_subset)
        metrics = card_metrics(tuned.model, tuned.kind, test_set, device, tol)
        card = card.replace(dataset=card.dataset.replace(test_images=len(test_set)))
    else:
        from .densities import card_metrics

        metrics = card_metrics(tuned.model, tuned.kind, card.dataset.name, tol, device)
    card = card.replace(
        metrics=card.metrics.updated(metrics).replace(eval_device=device_name(device)),
        tuned=Tuned(
            source={"file": args.checkpoint.name, "sha256": hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()[:12],
                    "code_version": source.code_version, "created": source.created},
            settings=settings,
            command=command_line(),
            date=date.today().isoformat(),
        ),
    )  # fmt: skip
    save_checkpoint(args.out, tuned.model, card)
    print(f"wrote {args.out}: {tuned.kind} with {settings}, its table measured again on {device_name(device)}")
    return card
