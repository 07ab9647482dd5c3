"""``python -m training evaluate CHECKPOINT [CHECKPOINT ...]``: the seed's Table 1.

Classifiers: test error, NFE and time per batch of 1000 at each tolerance. Density models:
mean test log-likelihood (or the reverse-KL estimate for energy targets) per tolerance. One
checkpoint: printed, saved as ``<name>-eval.json`` and a PNG (error and cost vs tolerance, or
the learned density next to the data and samples). Several checkpoints of one dataset: a
side-by-side table, ``<a>-vs-<b>.json`` and one PNG of error (or log-likelihood) against mean
NFE, one curve per checkpoint over the tolerances — the trade-off a served model offers.
Everything goes to ``--out`` (default ``runs/eval``, git-ignored), never next to the
checkpoint: ``checkpoints/`` is the folder the server serves.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import date
from pathlib import Path
from typing import cast

from neuralode.card import ModelCard
from neuralode.checkpoint import Checkpoint, load_checkpoint
from neuralode.models import CNF
from neuralode.models.registry import CLASSIFY, model_spec

from .common import device_name, resolve_device


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    settings = {"first_step": args.first_step} if hasattr(args, "first_step") else None

    def overrides(card: ModelCard) -> dict | None:  # a model without an ODE has no solver to set
        return settings if model_spec(card.kind).has_ode else None

    checkpoints = [load_checkpoint(path, device, overrides) for path in args.checkpoints]  # each file read once
    _check_comparable(checkpoints)
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for path, checkpoint in zip(args.checkpoints, checkpoints):
        report = (
            _classifier_report(checkpoint, args, device)
            if model_spec(checkpoint.kind).task == CLASSIFY
            else _density_report(checkpoint, args, device)
        )
        reports.append(
            {
                "checkpoint": str(path),
                "name": path.stem,
                "trained": _provenance(checkpoint),
                "first_step": checkpoint.card.hyper.get("first_step"),
                **report,
            }
        )
    single = len(reports) == 1
    default = f"{args.checkpoints[0].stem}-eval" if single else "-vs-".join(path.stem for path in args.checkpoints)
    name = args.name or default  # may hold dots (odenet-mnist-k0.1-j0.1): no with_suffix
    png, json_path = out_dir / f"{name}.png", out_dir / f"{name}.json"
    if single:
        report = reports[0]
        _print_single(report)
        if model_spec(checkpoints[0].kind).task == CLASSIFY:
            _plot_classifier(report, png)
        else:
            from .densities import plot_density

            plot_density(checkpoints[0].model, checkpoints[0].card, png, device)
    else:
        report = {"compared": reports}
        _print_comparison(reports)
        _plot_comparison(reports, png)
    report["device"] = device_name(device)
    report["date"] = date.today().isoformat()
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path} and {png}")
    return report


# ---- measuring ------------------------------------------------------------------------
def _classifier_report(checkpoint: Checkpoint, args: argparse.Namespace, device) -> dict:
    from .classifiers import evaluate
    from .data import load_mnist

    test_set = load_mnist(args.data_dir, train=False).head(args.test_subset)
    tols = args.tols if model_spec(checkpoint.kind).has_ode else [None]
    rows = [evaluate(checkpoint.model, checkpoint.kind, test_set, device, tol).as_dict() for tol in tols]
    return {
        "kind": checkpoint.kind,
        "dataset": "MNIST",
        "metric": "test_error",
        "test_images": len(test_set),
        "regularisation": _regularisation(checkpoint),
        "rows": rows,
    }


def _density_report(checkpoint: Checkpoint, args: argparse.Namespace, device) -> dict:
    from .densities import kl_estimate, test_log_likelihood

    name = checkpoint.card.dataset.name
    assert name is not None  # every density card names its data or target
    if name.startswith("energy "):
        target = name.split()[1]
        tols = args.tols if model_spec(checkpoint.kind).has_ode else [None]
        rows = [kl_estimate(checkpoint.model, target, tol, device) for tol in tols]
        metric = "kl_plus_log_z"
    else:
        cnf = cast(CNF, checkpoint.model)  # a density trained on data is a CNF
        rows = [test_log_likelihood(cnf, name, tol, device) for tol in args.tols]
        metric = "test_log_likelihood"
    return {
        "kind": checkpoint.kind,
        "dataset": name,
        "metric": metric,
        "regularisation": _regularisation(checkpoint),
        "rows": rows,
    }


def _provenance(checkpoint: Checkpoint) -> dict:
    """How the checkpoint was made, from its card, so a saved report says what it compares."""
    training = checkpoint.card.training
    keys = ("command", "seed", "device", "duration_s")
    return {"code_version": checkpoint.card.code_version, **{k: getattr(training, k) for k in keys}}


def _regularisation(checkpoint: Checkpoint) -> dict | None:
    """The card's regularisation settings (cards from before they existed: none)."""
    return checkpoint.card.training.regularisation


