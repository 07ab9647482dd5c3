"""Regularised against unregularised models, over the whole tolerance grid, from the JSON
reports ``python -m training evaluate BASELINE REGULARISED… --out bench/results --name …``
writes (the first checkpoint of each report is the baseline):

    python bench/regularisation.py bench/results/regularisation-cnf-8gaussians.json \\
        bench/results/regularisation-cnf-moons.json bench/results/regularisation-odenet-mnist.json \\
        --step-cost runs/reg/odenet-mnist.pt --out bench/results/regularisation_cpu.json

For every model and tolerance: mean NFE and its ratio to the baseline's, the metric and its
difference from the baseline's (log-likelihood in nats, test error in points), and the issue's
targets at tol 1e-3 (CNFs: >= 2x fewer NFE at <= 0.03 nats worse; ODE-Net: fewer NFE at test
error within ±0.05 points). It also measures what the regularisers act on — the learned
dynamics' kinetic energy and Jacobian Frobenius norm per dimension, integrated at tol 1e-4 on
held-out inputs — and how far NFE can fall at all: dopri5 here spends 2 evaluations on f(t0)
and the first-step probe and 6 per step, and the first step Hairer's rule picks is too short
to cross the span at once, so no solve takes fewer than 2 steps, 14 NFE (the fewest NFE any
input takes is recorded per model), and what a first try over the whole span would take.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neuralode.checkpoint import load_checkpoint  # noqa: E402
from neuralode.models import Regularisation, standard_normal_log_prob  # noqa: E402
from neuralode.solvers import solve_ivp  # noqa: E402

NFE_FLOOR = 2 + 6 * 2  # f(t0) and the first-step probe, then two dopri5 steps of 6 (FSAL)
TARGET_TOL = 1e-3
CNF_NFE_RATIO, CNF_NATS = 2.0, 0.03
ODENET_POINTS = 0.05
MEASURE = Regularisation(kinetic=1.0, jacobian=1.0)  # weights only switch the integrals on


@torch.no_grad()
def dynamics_measures(checkpoint_path: str, kind: str, dataset: str, data_dir: Path) -> dict:
    """On held-out inputs: mean K and J per dimension of the learned dynamics at tol 1e-4; the
    fewest NFE and steps any input takes at tol 1e-3; and, at tol 1e-3 again, the mean NFE and
    the metric when the solver's first try is the whole span instead of the first-step rule's
    choice (public ``solve_ivp(first_step=…)``; the tables above use each checkpoint's own
    first step: the rule, unless ``training tune`` set one)."""
    model = load_checkpoint(checkpoint_path).model
    if kind == "cnf":
        from training.densities import TEST_POINTS, TEST_SEED
        from training.toy import sample_density

        points = sample_density(dataset, TEST_POINTS, torch.Generator().manual_seed(TEST_SEED))
        _, solution = model.log_prob(points, rtol=TARGET_TOL, atol=TARGET_TOL)
        whole = solve_ivp(
            model.augmented,
            model.initial_state(points, torch.zeros_like(points[:, 0]), None),
            (model.t1, 0.0),
            rtol=TARGET_TOL,
            atol=TARGET_TOL,
            norm=model.error_norm,
            first_step=model.t1,
        )
        whole_metric = float((standard_normal_log_prob(whole.y1[:, :2]) - whole.y1[:, 2]).mean())
        model.tol = 1e-4
        _, _, integrals = model.log_prob_regularised(points, MEASURE)
        inputs = f"{TEST_POINTS} held-out points"
    else:
        from training.data import load_mnist, to_float

        test = load_mnist(data_dir, train=False).head(1000)
        images = to_float(test.images)
        _, solution = model(images, rtol=TARGET_TOL, atol=TARGET_TOL)
        block = model.block
        whole = solve_ivp(
            block.func, model.downsample(images), (0.0, block.t1), rtol=TARGET_TOL, atol=TARGET_TOL, first_step=block.t1
        )
        whole_metric = float((model.head(whole.y1).argmax(1) != test.labels).double().mean())
        block.rtol = block.atol = 1e-4
        _, _, integrals = model.forward_regularised(images, MEASURE, generator=torch.Generator().manual_seed(0))
        inputs = "the first 1000 MNIST test images (Hutchinson estimate for J)"
    kinetic, jacobian = integrals.double().mean(0).tolist()
    return {
        "on": inputs,
        "kinetic_per_dim": kinetic,
        "jacobian_per_dim": jacobian,
        "fewest_nfe_at_tol_1e-3": int(solution.nfe.min()),
        "fewest_steps_at_tol_1e-3": int(solution.steps.min()),
        "first_step_whole_span_at_tol_1e-3": {"nfe_mean": float(whole.nfe.double().mean()), "metric": whole_metric},
    }


def step_cost(checkpoint_path: Path, data_dir: Path, repeats: int = 5, batch: int = 128) -> dict:
    """Seconds per ODE-Net training step (forward, loss, backward; adjoint) on one batch of
    real training images, unregularised, kinetic only and both terms, interleaved so that a
    change in the machine's load hits all three alike; the median of ``repeats`` after a
    warm-up. NFE is the same in all three (error control ignores the extra columns)."""
    import statistics
    import time

    from training.data import load_mnist, to_float

    model = load_checkpoint(checkpoint_path).model.train()
    train = load_mnist(data_dir, train=True)
    images, labels = to_float(train.images[:batch]), train.labels[:batch]
    settings = {
        "none": Regularisation(),
        "kinetic": Regularisation(kinetic=0.01),
        "kinetic+jacobian": Regularisation(0.01, 0.01),
    }
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    nfe = {}
    for repeat in range(repeats + 1):
        for name, regularisation in settings.items():
            model.zero_grad()
            begin = time.perf_counter()
            logits, solution, integrals = model.forward_regularised(
                images, regularisation, generator=torch.Generator().manual_seed(0)
            )
            (torch.nn.functional.cross_entropy(logits, labels) + regularisation.penalty(integrals)).backward()
            if repeat:
                seconds[name].append(time.perf_counter() - begin)
            nfe[name] = (float(solution.nfe.double().mean()), float(solution.backward.nfe.double().mean()))
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    return {
        "checkpoint": str(checkpoint_path),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "seconds_per_step": medians,
        "ratio_to_unregularised": {n: t / medians["none"] for n, t in medians.items()},
        "nfe_forward_backward": nfe,
    }


def compare(report: dict, data_dir: Path) -> dict:
    baseline, *others = report["compared"]
    metric = baseline["metric"]
    base_rows = {row["tol"]: row for row in baseline["rows"]}
    models = []
    for model in report["compared"]:
        rows = []
        for row in model["rows"]:
            base = base_rows[row["tol"]]
            rows.append(
                {
                    "tol": row["tol"],
                    "nfe_mean": row["nfe_mean"],
                    metric: row[metric],
                    "nfe_ratio_to_baseline": base["nfe_mean"] / row["nfe_mean"],
                    "delta_to_baseline": row[metric] - base[metric],
                }
            )
        models.append(
            {
                "name": model["name"],
                "regularisation": model["regularisation"],
                "trained": model["trained"],
                "dynamics": dynamics_measures(model["checkpoint"], model["kind"], model["dataset"], data_dir),
                "rows": rows,
            }
        )
    regularised = [m for m in models[1:] if _is_regularised(m["regularisation"])]
    return {
        "dataset": baseline["dataset"],
        "metric": metric,
        "baseline": baseline["name"],
        "targets": [_target(baseline, m) for m in regularised],
        "models": models,
    }


def _is_regularised(regularisation: dict | None) -> bool:
    return bool(regularisation and any(regularisation.values()))


def _target(baseline: dict, model: dict) -> dict:
    row = next(r for r in model["rows"] if r["tol"] == TARGET_TOL)
    base_nfe = next(r["nfe_mean"] for r in baseline["rows"] if r["tol"] == TARGET_TOL)
    if baseline["metric"] == "test_log_likelihood":
        met = row["nfe_ratio_to_baseline"] >= CNF_NFE_RATIO and row["delta_to_baseline"] >= -CNF_NATS
        goal = f">= {CNF_NFE_RATIO:g}x fewer mean NFE at tol {TARGET_TOL:g}, <= {CNF_NATS} nats worse"
    else:
        fewer = row["nfe_ratio_to_baseline"] > 1.0
        met = fewer and abs(100 * row["delta_to_baseline"]) <= ODENET_POINTS
        if fewer and 100 * row["delta_to_baseline"] < -ODENET_POINTS:
            met = "not met: fewer NFE at a lower test error than the window allows"
        goal = f"fewer mean NFE at tol {TARGET_TOL:g}, test error within ±{ODENET_POINTS} points"
    return {
        "model": model["name"],
        "goal": goal,
        "met": met,
        "nfe_ratio": row["nfe_ratio_to_baseline"],
        "delta": row["delta_to_baseline"],
        "best_ratio_possible": base_nfe / NFE_FLOOR,
    }


def markdown(comparisons: list[dict]) -> str:
    lines = []
    for comparison in comparisons:
        error = comparison["metric"] == "test_error"
        tols = [row["tol"] for row in comparison["models"][0]["rows"]]
        lines += [
            f"**{comparison['dataset']}** ({'test error' if error else 'test log-likelihood'} @ mean NFE):",
            "",
            "| model | K / dim | J / dim | "
            + " | ".join(f"tol {t:g}" for t in tols)
            + " | tol 0.001, first step = span |",
            "|---|---:|---:|" + "---:|" * (len(tols) + 1),
        ]
        for model in comparison["models"]:
            value = (
                (lambda r: f"{100 * r['test_error']:.2f}%") if error else (lambda r: f"{r['test_log_likelihood']:.4f}")
            )
            cells = [f"{value(r)} @ {r['nfe_mean']:.1f}" for r in model["rows"]]
            dynamics = model["dynamics"]
            whole = dynamics["first_step_whole_span_at_tol_1e-3"]
            whole_cell = f"{value({comparison['metric']: whole['metric']})} @ {whole['nfe_mean']:.1f}"
            lines.append(
                f"| {model['name']} | {dynamics['kinetic_per_dim']:.3g} | {dynamics['jacobian_per_dim']:.3g} | "
                + " | ".join(cells)
                + f" | {whole_cell} |"
            )
        lines.append("")
        for target in comparison["targets"]:
            delta = f"{100 * target['delta']:+.2f} points" if error else f"{target['delta']:+.4f} nats"
            lines.append(
                f"- {target['model']}: {target['nfe_ratio']:.2f}x fewer NFE at tol {TARGET_TOL:g}, {delta} "
                f"(target {target['goal']}: {target['met'] if isinstance(target['met'], str) else 'met' if target['met'] else 'not met'}; "
                f"at most {target['best_ratio_possible']:.2f}x is possible above the {NFE_FLOOR}-NFE floor)"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, nargs="+", help="JSON from `python -m training evaluate A B …`")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--note", default="", help="conditions worth recording next to the figures")
    parser.add_argument(
        "--step-cost",
        type=Path,
        default=None,
        metavar="ODENET_CHECKPOINT",
        help="also time a training step with and without the regularisers on these weights",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    comparisons = [compare(json.loads(path.read_text()), args.data_dir) for path in args.reports]
    print(markdown(comparisons))
    cost = None if args.step_cost is None else step_cost(args.step_cost, args.data_dir)
    if cost is not None:
        print(
            "training step:",
            ", ".join(
                f"{name} {t:.2f} s ({cost['ratio_to_unregularised'][name]:.2f}x)"
                for name, t in cost["seconds_per_step"].items()
            ),
        )
    if args.out:
        first = json.loads(args.reports[0].read_text())
        result = {
            "benchmark": "regularisation",
            "date": first["date"],
            "device": first["device"],
            "note": args.note,
            "nfe_floor_at_tol_1e-3": NFE_FLOOR,
            "reports": [str(p) for p in args.reports],
            "comparisons": comparisons,
            "odenet_training_step_cost": cost,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
