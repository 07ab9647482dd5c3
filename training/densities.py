"""Training 2-D density models: CNFs by maximum likelihood on toy data or by reverse KL to an
energy target, and the discrete planar flow by reverse KL (the seed's NF-vs-CNF comparison)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from neuralode.card import Dataset, DirectionRow, Directions, Metrics, ModelCard, TableRow, Training
from neuralode.checkpoint import save_checkpoint
from neuralode.models import CNF, PlanarFlow, Regularisation, build_model, model_spec
from neuralode.solvers import Solution

from .classifiers import PRECISION_NFE_MARGIN, warmup_cosine
from .common import (
    command_line,
    device_name,
    first_step_hyper,
    peak_memory,
    regularisation_from,
    resolve_device,
    seed_everything,
    setup_logging,
)
from .toy import energy, sample_density

log = logging.getLogger("training")

TEST_POINTS = 5000
TEST_SEED = 12345  # held-out test points come from their own stream
TABLE_TOLERANCES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
REFERENCE_TOL = 1e-8  # what a direction's error is measured against


def cnf_hyper(args: argparse.Namespace) -> dict:
    hyper = {
        "dim": 2,
        "dynamics": args.dynamics,
        "trace": args.trace,
        "t1": args.t1,
        "tol": args.tol,
        "method": args.method,
    }
    if args.dynamics == "planar":
        hyper["width"] = args.width
    else:
        hyper["hidden"] = list(args.hidden)
    return hyper | first_step_hyper(args)


def objective(
    model: nn.Module,
    args: argparse.Namespace,
    regularisation: Regularisation,
    batch: int,
    generator: torch.Generator,
    device,
) -> tuple[Tensor, Solution | None, Tensor | None]:
    """The training loss, the solver stats (None for the discrete flow) and, when
    regularising, the regularisers' integrals ``[B, columns]`` (already in the loss), with the
    local error term's trial steps as a last column when it is weighed."""
    loss, solution, integrals, data_end = _fit_objective(model, args, regularisation, batch, generator, device)
    if regularisation.local_error == 0:
        return loss, solution, integrals
    # A CNF is solved both ways (LogDensity from the data, Sample from the base): one trial step
    # over the whole span from each end, back from the data points and forward from base draws.
    assert data_end is not None  # the local error term is weighed for CNFs, which have a data end
    cnf = cast(CNF, model)
    base_draws = torch.randn(data_end.shape, generator=generator, device=device, dtype=data_end.dtype)
    span_error = (
        cnf.span_error(data_end, forward=False, generator=generator)
        + cnf.span_error(base_draws, forward=True, generator=generator)
    ) / 2
    column = span_error.detach()[:, None]
    integrals = column if integrals is None else torch.cat([integrals.detach(), column], 1)
    return loss + regularisation.local_error * span_error.mean(), solution, integrals


def _fit_objective(
    model: nn.Module,
    args: argparse.Namespace,
    regularisation: Regularisation,
    batch: int,
    generator: torch.Generator,
    device,
) -> tuple[Tensor, Solution | None, Tensor | None, Tensor | None]:
    """:func:`objective` without the local error term, and the points at the data end of its
    solve: the data, or the samples for reverse KL (None for the discrete flow)."""
    adjoint = bool(args.adjoint)
    if args.target:  # reverse KL to p ∝ exp(-U), up to log Z: E_q[log q(x) + U(x)]
        if isinstance(model, PlanarFlow):
            x, log_q = model.sample(batch, generator=generator)
            return (log_q + energy(args.target)(x)).mean(), None, None, None
        cnf = cast(CNF, model)
        if not regularisation.active:
            x, log_q, solution = cnf.sample(batch, generator=generator, adjoint=adjoint, device=device)
            return (log_q + energy(args.target)(x)).mean(), solution, None, x.detach()
        x, log_q, solution, integrals = cnf.sample_regularised(
            batch, regularisation, generator=generator, adjoint=adjoint, device=device
        )
        kl = (log_q + energy(args.target)(x)).mean()
        return kl + regularisation.penalty(integrals), solution, integrals, x.detach()
    data = sample_density(args.data, batch, generator).to(device)
    cnf = cast(CNF, model)  # maximum likelihood trains CNFs (the planar flow is not invertible in closed form)
    if not regularisation.active:
        log_p, solution = cnf.log_prob(data, adjoint=adjoint, generator=generator)
        return -log_p.mean(), solution, None, data
    log_p, solution, integrals = cnf.log_prob_regularised(data, regularisation, adjoint=adjoint, generator=generator)
    return -log_p.mean() + regularisation.penalty(integrals), solution, integrals, data