def _check_comparable(checkpoints: list[Checkpoint]) -> None:
    """Side by side only makes sense on one task and dataset: checked on the cards, before any work."""
    datasets = {(c.card.task, c.card.dataset.name) for c in checkpoints}
    if len(datasets) > 1:
        raise SystemExit(
            f"compare checkpoints of one dataset; got {', '.join(f'{t} on {d}' for t, d in sorted(datasets))}"
        )


# ---- printing -------------------------------------------------------------------------
_LABELS = {"test_error": "test error", "test_log_likelihood": "log-lik", "kl_plus_log_z": "E[log q + U]"}


def _metric(report: dict, row: dict) -> str:
    value = row[report["metric"]]
    return f"{100 * value:.2f}%" if report["metric"] == "test_error" else f"{value:.4f}"


def _tol(row: dict) -> str:
    return "-" if row["tol"] is None else f"{row['tol']:g}"


def _nfe(row: dict) -> str:
    return "-" if row.get("nfe_mean") is None else f"{row['nfe_mean']:.1f}"


def _time(row: dict) -> str:
    return "-" if row.get("time_per_1000_s") is None else f"{row['time_per_1000_s']:.3f}"


def _print_single(report: dict) -> None:
    size = f"{report['test_images']} test images" if "test_images" in report else "held-out points"
    print(f"{report['name']} ({report['kind']}) on {report['dataset']}, {size}")
    print(f"{'tol':>8} {_LABELS[report['metric']]:>12} {'NFE':>8} {'time/1000 (s)':>14}")
    for row in report["rows"]:
        print(f"{_tol(row):>8} {_metric(report, row):>12} {_nfe(row):>8} {_time(row):>14}")


def _print_comparison(reports: list[dict]) -> None:
    """One row per tolerance, one column group (metric, NFE) per checkpoint."""
    width = max(22, *(len(r["name"]) + 2 for r in reports))
    print(f"{reports[0]['dataset']}: {_LABELS[reports[0]['metric']]} and mean NFE per tolerance")
    print(f"{'tol':>8} " + "".join(f"{r['name']:>{width}}" for r in reports))
    tols = sorted({row["tol"] for r in reports for row in r["rows"]}, key=lambda t: -1.0 if t is None else t)
    for tol in tols:
        cells = []
        for report in reports:
            row = next((row for row in report["rows"] if row["tol"] == tol), None)
            if row is None:  # a model without an ODE has one row, at no tolerance
                row = report["rows"][0] if report["rows"][0]["tol"] is None else None
            cells.append("" if row is None else f"{_metric(report, row)} @ {_nfe(row)}")
        print(f"{'-' if tol is None else f'{tol:g}':>8} " + "".join(f"{cell:>{width}}" for cell in cells))


