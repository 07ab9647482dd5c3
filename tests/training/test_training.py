"""Real training runs through ``python -m training``, on real MNIST and the toy densities."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuralode.card import ModelCard, Training
from neuralode.checkpoint import load_checkpoint
from neuralode.devices import cpu_description
from neuralode.models import ODENet, build_model

ROOT = Path(__file__).resolve().parents[2]


def _run(
    *args: str, env: dict | None = None, module: str = "training", cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    environment = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}  # the repository's packages from any cwd
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def short_odenet(tmp_path_factory, mnist_dir) -> Path:
    out = tmp_path_factory.mktemp("odenet") / "odenet.pt"
    # ~1 minute on 2 cores: the conv nets need ~100 steps before the loss moves.
    _run(
        "odenet",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--steps",
        "160",
        "--batch-size",
        "32",
        "--lr",
        "5e-3",
        "--tol",
        "1e-2",
        "--no-augment",
        "--train-subset",
        "5120",
        "--test-subset",
        "300",
        "--device",
        "cpu",
        "--seed",
        "3",
    )
    return out


def test_short_adjoint_training_lowers_the_loss_and_beats_chance(short_odenet, mnist_dir):
    from training.data import load_mnist, to_float

    checkpoint = load_checkpoint(short_odenet)
    card = checkpoint.card
    assert card.kind == "odenet" and card.training.adjoint is True and card.training.steps == 160
    assert card.metrics.test_error < 0.6  # chance is 0.9
    assert [row.tol for row in card.metrics.table] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    test = load_mnist(mnist_dir, train=False).head(300)
    images, labels = to_float(test.images), test.labels
    torch.manual_seed(3)
    untrained = build_model("odenet", card.hyper).eval()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(untrained(images)[0], labels)
        after = torch.nn.functional.cross_entropy(checkpoint.model(images)[0], labels)
    assert float(after) < 0.85 * float(before)
    assert (short_odenet.with_suffix(".log")).read_text().count("epoch 1:") == 1


def test_evaluate_writes_the_table_json_and_plot_under_runs_not_beside_the_checkpoint(
    short_odenet, mnist_dir, tmp_path
):
    """By default into ./runs/eval (git-ignored), never into the checkpoint's folder, which
    for the shipped models is the folder the server serves."""
    beside = sorted(p.name for p in short_odenet.parent.iterdir())
    assert beside == ["odenet.log", "odenet.pt", "odenet.state.pt"]  # training's own: its log and last state
    result = _run(
        "evaluate",
        str(short_odenet),
        "--data-dir",
        str(mnist_dir),
        "--test-subset",
        "200",
        "--tols",
        "1e-4",
        "1e-2",
        "1",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert "test error" in result.stdout
    out = tmp_path / "runs" / "eval"
    report = json.loads((out / "odenet-eval.json").read_text())
    nfe = [row["nfe_mean"] for row in report["rows"]]
    assert [row["tol"] for row in report["rows"]] == [1e-4, 1e-2, 1.0]
    assert nfe[0] > nfe[1] >= nfe[2]
    assert (out / "odenet-eval.png").stat().st_size > 5000
    assert sorted(p.name for p in short_odenet.parent.iterdir()) == beside


def test_evaluate_compares_two_checkpoints_side_by_side(short_odenet, mnist_dir, tmp_path):
    shipped = ROOT / "checkpoints" / "odenet-mnist.pt"
    dotted = tmp_path / "odenet-k0.1.pt"  # a name's dots are not a suffix to replace
    shutil.copy(short_odenet, dotted)
    result = _run(
        "evaluate",
        str(shipped),
        str(dotted),
        "--data-dir",
        str(mnist_dir),
        "--test-subset",
        "200",
        "--tols",
        "1e-2",
        "1",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    )
    compared = json.loads((tmp_path / "odenet-mnist-vs-odenet-k0.1.json").read_text())["compared"]
    assert [report["name"] for report in compared] == ["odenet-mnist", "odenet-k0.1"]
    shipped_row, short_row = (report["rows"][0] for report in compared)
    assert shipped_row["test_error"] < short_row["test_error"]  # 3 epochs against 160 small steps
    lines = result.stdout.splitlines()
    assert "odenet-mnist" in lines[1] and "odenet" in lines[1].replace("odenet-mnist", "")
    assert any(line.split()[0] == "0.01" and line.count("@") == 2 for line in lines[2:])
    assert (tmp_path / "odenet-mnist-vs-odenet-k0.1.png").stat().st_size > 5000


def test_evaluate_refuses_to_compare_different_datasets(tmp_path):
    from training.__main__ import main

    with pytest.raises(SystemExit, match="compare checkpoints of one dataset"):
        main(
            [
                "evaluate",
                str(ROOT / "checkpoints/cnf-moons.pt"),
                str(ROOT / "checkpoints/cnf-8gaussians.pt"),
                "--out",
                str(tmp_path),
            ]
        )
    assert not any(tmp_path.iterdir())  # refused from the cards, before any work


def test_card_prints_the_model_card(capsys):
    from neuralode.checkpoint import read_card
    from training.__main__ import main

    main(["card", str(ROOT / "checkpoints" / "cnf-moons.pt")])
    assert json.loads(capsys.readouterr().out) == read_card(ROOT / "checkpoints" / "cnf-moons.pt").to_dict()


def test_tune_writes_the_same_weights_with_a_first_step_and_a_table_measured_under_it(tmp_path):
    """The shipped moons CNF (trained to try the whole span first: its solves at tol 1 end in one
    step, f(t0) and six stages, 7 evaluations) tuned to try half the span: at tol 1 they end in
    two steps (13 evaluations: the second reuses the first's last stage), the card's table says so,
    and the new card names what it was tuned from."""
    from neuralode.checkpoint import read_card
    from training.__main__ import main

    source, out = ROOT / "checkpoints" / "cnf-moons.pt", tmp_path / "moons-span.pt"
    main(["tune", str(source), "--first-step", "0.5", "--out", str(out), "--device", "cpu"])
    before, after = load_checkpoint(source), load_checkpoint(out)
    assert before.card.hyper["first_step"] == 1.0
    assert after.card.hyper == {**before.card.hyper, "first_step": 0.5} and after.model.first_step == 0.5
    assert all(torch.equal(w, after.model.state_dict()[k]) for k, w in before.model.state_dict().items())
    loosest = {row.tol: row.nfe_mean for row in after.card.metrics.table}
    assert loosest[1.0] == 13.0 and before.card.metrics.table[-1].nfe_mean == 7.0
    assert after.card.training == before.card.training  # the training record stays
    tuned = after.card.tuned
    assert tuned.settings == {"first_step": 0.5} and tuned.source["file"] == "cnf-moons.pt"
    assert tuned.source["code_version"] == before.card.code_version != after.card.code_version
    assert tuned.source["created"] == before.card.created != after.card.created
    assert read_card(source) == before.card  # the source is untouched

    main(["tune", str(out), "--first-step", "1", "--out", str(tmp_path / "back.pt"), "--device", "cpu"])
    back = load_checkpoint(tmp_path / "back.pt").card
    assert back.hyper["first_step"] == 1.0
    for measured, carded in zip(back.metrics.table, before.card.metrics.table, strict=True):
        assert measured.nfe_mean == pytest.approx(carded.nfe_mean, abs=0.05)  # another CPU may round apart
    main(["tune", str(out), "--first-step", "rule", "--out", str(tmp_path / "rule.pt"), "--device", "cpu"])
    rule = load_checkpoint(tmp_path / "rule.pt").card
    assert rule.hyper["first_step"] is None  # Hairer's rule: a probe evaluation, then at least two steps
    assert {row.tol: row.nfe_mean for row in rule.metrics.table}[1.0] >= 14.0


def test_tune_measures_each_tolerance_in_both_precisions_for_the_servers_auto(mnist_dir, tmp_path):
    """The shipped ODE-Net on 40 real digits: each table tolerance in float32 and bfloat16 side
    by side, its first step and training record kept, and the verdict the server reads."""
    from server.models import ServedModel
    from training.__main__ import main

    source, out = ROOT / "checkpoints" / "odenet-mnist.pt", tmp_path / "odenet-precision.pt"
    main(
        [
            "tune",
            str(source),
            "--precision-table",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--data-dir",
            str(mnist_dir),
            "--test-subset",
            "40",
        ]
    )
    typed = load_checkpoint(out).card
    before, after = load_checkpoint(source).card.to_dict(), typed.to_dict()
    rows = after["metrics"]["precision_table"]
    assert [(row["tol"], row["precision"]) for row in rows] == [
        (tol, precision) for tol in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) for precision in ("float32", "bfloat16")
    ]
    for exact, low in zip(rows[::2], rows[1::2]):
        assert exact["test_error"] == next(
            r["test_error"] for r in after["metrics"]["table"] if r["tol"] == exact["tol"]
        )
        agrees = low["test_error"] <= exact["test_error"] + 0.0005 and low["nfe_mean"] <= 1.05 * exact["nfe_mean"]
        assert low["matches_float32"] is agrees and "matches_float32" not in exact
    assert after["hyper"] == before["hyper"] and after["tuned"]["settings"] == {"precision_table": True}
    served = ServedModel(
        name="x", version="v", kind="odenet", task=None, card=typed, adapter=None, default_tol=1e-3, device="cpu"
    )
    verdicts = [low["matches_float32"] for low in rows[1::2]]
    floor = next((tol for i, tol in enumerate((1e-4, 1e-3, 1e-2, 1e-1, 1.0)) if all(verdicts[i:])), None)
    assert served.bfloat16_from_tol == floor


def test_tune_measures_a_cnfs_directions_in_both_precisions(tmp_path):
    """The shipped moons CNF on 300 points: per tolerance and precision, both directions'
    NFE and per-point error against float32 tight solves, and bfloat16's verdict."""
    from training.__main__ import main

    out = tmp_path / "moons-precision.pt"
    main(
        [
            "tune",
            str(ROOT / "checkpoints" / "cnf-moons.pt"),
            "--precision-table",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--test-subset",
            "300",
        ]
    )
    rows = load_checkpoint(out).card.to_dict()["metrics"]["precision_table"]
    assert [row["precision"] for row in rows] == ["float32", "bfloat16"] * 5
    for exact, low in zip(rows[::2], rows[1::2]):
        assert exact["tol"] == low["tol"] and low["forward_nfe_mean"] > 0 and exact["back_log_density_error"] >= 0
        agrees = all(
            low[f"{way}_log_density_error"] <= exact[f"{way}_log_density_error"] + 0.01
            and low[f"{way}_nfe_mean"] <= 1.05 * exact[f"{way}_nfe_mean"]
            for way in ("back", "forward")
        )
        assert low["matches_float32"] is agrees
    loose = rows[7]  # bfloat16 at tol 1e-1: its rounding is far below what the tolerance allows
    assert loose["tol"] == 0.1 and loose["back_log_density_error"] < 0.1


def test_tune_refuses_models_without_an_ode_bad_steps_and_overwriting(tmp_path, capsys):
    from neuralode.checkpoint import save_checkpoint
    from training.__main__ import main

    mlp = save_checkpoint(tmp_path / "mlp.pt", build_model("mlp", {}), {"kind": "mlp", "hyper": {}})
    with pytest.raises(SystemExit, match="a mlp has no ODE solve to tune"):
        main(["tune", str(mlp), "--first-step", "1", "--out", str(tmp_path / "out.pt"), "--device", "cpu"])
    moons = ROOT / "checkpoints" / "cnf-moons.pt"
    with pytest.raises(SystemExit, match="--out must name a new file"):
        main(["tune", str(moons), "--first-step", "1", "--out", str(moons), "--device", "cpu"])
    with pytest.raises(SystemExit):
        main(["tune", str(moons), "--first-step", "0", "--out", str(tmp_path / "out.pt")])
    assert "a first step must be > 0 (or 'rule'), got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="nothing to tune: give --first-step, --precision-table or both"):
        main(["tune", str(moons), "--out", str(tmp_path / "out.pt"), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]


def test_evaluate_measures_under_a_first_step_and_says_so(tmp_path, monkeypatch):
    import neuralode.checkpoint as checkpoint
    from training.__main__ import main

    reads, read = [], checkpoint._read
    monkeypatch.setattr(checkpoint, "_read", lambda path: reads.append(path) or read(path))
    main(
        [
            "evaluate",
            str(ROOT / "checkpoints" / "cnf-8gaussians.pt"),
            "--first-step",
            "1",
            "--tols",
            "1",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    report = json.loads((tmp_path / "cnf-8gaussians-eval.json").read_text())
    assert report["first_step"] == 1.0 and report["rows"][0]["nfe_mean"] == 7.0
    assert reads == [ROOT / "checkpoints" / "cnf-8gaussians.pt"]  # the file read once, its card with it


def test_a_missing_train_extra_is_named_instead_of_a_traceback(monkeypatch):
    from training.__main__ import main

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if it were not installed
    with pytest.raises(SystemExit, match=r"needs the 'train' extra \(tqdm missing\): pip install"):
        main(["cnf", "--data", "moons"])


def test_step_based_commands_have_no_epochs_flag():
    from training.__main__ import parse

    with pytest.raises(SystemExit):
        parse(["cnf", "--data", "moons", "--epochs", "3"])
    assert parse(["cnf", "--data", "moons"]).steps == 1000
    assert parse(["odenet"]).epochs == 3


def test_adjoint_and_backprop_give_matching_gradients_on_odenet():
    """On the real ODE-Net the two agree to about the tolerance's effect, not to rounding: ReLU
    makes ∂f/∂z jump where units switch, so the discrete and the continuous gradient differ
    (torchdiffeq's own adjoint and direct gradients differ by ~1e-2 here too). The smooth
    case, agreement to 1e-6 and better, is tests/neuralode/test_adjoint.py."""
    torch.manual_seed(0)
    model = ODENet().double()
    images, labels = torch.rand(2, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 7])
    gradients = []
    for adjoint in (True, False):
        model.zero_grad()
        model.block.adjoint = adjoint
        logits, _ = model(images, rtol=1e-6, atol=1e-6)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    adjoint, direct = gradients
    assert float((adjoint - direct).norm() / direct.norm()) < 5e-2
    assert float(torch.nn.functional.cosine_similarity(adjoint, direct, dim=0)) > 0.999


def test_data_parallel_training_matches_one_process(tmp_path, mnist_dir):
    common = [
        "--data-dir",
        str(mnist_dir),
        "--steps",
        "2",
        "--train-subset",
        "256",
        "--test-subset",
        "50",
        "--no-shuffle",
        "--no-augment",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--seed",
        "1",
    ]
    _run(
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        "odenet",
        "--out",
        str(tmp_path / "ddp.pt"),
        "--batch-size",
        "32",
        *common,
        module="torch.distributed.run",
    )
    _run("odenet", "--out", str(tmp_path / "single.pt"), "--batch-size", "64", *common, env={"OMP_NUM_THREADS": "1"})
    _run("odenet", "--out", str(tmp_path / "half.pt"), "--batch-size", "32", *common, env={"OMP_NUM_THREADS": "1"})
    torch.manual_seed(1)
    initial = torch.cat(
        [p.flatten() for p in build_model("odenet", {"channels": 64, "method": "dopri5", "tol": 1e-3}).parameters()]
    )

    def update(name: str) -> torch.Tensor:
        checkpoint = load_checkpoint(tmp_path / name)
        return torch.cat([p.detach().flatten() for p in checkpoint.model.parameters()]) - initial.detach()

    ddp, single, half = update("ddp.pt"), update("single.pt"), update("half.pt")
    assert load_checkpoint(tmp_path / "ddp.pt").card.training.world_size == 2
    # Per-sample solving makes each image's gradient independent of its batch, so two ranks
    # of 32 equal one process of 64 up to float rounding (and the rare accept/reject flip it
    # can cause at tol 1e-3); one rank's half of the data alone is clearly different.
    assert float((ddp - single).norm() / single.norm()) < 0.02
    assert float((half - single).norm() / single.norm()) > 0.1


def test_cnf_maximum_likelihood_training_improves_test_likelihood(tmp_path):
    out = tmp_path / "cnf.pt"
    _run(
        "cnf",
        "--data",
        "8gaussians",
        "--steps",
        "30",
        "--batch-size",
        "128",
        "--lr",
        "5e-3",
        "--out",
        str(out),
        "--hidden",
        "32",
        "32",
        "--device",
        "cpu",
    )
    from training.densities import test_log_likelihood

    checkpoint = load_checkpoint(out)
    torch.manual_seed(0)
    untrained = build_model("cnf", checkpoint.card.hyper).eval()
    before = test_log_likelihood(untrained, "8gaussians", 1e-3, "cpu", points=1000)["test_log_likelihood"]
    after = test_log_likelihood(checkpoint.model, "8gaussians", 1e-3, "cpu", points=1000)["test_log_likelihood"]
    assert after > before + 0.3
    assert checkpoint.card.training.objective == "maximum likelihood"
    # The card tells a client what each tolerance buys in both directions it is served.
    directions = checkpoint.card.metrics.directions
    assert directions.reference_tol == 1e-8 and [row.tol for row in directions.rows] == [
        1e-4,
        1e-3,
        1e-2,
        1e-1,
        1.0,
    ]
    tight, loose = directions.rows[0], directions.rows[3]
    for way in ("back", "forward"):
        assert getattr(tight, f"{way}_nfe_mean") > getattr(loose, f"{way}_nfe_mean")
        assert 0 <= getattr(tight, f"{way}_log_density_error") < 1e-3  # a short training's flow is nearly straight


def test_the_density_plot_title_names_the_model_and_what_the_plotted_solves_cost():
    from training.densities import _plot_title

    card = ModelCard(
        kind="cnf",
        hyper={"dynamics": "concatsquash", "hidden": [64, 64], "trace": "exact", "method": "dopri5"},
        training=Training(regularisation={"kinetic": 0.0, "local_error": 0.05}),
    )
    title = _plot_title(card, 1e-4, {"back": 23.94, "forward": 20.4})
    assert title == (
        "CNF, concatsquash dynamics (hidden [64, 64]), exact trace, dopri5, local_error 0.05\n"
        "tol 0.0001: mean NFE 23.9 for the density (back), 20.4 for sampling"
    )


def test_regularised_odenet_training_records_its_settings(tmp_path, mnist_dir):
    out = tmp_path / "odenet-reg.pt"
    _run(
        "odenet",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--tol",
        "1e-1",
        "--train-subset",
        "64",
        "--test-subset",
        "16",
        "--kinetic",
        "0.01",
        "--jacobian",
        "0.02",
        "--device",
        "cpu",
    )
    training = load_checkpoint(out).card.training
    assert training.regularisation == {"kinetic": 0.01, "jacobian": 0.02}
    assert training.precision == "float32"
    assert training.device.startswith(f"{cpu_description()}, ")  # the CPU's model, then torch's threads
    assert training.peak_memory_mib["host_rss"] > 100
    epoch_line = next(line for line in out.with_suffix(".log").read_text().splitlines() if "epoch 1:" in line)
    assert "kinetic" in epoch_line and "jacobian" in epoch_line


def _assert_written_typed(path: Path, card: ModelCard) -> None:
    """Training built the card typed: every key it wrote is a typed field, the file's JSON is
    the card's, and reading the card alone gives the same card."""
    from neuralode.checkpoint import read_card

    raw = json.loads(torch.load(path, weights_only=True)["card"])
    assert card.to_dict() == raw and read_card(path) == card
    for record in (card, card.dataset, card.training, card.metrics, *card.metrics.table):
        assert record.extra == {}, record.extra


def test_training_with_a_first_step_solves_and_ships_with_it(tmp_path, mnist_dir):
    """``--first-step`` is a model setting from the first optimizer step on: the card carries it,
    the loaded model solves with it, and the card's table is measured under it (a nearly still
    CNF crosses the span in one dopri5 step at tol 1: 7 evaluations, where Hairer's rule needs 14)."""
    cnf = tmp_path / "cnf.pt"
    _run(
        "cnf",
        "--data",
        "8gaussians",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--hidden",
        "8",
        "--first-step",
        "1",
        "--out",
        str(cnf),
        "--device",
        "cpu",
    )
    checkpoint = load_checkpoint(cnf)
    assert checkpoint.card.hyper["first_step"] == 1.0 and checkpoint.model.first_step == 1.0
    assert {row.tol: row.nfe_mean for row in checkpoint.card.metrics.table}[1.0] == 7.0
    _assert_written_typed(cnf, checkpoint.card)
    assert len(checkpoint.card.metrics.directions.rows) == 5 and checkpoint.card.training.objective
    odenet = tmp_path / "odenet.pt"
    _run(
        "odenet",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(odenet),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--tol",
        "1e-1",
        "--train-subset",
        "16",
        "--test-subset",
        "8",
        "--first-step",
        "0.5",
        "--device",
        "cpu",
    )
    checkpoint = load_checkpoint(odenet)
    assert checkpoint.card.hyper["first_step"] == 0.5 and checkpoint.model.block.first_step == 0.5
    _assert_written_typed(odenet, checkpoint.card)
    assert checkpoint.card.training.test_error_history and checkpoint.card.metrics.eval_device
    from training.__main__ import parse

    with pytest.raises(SystemExit):
        parse(["cnf", "--data", "moons", "--first-step", "0"])


def test_kinetic_regularisation_straightens_a_cnf():
    """Ten steps from the same start and data: with λ_K the learned flow moves the test points
    with much less kinetic energy than without (about a quarter here)."""
    import argparse

    from neuralode.models import Regularisation
    from training.densities import objective
    from training.toy import sample_density

    test_points = sample_density("8gaussians", 500, torch.Generator().manual_seed(1))
    args = argparse.Namespace(target=None, data="8gaussians", adjoint=True)
    energies = {}
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        model = build_model("cnf", {"dim": 2, "hidden": [16, 16], "tol": 1e-2})
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
        generator = torch.Generator().manual_seed(0)
        regularisation = Regularisation(kinetic=weight)
        for _ in range(10):
            loss, _, _ = objective(model, args, regularisation, 64, generator, "cpu")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            _, _, integrals = model.log_prob_regularised(test_points, Regularisation(kinetic=1.0))
        energies[weight] = float(integrals[:, 0].mean())
    assert energies[3.0] < 0.5 * energies[0.0]


@pytest.mark.parametrize(
    "flags, recorded, shown, not_shown",
    [
        (
            ("--kinetic", "0.1", "--density-curvature", "0.01"),
            {"kinetic": 0.1, "density_curvature": 0.01},
            "curvature=",
            "span_error=",
        ),
        (
            ("--local-error", "0.05", "--first-step", "1"),
            {"kinetic": 0.0, "local_error": 0.05},
            "span_error=",
            ", kinetic=",
        ),  # no integral columns without K, J or C
    ],
    ids=["density-curvature", "local-error"],
)
def test_cnf_training_weighs_the_cnf_only_terms_and_records_them(tmp_path, flags, recorded, shown, not_shown):
    out = tmp_path / "cnf.pt"
    result = _run(
        "cnf",
        "--data",
        "8gaussians",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--hidden",
        "8",
        *flags,
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    regularisation = load_checkpoint(out).card.training.regularisation
    assert regularisation == {"jacobian": 0.0, **recorded}
    assert shown in result.stderr and not_shown not in result.stderr  # the progress bar shows each term


@pytest.mark.parametrize("task", [("--data", "8gaussians"), ("--target", "U1")], ids=["likelihood", "reverse-kl"])
def test_the_local_error_term_lowers_the_whole_span_error(task):
    """The same short training with and without the term: with it, the whole-span trial steps'
    scaled errors on held-out starting points end lower, back from the data end and forward from
    the base (both objectives)."""
    from training.__main__ import parse
    from training.common import regularisation_from
    from training.densities import objective

    args = parse(["cnf", *task, "--hidden", "16", "16", "--tol", "1e-3", "--first-step", "1"])
    args.adjoint = True
    held_out = torch.randn(256, 2, generator=torch.Generator().manual_seed(7)) * 1.5
    span_errors = {}
    for weight in (0.0, 1.0):
        args.local_error = weight
        regularisation = regularisation_from(args)
        torch.manual_seed(0)
        model = build_model(
            "cnf", {"dim": 2, "dynamics": "concatsquash", "hidden": [16, 16], "tol": 1e-3, "first_step": 1.0}
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            loss, _, columns = objective(model, args, regularisation, 64, generator, "cpu")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert (columns is None) == (weight == 0) and (columns is None or columns.shape == (64, 1))
        with torch.no_grad():
            span_errors[weight] = [float(model.span_error(held_out, forward=way).mean()) for way in (False, True)]
    with_term, without = span_errors[1.0], span_errors[0.0]
    assert sum(with_term) < 0.5 * sum(without) and all(w < wo for w, wo in zip(with_term, without)), span_errors


def test_regularisers_are_refused_where_there_is_no_ode_or_the_weight_is_negative(capsys):
    from training.__main__ import parse
    from training.common import regularisation_from

    for kind in ("resnet", "mlp", "planar-nf"):
        with pytest.raises(SystemExit):
            parse([kind, "--target", "U1", "--kinetic", "0.1"] if kind == "planar-nf" else [kind, "--kinetic", "0.1"])
        assert "unrecognized arguments: --kinetic" in capsys.readouterr().err
    for kind in ("odenet", "rknet"):
        with pytest.raises(SystemExit):
            parse([kind, "--density-curvature", "0.1"])
        assert "unrecognized arguments: --density-curvature" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="kinetic weight must be finite and >= 0"):
        regularisation_from(parse(["cnf", "--data", "moons", "--kinetic", "-1"]))
    assert regularisation_from(parse(["rknet", "--jacobian", "0.5"])).jacobian == 0.5


def test_planar_flow_reverse_kl_training_lowers_the_kl(tmp_path):
    from training.densities import kl_estimate

    out = tmp_path / "nf.pt"
    _run("planar-nf", "--target", "U1", "--layers", "8", "--steps", "300", "--out", str(out), "--device", "cpu")
    checkpoint = load_checkpoint(out)
    torch.manual_seed(0)
    untrained = build_model("planar-nf", checkpoint.card.hyper)
    before = kl_estimate(untrained, "U1", None, "cpu")["kl_plus_log_z"]
    after = kl_estimate(checkpoint.model, "U1", None, "cpu")["kl_plus_log_z"]
    assert after < before - 1.0
    assert checkpoint.card.metrics.kl_plus_log_z == pytest.approx(after)


def test_training_refuses_contradictory_flags(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "rknet", "--adjoint", "--out", str(tmp_path / "x.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "rknet does not train with the adjoint" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "training", "planar-nf", "--data", "moons"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "reverse KL" in result.stderr


def test_bfloat16_training_runs_where_the_cpu_computes_it_and_is_refused_where_it_would_be_emulated(
    tmp_path, mnist_dir
):
    """``--precision bfloat16``: on a CPU with bfloat16 units a short run trains and its card
    and recipe say so; on one without (CI's), the run is refused before it starts, with why."""
    from neuralode.precision import computes_natively

    out = tmp_path / "bf16.pt"
    command = [sys.executable, "-m", "training", "odenet", "--precision", "bfloat16", "--data-dir", str(mnist_dir)]
    command += ["--steps", "2", "--batch-size", "8", "--tol", "1e-1", "--train-subset", "32", "--test-subset", "16"]
    result = subprocess.run(
        [*command, "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if computes_natively("bfloat16", torch.device("cpu")):
        assert result.returncode == 0, result.stderr[-3000:]
        assert load_checkpoint(out).card.training.precision == "bfloat16"
        assert torch.load(out.with_suffix(".state.pt"), weights_only=True)["recipe"]["precision"] == "bfloat16"
    else:
        assert result.returncode != 0 and not out.exists()
        assert "has no bfloat16 units, so it would be emulated" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_preset_fills_defaults_and_explicit_flags_win():
    from training.__main__ import parse
    from training.presets import PRESETS

    preset = parse(["odenet", "--preset", "gpu-paper"])
    for name, value in PRESETS["gpu-paper"].items():
        assert getattr(preset, name) == value, name
    overridden = parse(["odenet", "--preset", "gpu-paper", "--batch-size", "64", "--no-tf32", "--device", "cpu"])
    assert (overridden.batch_size, overridden.tf32, overridden.device) == (64, False, "cpu")
    assert overridden.lr == PRESETS["gpu-paper"]["lr"]
    assert parse(["odenet"]).batch_size == 128  # no preset, the plain defaults


def test_a_time_budget_fits_the_steps_to_the_measured_step_time(tmp_path, mnist_dir):
    out = tmp_path / "budget.pt"
    _run(
        "odenet",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--epochs",
        "100",
        "--batch-size",
        "8",
        "--time-budget",
        "8",
        "--eval-every",
        "0",
        "--train-subset",
        "512",
        "--test-subset",
        "100",
        "--device",
        "cpu",
        "--tol",
        "1e-2",
    )
    training = load_checkpoint(out).card.training
    assert 25 <= training.steps < 100 * 64  # stopped by the budget, not by the epochs
    assert training.time_budget_s == 8.0
    assert training.duration_s < 8.0 * 1.5
    log = out.with_suffix(".log").read_text()
    assert "time budget 8 s:" in log and log.count("test error") == 1  # evaluated at the end only


def test_comparison_plot_labels_tolerances_that_land_on_one_point_together():
    from training.evaluate import _labels_by_point

    rows = [{"tol": tol} for tol in (1e-4, 1e-3, 1e-1, 1.0)]
    labels = _labels_by_point([22.8, 11.5, 7.0, 7.0], [-2.827, -2.830, -2.8167, -2.8167], rows)
    assert list(labels.values()) == ["0.0001", "0.001", "0.1, 1"]


RESUME_RUN = [
    "--steps",
    "12",
    "--batch-size",
    "16",
    "--train-subset",
    "96",
    "--test-subset",
    "50",
    "--eval-every",
    "1",
    "--tol",
    "1e-2",
    "--device",
    "cpu",
    "--seed",
    "5",
]


@pytest.mark.parametrize("kind", ["odenet", "resnet"])
def test_a_run_stopped_and_resumed_gives_the_weights_of_the_run_that_never_stopped(kind, tmp_path, mnist_dir):
    # 6 steps an epoch: the first sitting stops mid-epoch (step 4), the second at an epoch's
    # end (step 6, its evaluation still to do), the third finishes; shuffling, crops and the
    # schedule all run, with every random stream restored.
    common = [kind, "--data-dir", str(mnist_dir), *RESUME_RUN]
    env = {"OMP_NUM_THREADS": "1"}
    _run(*common, "--out", str(tmp_path / "whole.pt"), env=env)
    broken = tmp_path / "broken.pt"
    state = tmp_path / "broken.state.pt"
    first = _run(*common, "--out", str(broken), "--stop-after", "4", env=env)
    assert not broken.exists() and state.exists()
    assert f"--resume {state}" in first.stderr
    _run(*common, "--out", str(broken), "--resume", str(state), "--stop-after", "2", env=env)
    second, moved = state.read_bytes(), tmp_path / "moved.state.pt"
    resumed = _run(*common, "--out", str(broken), "--resume", str(state), "--state", str(moved), env=env)
    assert "resumed from" in resumed.stderr and "epoch 1, batch 6 of 6, step 6 of 12" in resumed.stderr
    assert state.read_bytes() == second and moved.exists()  # --state: the state read from stays as it was
    whole, parts = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(broken)
    for (name, a), b in zip(whole.model.state_dict().items(), parts.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert parts.card.training.sittings == 3 and whole.card.training.sittings == 1
    history = parts.card.training.test_error_history
    assert [row["epoch"] for row in history] == [1, 2]
    assert [row["test_error"] for row in history] == [
        row["test_error"] for row in whole.card.training.test_error_history
    ]
    log = broken.with_suffix(".log").read_text()
    assert log.count("resumed from") == 2 and log.count("epoch 1:") == 1  # one log across the sittings
    epoch_lines = [line.split(" INFO ")[1].split(", train loss")[1] for line in log.splitlines() if "epoch 1:" in line]
    whole_lines = (tmp_path / "whole.log").read_text().splitlines()
    assert epoch_lines == [
        line.split(" INFO ")[1].split(", train loss")[1] for line in whole_lines if "epoch 1:" in line
    ]


def test_a_state_from_another_recipe_or_a_corrupt_file_is_refused(tmp_path, mnist_dir):
    common = ["odenet", "--data-dir", str(mnist_dir), *RESUME_RUN, "--out", str(tmp_path / "a.pt")]
    _run(*common, "--stop-after", "1")
    state = tmp_path / "a.state.pt"
    other = subprocess.run(
        [sys.executable, "-m", "training", *common, "--lr", "0.5", "--resume", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode != 0 and "another recipe (lr: state 0.002, this run 0.5)" in other.stderr
    assert "Traceback" not in other.stderr
    other_model = subprocess.run(
        [sys.executable, "-m", "training", "resnet", *common[1:], "--resume", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other_model.returncode != 0 and "kind: state 'odenet', this run 'resnet'" in other_model.stderr
    corrupt = tmp_path / "corrupt.state.pt"
    corrupt.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    refused = subprocess.run(
        [sys.executable, "-m", "training", *common, "--resume", str(corrupt)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "not a readable training-state file" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_sigterm_writes_a_last_state_that_resumes(tmp_path, mnist_dir):
    import signal
    import time

    out = tmp_path / "signalled.pt"
    command = [
        sys.executable,
        "-m",
        "training",
        "odenet",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
        "--steps",
        "100000",
        "--batch-size",
        "8",
        "--train-subset",
        "800",
        "--test-subset",
        "20",
        "--tol",
        "1e-1",
        "--device",
        "cpu",
        "--state-every",
        "0",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    log = out.with_suffix(".log")
    deadline = time.monotonic() + 120
    while "steps (" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # some steps in
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped (signal 15)" in stderr and "Traceback" not in stderr
    from training.state import FORMAT

    state = torch.load(out.with_suffix(".state.pt"), weights_only=True)
    assert state["format"] == FORMAT and state["position"]["step"] >= 1 and not out.exists()


def test_card_piped_into_a_reader_that_stops_early_ends_quietly():
    process = subprocess.Popen(
        [sys.executable, "-m", "training", "card", "checkpoints/odenet-mnist.pt"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    process.stdout.close()  # a reader gone before the card is printed, as `| head -1` is after its line
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and b"Traceback" not in stderr and b"BrokenPipe" not in stderr


def test_missing_mnist_names_the_folder_and_the_flag(tmp_path):
    from training.data import load_mnist

    with pytest.raises(SystemExit) as refused:
        load_mnist(tmp_path, train=False, download=False)
    assert f"MNIST not found under {tmp_path} (torchvision's layout: {tmp_path / 'MNIST' / 'raw'})" in str(
        refused.value
    )
    assert "pass --data-dir" in str(refused.value)