def _column_names(regularisation: Regularisation) -> list[str]:
    """What the columns :func:`objective` returns beside the loss hold, for the progress bar."""
    names = ["kinetic", "jacobian"] + ["curvature"] * (regularisation.density_curvature > 0)
    return (names if regularisation.active else []) + ["span_error"] * (regularisation.local_error > 0)


@torch.no_grad()
def test_log_likelihood(model: CNF, data_name: str, tol: float, device, points: int = TEST_POINTS) -> dict:
    data = sample_density(data_name, points, torch.Generator().manual_seed(TEST_SEED)).to(device)
    begin = time.perf_counter()
    log_p, solution = model.log_prob(data, rtol=tol, atol=tol, generator=torch.Generator(device=device).manual_seed(0))
    return {
        "tol": tol,
        "test_log_likelihood": float(log_p.mean()),
        "nfe_mean": float(solution.nfe.double().mean()),
        "time_per_1000_s": (time.perf_counter() - begin) * 1000 / points,
    }


@torch.no_grad()
def direction_errors(
    model: CNF,
    data_name: str,
    device,
    points: int = TEST_POINTS,
    reference: float = REFERENCE_TOL,
    precision: str = "float32",
) -> dict:
    """What each tolerance buys a client, in both directions a CNF is served, against solves at
    ``reference``: back from the held-out points (``LogDensity``: mean NFE and mean
    |log p - log p_ref| per point) and forward from base draws (``Sample``: mean NFE and mean
    |log q - log p_ref(x)| per sample, log q being what the sampling solve reports for its own
    sample x, so the error in x and in log q both count). ``precision`` is what f is evaluated
    in for the measured solves; the reference solves are float32."""
    data = sample_density(data_name, points, torch.Generator().manual_seed(TEST_SEED)).to(device)
    exact_back, _ = model.log_prob(data, rtol=reference, atol=reference)
    rows = []
    for tol in TABLE_TOLERANCES:
        log_p, back = model.log_prob(data, rtol=tol, atol=tol, precision=precision)
        x, log_q, forward = model.sample(
            points,
            rtol=tol,
            atol=tol,
            precision=precision,
            generator=torch.Generator(device=device).manual_seed(0),
            device=device,
        )
        exact_forward, _ = model.log_prob(x, rtol=reference, atol=reference)
        rows.append(
            {
                "tol": tol,
                "back_nfe_mean": float(back.nfe.double().mean()),
                "back_log_density_error": float((log_p - exact_back).abs().mean()),
                "forward_nfe_mean": float(forward.nfe.double().mean()),
                "forward_log_density_error": float((log_q - exact_forward).abs().mean()),
            }
        )
    return {"reference_tol": reference, "points": points, "rows": rows}


PRECISION_ERROR_MARGIN = 0.01
"""bfloat16 matches float32 at a tolerance when, in both directions, its mean per-point
log-density error is at most this many nats above float32's and its mean NFE at most
PRECISION_NFE_MARGIN times float32's (the classifiers' margin)."""


def precision_table(model: CNF, data_name: str, device, points: int = TEST_POINTS) -> list[dict]:
    """Each table tolerance in float32 and in bfloat16, both directions, against the same
    float32 reference solves, and whether bfloat16 matched float32: what ``precision=auto`` reads."""
    exact, low = (
        direction_errors(model, data_name, device, points, precision=p)["rows"] for p in ("float32", "bfloat16")
    )
    rows = []
    for f32, bf16 in zip(exact, low, strict=True):
        matches = all(
            bf16[f"{way}_log_density_error"] <= f32[f"{way}_log_density_error"] + PRECISION_ERROR_MARGIN
            and bf16[f"{way}_nfe_mean"] <= PRECISION_NFE_MARGIN * f32[f"{way}_nfe_mean"]
            for way in ("back", "forward")
        )
        rows += [{**f32, "precision": "float32"}, {**bf16, "precision": "bfloat16", "matches_float32": matches}]
    return rows


@torch.no_grad()
def kl_estimate(model: nn.Module, target: str, tol: float | None, device, points: int = TEST_POINTS) -> dict:
    generator = torch.Generator(device=device).manual_seed(TEST_SEED)
    if isinstance(model, PlanarFlow):
        x, log_q = model.sample(points, generator=generator)
        return {"tol": None, "kl_plus_log_z": float((log_q + energy(target)(x)).mean())}
    x, log_q, solution = cast(CNF, model).sample(points, rtol=tol, atol=tol, generator=generator, device=device)
    return {
        "tol": tol,
        "kl_plus_log_z": float((log_q + energy(target)(x)).mean()),
        "nfe_mean": float(solution.nfe.double().mean()),
    }


