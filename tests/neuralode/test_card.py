"""The model card as a typed record: every shipped card reads and writes back unchanged, keys
it does not know survive, absent and null stay apart, and every typed field is checked."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from neuralode.card import (
    ABSENT,
    CardError,
    Dataset,
    DirectionRow,
    Directions,
    Metrics,
    ModelCard,
    TableRow,
    Training,
    Tuned,
    _Record,
)
from neuralode.checkpoint import CheckpointError, read_card, save_checkpoint
from neuralode.models import ODENet

SHIPPED = sorted((Path(__file__).resolve().parents[2] / "checkpoints").glob("*.pt"))


def _stored(path: Path) -> str:
    """The card exactly as the file holds it."""
    return torch.load(path, map_location="cpu", weights_only=True)["card"]


def _json(path: Path) -> dict:
    return json.loads(_stored(path))


def _card(**extra) -> dict:
    return {"kind": "odenet", "hyper": {"channels": 64, "method": "dopri5", "tol": 1e-3}, **extra}


@pytest.mark.parametrize("path", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_every_shipped_card_reads_typed_and_writes_back_the_identical_json(path):
    raw = _json(path)
    card = read_card(path)
    assert isinstance(card, ModelCard) and isinstance(card.training, Training) and isinstance(card.metrics, Metrics)
    assert card.to_dict() == raw
    assert json.dumps(card.to_dict(), sort_keys=True) == _stored(path)  # byte for byte as written (1.0 stays 1.0)
    assert ModelCard.from_dict(card.to_dict()) == card
    assert card.kind == raw["kind"] and card.hyper == raw["hyper"] and card.method == raw["hyper"]["method"]
    assert card.training.tol == raw["training"]["tol"] > 0
    assert [(row.tol, row.nfe_mean) for row in card.metrics.table] == [
        (row["tol"], row["nfe_mean"]) for row in raw["metrics"]["table"]
    ]
    assert all(isinstance(row, TableRow) for row in card.metrics.table)
    assert card.extra == {} and card.training.extra == {} and card.metrics.extra == {}  # every key is typed


def test_keys_the_card_does_not_know_are_kept_at_every_level(tmp_path):
    data = _card(
        future={"a": [1, 2]},
        training={"tol": 1e-3, "scheduler": "cosine"},
        metrics={"table": [{"tol": 1e-3, "nfe_mean": 20.0, "p99_nfe": 31}], "calibration": 0.01},
        dataset={"name": "MNIST", "licence": "CC BY-SA 3.0"},
        tuned={"from": {"file": "a.pt"}, "settings": {"first_step": 1.0}, "why": "span"},
    )
    card = ModelCard.from_dict(data)
    assert card.extra == {"future": {"a": [1, 2]}} and card.training.extra == {"scheduler": "cosine"}
    assert card.metrics.table[0].extra == {"p99_nfe": 31} and card.dataset.extra == {"licence": "CC BY-SA 3.0"}
    assert card.tuned.source == {"file": "a.pt"} and card.tuned.extra == {"why": "span"}
    assert card.to_dict() == data
    path = save_checkpoint(tmp_path / "m.pt", ODENet(), card)
    assert {
        key: value for key, value in _json(path).items() if key not in ("created", "code_version", "parameters")
    } == data
    # Neither the input nor the output aliases the card: it is a value.
    data["future"]["a"].append(3)
    card.to_dict()["future"]["a"].append(4)
    assert card.extra == {"future": {"a": [1, 2]}}


def test_absent_stays_absent_and_null_stays_null():
    card = ModelCard.from_dict(_card(training={"tol": None, "method": None}))
    assert card.training.tol is None and card.training.steps is None and card.metrics.table == ()
    assert card.to_dict() == _card(training={"tol": None, "method": None})  # no metrics, no steps: as read
    assert "metrics" in card.absent and {"steps", "command"} <= card.training.absent
    # In code: a field given as None is written as null, a field not given is left out.
    built = ModelCard(kind="mlp", hyper={}, training=Training(tol=None, seed=0))
    assert built.to_dict() == {"kind": "mlp", "hyper": {}, "training": {"tol": None, "seed": 0}}


def test_replace_and_updated_keep_the_absent_fields_absent():
    card = ModelCard.from_dict(_card(metrics={"test_error": 0.1, "table": []}))
    changed = card.replace(created="today")
    assert changed.to_dict() == {**card.to_dict(), "created": "today"}
    assert changed.replace(created=ABSENT).to_dict() == card.to_dict()
    merged = card.metrics.updated(Metrics(test_error=0.05, eval_device="cpu"))
    assert merged.to_dict() == {"test_error": 0.05, "table": [], "eval_device": "cpu"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.kind = "resnet"


def _records() -> list[tuple[str, type[_Record], dict]]:
    """Every record type, the path to it in a card, and a card holding one of it there."""
    return [
        ("card", ModelCard, {}),
        ("card.dataset", Dataset, {"dataset": {}}),
        ("card.training", Training, {"training": {}}),
        ("card.metrics", Metrics, {"metrics": {}}),
        ("card.metrics.table[0]", TableRow, {"metrics": {"table": [{}]}}),
        ("card.metrics.directions", Directions, {"metrics": {"directions": {}}}),
        ("card.metrics.directions.rows[0]", DirectionRow, {"metrics": {"directions": {"rows": [{}]}}}),
        ("card.tuned", Tuned, {"tuned": {}}),
    ]


def _wrong_fields():
    """(path, card with one typed field of the wrong JSON type) for every typed field."""
    from neuralode.card import _fields, _text

    for path, record, holder in _records():
        for spec in _fields(record):
            if record is ModelCard and spec.name in ("kind", "hyper"):
                continue  # checked with their own messages (tests/neuralode/test_checkpoint.py)
            key = spec.metadata["key"] or spec.name
            wrong = 5 if spec.metadata["check"] is _text else "x"
            card = _card(**json.loads(json.dumps(holder)))
            target = card
            for step in path.split(".")[1:]:
                name, _, index = step.partition("[")
                target = target[name][int(index[:-1])] if index else target[name]
            target[key] = wrong
            yield pytest.param(f"{path}.{key}", card, id=f"{path}.{key}")


@pytest.mark.parametrize("field, data", list(_wrong_fields()))
def test_every_typed_field_of_the_wrong_type_is_refused_naming_it(field, data, tmp_path):
    with pytest.raises(CardError, match="^" + re.escape(field) + " must be "):
        ModelCard.from_dict(data)
    path = save_checkpoint(tmp_path / "good.pt", ODENet(), _card())
    payload = torch.load(path, weights_only=True)
    payload["card"] = json.dumps(data)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="must be "):
        read_card(path)  # the same check, reading the card only


@pytest.mark.parametrize(
    "data, message",
    [
        (_card(training={"tol": "abc"}), 'card.training.tol must be a positive number, got "abc"'),
        (_card(training=[]), "card.training must be an object, got list"),
        (_card(training=None), "card.training must be an object, got null"),
        (_card(input=None), "card.input must be an object, got null"),
        (_card(metrics={"table": None}), "card.metrics.table must be a list of at most 64 rows"),
        (_card(metrics={"table": "rows"}), "card.metrics.table must be a list of at most 64 rows"),
        (_card(metrics={"table": [{}] * 65}), "card.metrics.table must be a list of at most 64 rows"),
        (_card(metrics={"table": [3]}), r"card.metrics.table\[0\] must be an object, got 3"),
        (
            _card(metrics={"table": [{"tol": 1e-3, "nfe_mean": 0}]}),
            r"card.metrics.table\[0\].nfe_mean must be a positive",
        ),
        (_card(training={"regularisation": {"kinetic": "a"}}), "card.training.regularisation.kinetic must be a number"),
        (_card(training={"adjoint": 1}), "card.training.adjoint must be true or false, got 1"),
        (_card(parameters=True), "card.parameters must be an integer, got true"),
        ({"hyper": {}}, "card.kind: unknown model kind null"),
        (_card(hyper=None), "card.hyper must be an object of constructor arguments, got null"),
        ([], "card must be an object, got list"),
    ],
)
def test_malformed_cards_are_refused_with_the_messages_of_the_file_check(data, message):
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict(data)


def test_a_card_built_in_code_is_checked_as_one_read_from_a_file():
    with pytest.raises(CardError, match="card.training.tol must be a positive number, got 0"):
        ModelCard(kind="odenet", hyper={}, training=Training(tol=0))
    with pytest.raises(CardError, match=r"card.metrics.table\[1\].nfe_mean must be a positive number"):
        ModelCard(kind="cnf", hyper={}, metrics=Metrics(table=(TableRow(tol=1.0), TableRow(tol=0.1, nfe_mean=-1.0))))
    with pytest.raises(CardError, match="card.hyper.method must be a known solver"):
        ModelCard(kind="cnf", hyper={"method": "euler2"})
    with pytest.raises(CardError, match="card.training must be an object"):
        ModelCard(kind="cnf", hyper={}, training={"tol": 1e-3})
    with pytest.raises(CardError, match="card.kind: unknown model kind"):
        ModelCard(kind="gan", hyper={})