# ---- plotting -------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_classifier(report: dict, path: Path) -> None:
    """Error from 0 (with the count of errors at each point), and time and NFE with a legend."""
    plt = _pyplot()
    rows = [r for r in report["rows"] if r["tol"] is not None] or report["rows"]
    tols = [r["tol"] if r["tol"] is not None else 1.0 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    errors = [100 * r["test_error"] for r in rows]
    left.semilogx(tols, errors, "o-")
    for tol, error, row in zip(tols, errors, rows):
        left.annotate(
            f"{round(row['test_error'] * report['test_images'])}",
            (tol, error),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    left.set_ylim(0, max(errors) * 1.3 or 1.0)
    left.set_xlabel("tolerance (rtol = atol)")
    left.set_ylabel("test error (%); labels: errors")
    lines = right.semilogx(tols, [r["time_per_1000_s"] for r in rows], "o-", label="time per 1000 images (s)")
    right.set_ylim(bottom=0)
    right.set_xlabel("tolerance (rtol = atol)")
    right.set_ylabel("time per batch of 1000 (s)")
    if rows[0]["nfe_mean"] is not None:
        twin = right.twinx()
        lines += twin.semilogx(
            tols, [r["nfe_mean"] for r in rows], "s--", color="tab:orange", label="mean NFE (right axis)"
        )
        twin.set_ylim(bottom=0)
        twin.set_ylabel("mean NFE")
    right.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    fig.suptitle(f"{report['name']} ({report['kind']}): {report['test_images']} MNIST test images")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _labels_by_point(xs: list[float], ys: list[float], rows: list[dict]) -> dict[tuple[float, float], str]:
    """One label per distinct point: tolerances whose solves land on the same point (every
    loose tolerance of a model whose solves end in one step, say) share it, "0.1, 1", instead
    of being printed over each other."""
    labels: dict[tuple[float, float], list[str]] = {}
    for x, y, row in zip(xs, ys, rows):
        key = next(
            (k for k in labels if math.isclose(k[0], x, abs_tol=0.05) and math.isclose(k[1], y, abs_tol=1e-3)), (x, y)
        )
        labels.setdefault(key, []).append(_tol(row))
    return {point: ", ".join(tols) for point, tols in labels.items()}


def _plot_comparison(reports: list[dict], path: Path) -> None:
    """Metric against mean NFE, one curve per checkpoint, each point labelled with its tolerance;
    a model without an ODE is a horizontal line (it has no tolerance to trade)."""
    plt = _pyplot()
    metric = reports[0]["metric"]
    scale = 100.0 if metric == "test_error" else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = []
    for report in reports:
        label = report["name"] + _regularisation_label(report.get("regularisation"))
        rows = report["rows"]
        ys = [scale * row[metric] for row in rows]
        values += ys
        if rows[0].get("nfe_mean") is None:
            ax.axhline(ys[0], linestyle=":", color="gray", label=f"{label} (no ODE)")
            continue
        xs = [row["nfe_mean"] for row in rows]
        (line,) = ax.plot(xs, ys, "o-", label=label)
        for (x, y), tols in _labels_by_point(xs, ys, rows).items():
            ax.annotate(tols, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    if metric == "test_error":
        ax.set_ylim(0, max(values) * 1.3)
    ax.set_xlim(left=0)
    ax.set_xlabel("mean NFE per sample (points: solver tolerance)")
    ax.set_ylabel(
        {"test_error": "test error (%)", "test_log_likelihood": "mean test log-likelihood (nats)"}.get(
            metric, _LABELS[metric]
        )
    )
    ax.set_title(
        f"{reports[0]['dataset']}: {'lower' if metric != 'test_log_likelihood' else 'higher'} is better, left is cheaper"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _regularisation_label(regularisation: dict | None) -> str:
    symbols = {"kinetic": "λ_K", "jacobian": "λ_J", "density_curvature": "λ_C", "local_error": "λ_E"}
    given = regularisation or {}
    weights = [f"{symbol} {given[name]:g}" for name, symbol in symbols.items() if given.get(name)]
    return f" ({', '.join(weights)})" if weights else ""