def train(kind: str, args: argparse.Namespace) -> Path:
    if bool(args.data) == bool(args.target):
        raise SystemExit("give exactly one of --data (maximum likelihood) or --target (reverse KL)")
    if not model_spec(kind).has_ode and not args.target:  # the planar flow
        raise SystemExit(f"{kind} is not invertible in closed form: train it by --target (reverse KL)")
    regularisation = regularisation_from(args)
    device = resolve_device(args.device)
    out = Path(args.out)
    setup_logging(out.with_suffix(".log"), True)
    generator = seed_everything(args.seed)
    if device.type == "cuda":
        generator = torch.Generator(device=device).manual_seed(args.seed)
    if not model_spec(kind).has_ode:  # the planar flow
        hyper = {"dim": 2, "layers": args.layers}
        args.adjoint = False
    else:
        hyper = cnf_hyper(args)
        args.adjoint = True if args.adjoint is None else args.adjoint
    model = build_model(kind, hyper).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = warmup_cosine(optimizer, args.steps, 0.02)
    task = f"target {args.target}" if args.target else f"data {args.data}"
    log.info(
        "%s %s: %d parameters, %s, %d steps at batch %d, %s, %s",
        kind,
        hyper,
        sum(p.numel() for p in model.parameters()),
        task,
        args.steps,
        args.batch_size,
        regularisation,
        device_name(device),
    )

    begin = time.perf_counter()
    losses = []
    bar = tqdm(range(args.steps), desc=kind)
    for _ in bar:
        loss, solution, integrals = objective(model, args, regularisation, args.batch_size, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        postfix = {"loss": f"{sum(losses[-20:]) / len(losses[-20:]):.3f}"}
        if solution is not None:
            postfix["nfe_f"] = f"{float(solution.nfe.double().mean()):.0f}"
            if solution.backward is not None and solution.backward.nfe is not None:
                postfix["nfe_b"] = f"{float(solution.backward.nfe.double().mean()):.0f}"
        if integrals is not None:
            means = integrals.detach().double().mean(0).tolist()
            postfix |= {name: f"{value:.3g}" for name, value in zip(_column_names(regularisation), means)}
        bar.set_postfix(postfix, refresh=False)
    duration = time.perf_counter() - begin
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    log.info("trained in %.1f s, final loss (mean of last 50) %.4f", duration, final_loss)

    model.eval()
    metrics = card_metrics(model, kind, args.data or f"energy {args.target}", args.tol, device)
    card = ModelCard(
        kind=kind,
        hyper=hyper,
        task="density",
        input={"dim": 2, "dtype": "float32"},
        dataset=Dataset(name=args.data or f"energy {args.target}", test_points=TEST_POINTS, test_seed=TEST_SEED),
        training=Training(
            command=command_line(),
            objective="reverse KL" if args.target else "maximum likelihood",
            tol=args.tol if model_spec(kind).has_ode else None,
            adjoint=bool(args.adjoint),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=device_name(device),
            regularisation=regularisation.card() if model_spec(kind).has_ode else None,
            duration_s=round(duration, 1),
            peak_memory_mib=peak_memory(device),
        ),
        metrics=metrics.replace(final_train_loss=final_loss),
    )
    save_checkpoint(out, model, card)
    log.info("wrote %s", out)
    return out


def card_metrics(model: nn.Module, kind: str, dataset: str, tol: float, device) -> Metrics:
    """A model card's evaluation: the table over the tolerances and the headline figure at the
    training ``tol``; ``dataset`` is a toy density's name or ``"energy <target>"``."""
    if dataset.startswith("energy "):
        target = dataset.split()[1]
        tols = TABLE_TOLERANCES if model_spec(kind).has_ode else (None,)
        at_training_tol = tol if model_spec(kind).has_ode else None
        table = [kl_estimate(model, target, t, device) for t in tols]
        metrics = Metrics(
            table=tuple(TableRow(**row) for row in table),
            kl_plus_log_z=kl_estimate(model, target, at_training_tol, device)["kl_plus_log_z"],
        )
    else:
        cnf = cast(CNF, model)  # a density trained on data is a CNF (the planar flow trains by reverse KL)
        table = [test_log_likelihood(cnf, dataset, t, device) for t in TABLE_TOLERANCES]
        metrics = Metrics(
            table=tuple(TableRow(**row) for row in table),
            test_log_likelihood=test_log_likelihood(cnf, dataset, tol, device)["test_log_likelihood"],
        )
        if isinstance(model, CNF):
            directions = direction_errors(model, dataset, device)
            for row in directions["rows"]:
                log.info("directions %s", row)
            metrics = metrics.replace(
                directions=Directions(
                    reference_tol=directions["reference_tol"],
                    points=directions["points"],
                    rows=tuple(DirectionRow(**row) for row in directions["rows"]),
                )
            )
    for row in table:
        log.info("eval %s", row)
    return metrics


def density_grid(model: CNF, extent: float, resolution: int, tol: float, device) -> tuple[Tensor, Tensor]:
    """log-density of a CNF on a square grid: (grid points [R*R, 2], log p [R*R])."""
    axis = torch.linspace(-extent, extent, resolution, device=device)
    xs, ys = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([xs.flatten(), ys.flatten()], 1)
    with torch.no_grad():
        log_p, _ = model.log_prob(points, rtol=tol, atol=tol)
    return points, log_p


def grid_mass(log_p: Tensor, extent: float, resolution: int) -> float:
    cell = (2 * extent / (resolution - 1)) ** 2
    return float(log_p.double().exp().sum() * cell)


def plot_density(model: nn.Module, card: ModelCard, path: Path, device, tol: float = 1e-4) -> Path:
    """Data (or target), learned density and samples side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extent, resolution = 4.0, 120
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    name = card.dataset.name
    assert name is not None  # every density card names its data or target
    axis = torch.linspace(-extent, extent, resolution)
    if name.startswith("energy "):
        xs, ys = torch.meshgrid(axis, axis, indexing="xy")
        target = torch.exp(-energy(name.split()[1])(torch.stack([xs.flatten(), ys.flatten()], 1)))
        axes[0].imshow(target.reshape(resolution, resolution), origin="lower", extent=[-extent, extent] * 2)
        axes[0].set_title(f"target exp(-{name.split()[1]})")
    else:
        data = sample_density(name, 20000, torch.Generator().manual_seed(TEST_SEED))
        axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=resolution, range=[[-extent, extent]] * 2)
        axes[0].set_title(f"data: {name}")
    nfe = {}
    if isinstance(model, CNF):
        points, log_p = density_grid(model, extent, resolution, tol, device)
        axes[1].imshow(log_p.exp().reshape(resolution, resolution).cpu(), origin="lower", extent=[-extent, extent] * 2)
        axes[1].set_title(f"learned density (tol {tol:g})")
        with torch.no_grad():
            _, back = model.log_prob(points[:2000], rtol=tol, atol=tol)
            samples, _, forward = model.sample(
                20000, rtol=tol, atol=tol, generator=torch.Generator(device=device).manual_seed(0)
            )
        nfe = {"back": float(back.nfe.double().mean()), "forward": float(forward.nfe.double().mean())}
    else:
        axes[1].axis("off")
        with torch.no_grad():
            samples, _ = cast(PlanarFlow, model).sample(20000, generator=torch.Generator(device=device).manual_seed(0))
    samples = samples.cpu()
    axes[2].hist2d(samples[:, 0].numpy(), samples[:, 1].numpy(), bins=resolution, range=[[-extent, extent]] * 2)
    axes[2].set_title("samples")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")  # the three panels the same square size
    fig.suptitle(_plot_title(card, tol, nfe), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _plot_title(card: ModelCard, tol: float, nfe: dict[str, float]) -> str:
    """What a reader needs to place the figure: the model, how it was trained, what the
    density and samples cost at the plotted tolerance."""
    hyper = card.hyper
    if not model_spec(card.kind).has_ode:
        return f"planar flow, {hyper['layers']} layers"
    shape = f"width {hyper['width']}" if hyper["dynamics"] == "planar" else f"hidden {hyper['hidden']}"
    title = f"CNF, {hyper['dynamics']} dynamics ({shape}), {hyper['trace']} trace, {hyper['method']}"
    regularisation = {k: v for k, v in (card.training.regularisation or {}).items() if v}
    if regularisation:
        title += ", " + ", ".join(f"{name} {value:g}" for name, value in sorted(regularisation.items()))
    title += f"\ntol {tol:g}: mean NFE {nfe['back']:.1f} for the density (back), {nfe['forward']:.1f} for sampling"
    return title
