"""Checkpoints round-trip, and anything that could execute code or does not fit is refused."""

import json
import pickle
import zipfile

import pytest
import torch

from neuralode.checkpoint import FORMAT, CheckpointError, load_checkpoint, read_card, save_checkpoint
from neuralode.models import ODENet, build_model


def _card(**extra):
    return {"kind": "odenet", "hyper": {"channels": 64, "method": "dopri5", "tol": 1e-3}, **extra}


def test_round_trip_keeps_weights_card_and_behaviour(tmp_path):
    torch.manual_seed(0)
    model = ODENet().eval()
    path = save_checkpoint(tmp_path / "m.pt", model, _card(metrics={"test_error": 0.01}))
    loaded = load_checkpoint(path)
    assert loaded.kind == "odenet" and not loaded.model.training
    assert loaded.card.metrics.to_dict() == {"test_error": 0.01} and loaded.card.metrics.test_error == 0.01
    assert loaded.card.parameters == sum(p.numel() for p in model.parameters())
    assert {"created", "code_version"} <= set(loaded.card.to_dict())
    images = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images)[0], model(images)[0], rtol=0, atol=0)
    assert read_card(path) == loaded.card


class _Payload:
    """Unpickling this runs code: the classic malicious-checkpoint payload."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PWNED_MARKER']).write_text('pwned')",))


def test_a_pickled_code_payload_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "card": json.dumps(_card()), "state_dict": {}, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused without executing it"):
        load_checkpoint(path)
    assert not marker.exists()
    # The plain pickle protocol too, not just torch's zip container.
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_garbage_files_are_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", ODENet(), _card())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    text = tmp_path / "text.pt"  # the weights-only unpickler fails on this with an IndexError
    text.write_bytes(b"truncated in the middle of a copy")
    for path in (truncated, garbage, text):
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def test_card_and_weights_mismatch_is_refused_with_names(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model("resnet", {}), {"kind": "resnet", "hyper": {}})
    # Rewrite the card to claim a different architecture for the same weights.
    payload = torch.load(path, weights_only=True)
    payload["card"] = json.dumps(_card())
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="weights do not match the model card \\(odenet\\).*Missing key"):
        load_checkpoint(path)


def test_wrong_shapes_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", ODENet(channels=32), _card())
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"format": "other/1", "card": "{}", "state_dict": {}}, "not an odeserve-checkpoint/1 file"),
        ({"format": FORMAT, "card": "{not json", "state_dict": {}}, "unreadable model card"),
        ({"format": FORMAT, "card": json.dumps({"kind": "gan", "hyper": {}}), "state_dict": {}}, "unknown model kind"),
        ({"format": FORMAT, "card": json.dumps(_card()), "state_dict": {"w": [1, 2]}}, "may only hold tensors"),
    ],
)
def test_malformed_checkpoints_are_refused(tmp_path, payload, message):
    path = tmp_path / "m.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_saving_is_atomic(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", ODENet(), _card())
    assert zipfile.is_zipfile(path) and not (tmp_path / "m.pt.tmp").exists()


def test_overrides_change_a_solver_setting_and_keep_the_weights(tmp_path):
    torch.manual_seed(0)
    model = ODENet().eval()
    path = save_checkpoint(tmp_path / "m.pt", model, _card())
    loaded = load_checkpoint(path, overrides={"first_step": 1.0})
    assert loaded.card.hyper["first_step"] == 1.0 and loaded.model.block.first_step == 1.0
    assert "first_step" not in read_card(path).hyper  # the file is untouched
    for name, weights in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], weights)
    with pytest.raises(CheckpointError, match="does not describe a model we can build"):
        load_checkpoint(path, overrides={"no_such_setting": 1})
    # As a function of the card, for settings that depend on the kind (one read of the file).
    asked = []
    by_kind = load_checkpoint(path, overrides=lambda card: asked.append(card.kind) or {"first_step": 0.5})
    assert asked == ["odenet"] and by_kind.card.hyper["first_step"] == 0.5 == by_kind.model.block.first_step
    assert "first_step" not in load_checkpoint(path, overrides=lambda card: None).card.hyper


def _with_card(tmp_path, change):
    path = save_checkpoint(tmp_path / "m.pt", ODENet(), _card())
    payload = torch.load(path, weights_only=True)
    card = json.loads(payload["card"])
    change(card)
    payload["card"] = json.dumps(card)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(training={"tol": "abc"}), "card.training.tol must be a positive number"),
        (lambda c: c.update(training=[]), "card.training must be an object"),
        (lambda c: c.update(metrics={"table": [{"tol": "x", "nfe_mean": 7.0}]}), r"card.metrics.table\[0\].tol"),
        (lambda c: c.update(metrics={"table": [{"tol": 1e-3, "nfe_mean": -1}]}), r"table\[0\].nfe_mean"),
        (lambda c: c.update(metrics={"table": "rows"}), "card.metrics.table must be a list"),
        (lambda c: c["hyper"].update(tol=float("nan")), "card.hyper.tol must be a finite number"),
        (lambda c: c["hyper"].update(tol=0), "card.hyper.tol must be a positive number"),
        (lambda c: c["hyper"].update(channels=10**9), "card.hyper.channels must be at most 4096"),
        (lambda c: c["hyper"].update(channels={"a": 1}), "card.hyper.channels must be a number"),
        (lambda c: c["hyper"].update(method="x" * 1000), "at most 64 characters"),
        (lambda c: c["hyper"].update(method="euler2"), "card.hyper.method must be a known solver"),
        (lambda c: c.update(hyper=[]), "card.hyper must be an object"),
    ],
)
def test_a_malformed_card_is_refused_naming_the_field(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_with_card(tmp_path, change))


def test_a_card_that_does_not_fit_its_weights_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    """hyper.channels=2048 beside 64-channel weights once allocated 1.35 GB before the weights
    were refused: the model is built on the meta device first and compared."""
    import neuralode.checkpoint as checkpoint

    devices = []

    def recording_build(kind, hyper):
        devices.append(torch.get_default_device().type)
        return build_model(kind, hyper)

    monkeypatch.setattr(checkpoint, "build_model", recording_build)
    path = _with_card(tmp_path, lambda c: c["hyper"].update(channels=2048))
    with pytest.raises(CheckpointError, match="weights do not match the model card.*size mismatch"):
        load_checkpoint(path)
    assert devices == ["meta"]  # never built for real
    devices.clear()
    load_checkpoint(save_checkpoint(tmp_path / "good.pt", ODENet(), _card()))
    assert devices == ["meta", "cpu"]
