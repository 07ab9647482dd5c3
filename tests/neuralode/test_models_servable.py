"""The servable-model protocol and the model-kind registry.

Through the protocol (rows → encode → solve → decode) the shipped ODE-Net and CNFs give what
their own forward gives on real inputs, and every kind with an ODE implements it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuralode.card import ModelCard
from neuralode.checkpoint import load_checkpoint
from neuralode.models import (
    CLASSIFY,
    ModelSpec,
    ODENet,
    ServableModel,
    build_model,
    kinds,
    model_spec,
    register,
    specs,
    unregister,
)
from neuralode.solvers import solve_ivp
from training.toy import sample_density


def _through_protocol(model: ServableModel, operation: str, inputs: dict, seed: int, tol: float) -> dict:
    """What a server computes for one batch: rows, encode, one solve per row, decode."""
    rows = model.initial_rows(operation, inputs, torch.Generator().manual_seed(seed))
    start = model.encode(operation, rows)
    t0, t_end = float(start.t0[0]), float(start.t_end[0])
    assert (start.t0 == t0).all() and (start.t_end == t_end).all()  # one span per operation for these models
    solution = solve_ivp(
        model.ode_dynamics,
        start.y0,
        (t0, t_end),
        method="dopri5",
        rtol=tol,
        atol=tol,
        norm=model.error_norm,
        first_step=model.first_step,
    )
    outputs = model.decode(operation, solution.y1)
    return {**outputs, "nfe": solution.nfe}


@pytest.mark.parametrize("first_step", [None, 1.0])
def test_odenet_through_the_protocol_is_its_forward_on_real_digits(shipped, mnist_test_digits, first_step):
    model = load_checkpoint(shipped / "odenet-mnist.pt", overrides={"first_step": first_step}).model
    assert isinstance(model, ServableModel) and model.first_step == first_step
    images = torch.from_numpy(mnist_test_digits[0][:16].astype(np.float32) / 255)
    with torch.no_grad():
        logits, solution = model(images[:, None], rtol=1e-3, atol=1e-3)
        served = _through_protocol(model, "classify", {"images": images}, seed=0, tol=1e-3)
    torch.testing.assert_close(served["probabilities"], torch.softmax(logits, 1), rtol=0, atol=1e-6)
    assert served["nfe"].tolist() == solution.nfe.tolist()
    (signature,) = model.signatures()
    assert signature.operation == "classify" and [s.name for s in signature.inputs] == ["images"]
    assert [(s.name, s.shape) for s in signature.outputs] == [("probabilities", (-1, 10)), ("labels", (-1,))]
    features = model.encode("classify", images[:1, None]).y0
    assert model.state_size("classify") == features.numel() == 64 * 6 * 6
    assert model.encode_bytes("classify") == 64 * 26 * 26 * 4  # the first convolution's output, float32


@pytest.mark.parametrize("name", ["cnf-8gaussians", "cnf-moons"])
def test_a_cnf_through_the_protocol_is_its_own_sample_and_log_prob(shipped, name):
    model = load_checkpoint(shipped / f"{name}.pt").model
    assert isinstance(model, ServableModel)
    with torch.no_grad():
        points, log_p, sampled = model.sample(64, generator=torch.Generator().manual_seed(5), rtol=1e-4, atol=1e-4)
        served = _through_protocol(model, "sample", {"n": 64}, seed=5, tol=1e-4)
        torch.testing.assert_close(served["points"], points, rtol=0, atol=0)
        torch.testing.assert_close(served["log_density"], log_p, rtol=0, atol=0)
        assert served["nfe"].tolist() == sampled.nfe.tolist()

        data = sample_density(name.removeprefix("cnf-"), 64, torch.Generator().manual_seed(1))  # real inputs
        expected, solution = model.log_prob(data, generator=torch.Generator().manual_seed(0), rtol=1e-4, atol=1e-4)
        served = _through_protocol(model, "log_density", {"points": data}, seed=0, tol=1e-4)
    torch.testing.assert_close(served["log_density"], expected, rtol=0, atol=0)
    assert served["nfe"].tolist() == solution.nfe.tolist()
    assert [s.operation for s in model.signatures()] == ["sample", "log_density"]
    assert model.state_size("sample") == 3 and model.encode_bytes("log_density") == 0


def test_every_kind_with_an_ode_implements_the_protocol_and_no_other_does():
    for spec in specs():
        hyper = {"dim": 2, "hidden": [8]} if spec.kind == "cnf" else {}
        assert isinstance(build_model(spec.kind, hyper), ServableModel) == spec.has_ode, spec.kind


def test_the_registry_names_the_known_kinds_for_an_unknown_one():
    known = "cnf, mlp, odenet, planar-nf, resnet, rknet"
    with pytest.raises(ValueError, match=f"^unknown model kind 'gan'; known: {known}$"):
        model_spec("gan")
    with pytest.raises(ValueError, match=f"unknown model kind 'gan'; known: {known}"):
        build_model("gan", {})
    with pytest.raises(ValueError, match=f'card.kind: unknown model kind "gan"; known: {known}'):
        ModelCard.from_dict({"kind": "gan", "hyper": {}})


def test_the_registry_says_what_training_and_the_server_ask_of_a_kind():
    assert kinds(has_ode=True) == ["cnf", "odenet", "rknet"]
    assert kinds(task=CLASSIFY) == ["mlp", "odenet", "resnet", "rknet"]
    assert [(s.kind, s.adjoint) for s in specs() if s.has_ode] == [("odenet", True), ("rknet", False), ("cnf", True)]
    assert build_model("rknet", {}).block.adjoint is False


def test_a_registered_kind_is_known_to_cards_until_unregistered():
    spec = ModelSpec("odenet-small", CLASSIFY, lambda **h: ODENet(**h), has_ode=True, hyper={"channels": 8})
    register(spec)
    try:
        with pytest.raises(ValueError, match="'odenet-small' is already registered"):
            register(spec)
        ModelCard.from_dict({"kind": "odenet-small", "hyper": {"channels": 8}})
        assert model_spec("odenet-small") is spec and "odenet-small" in kinds(has_ode=True)
    finally:
        unregister("odenet-small")
    with pytest.raises(ValueError, match='unknown model kind "odenet-small"'):
        ModelCard.from_dict({"kind": "odenet-small", "hyper": {}})
    with pytest.raises(ValueError, match="a model without an ODE has no adjoint"):
        ModelSpec("x", CLASSIFY, ODENet, has_ode=False, adjoint=True)
    with pytest.raises(ValueError, match="task must be 'classify' or 'density'"):
        ModelSpec("x", "regress", ODENet, has_ode=True)
