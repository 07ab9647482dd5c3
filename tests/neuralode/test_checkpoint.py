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
    assert loaded.card["metrics"] == {"test_error": 0.01}
    assert loaded.card["parameters"] == sum(p.numel() for p in model.parameters())
    assert {"created", "code_version"} <= set(loaded.card)
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
    assert loaded.card["hyper"]["first_step"] == 1.0 and loaded.model.block.first_step == 1.0
    assert "first_step" not in read_card(path)["hyper"]  # the file is untouched
    for name, weights in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], weights)
    with pytest.raises(CheckpointError, match="does not describe a model we can build"):
        load_checkpoint(path, overrides={"no_such_setting": 1})
