"""``python -m training evaluate CHECKPOINT``: the seed's Table 1 for one checkpoint.

Classifiers: test error, NFE and time per batch of 1000 at each tolerance. Density models:
mean test log-likelihood (or the reverse-KL estimate for energy targets) per tolerance, and
a picture of the learned density next to the data and samples. Printed, and saved as JSON and
PNG next to the checkpoint (or in ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuralode.checkpoint import load_checkpoint
from neuralode.models.registry import CLASSIFIERS, ODE_CLASSIFIERS

from .common import device_name, resolve_device


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, device)
    out_dir = args.out or args.checkpoint.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{args.checkpoint.stem}-eval"
    if checkpoint.kind in CLASSIFIERS:
        report = _classifier_report(checkpoint, args, device)
        _plot_classifier(report, stem.with_suffix(".png"))
    else:
        report = _density_report(checkpoint, args, device)
        from .densities import plot_density

        plot_density(checkpoint.model, checkpoint.card, stem.with_suffix(".png"), device)
    report["device"] = device_name(device)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return report


def _classifier_report(checkpoint, args: argparse.Namespace, device) -> dict:
    from .classifiers import evaluate
    from .data import load_mnist

    test_set = load_mnist(args.data_dir, train=False).head(args.test_subset)
    tols = args.tols if checkpoint.kind in ODE_CLASSIFIERS else [None]
    rows = [evaluate(checkpoint.model, checkpoint.kind, test_set, device, tol).as_dict() for tol in tols]
    print(f"{checkpoint.kind} on {len(test_set)} MNIST test images ({device_name(device)})")
    print(f"{'tol':>8} {'test error':>11} {'NFE':>8} {'time/1000 (s)':>14}")
    for row in rows:
        tol = "-" if row["tol"] is None else f"{row['tol']:g}"
        nfe = "-" if row["nfe_mean"] is None else f"{row['nfe_mean']:.1f}"
        print(f"{tol:>8} {row['test_error'] * 100:>10.2f}% {nfe:>8} {row['time_per_1000_s']:>14.3f}")
    return {"checkpoint": str(args.checkpoint), "kind": checkpoint.kind, "test_images": len(test_set), "rows": rows}


def _density_report(checkpoint, args: argparse.Namespace, device) -> dict:
    from .densities import kl_estimate, test_log_likelihood

    name = checkpoint.card["dataset"]["name"]
    if name.startswith("energy "):
        target = name.split()[1]
        tols = [None] if checkpoint.kind == "planar-nf" else args.tols
        rows = [kl_estimate(checkpoint.model, target, tol, device) for tol in tols]
        print(f"{checkpoint.kind} on target {target}: E_q[log q + U] (= KL(q||p) - log Z)")
        for row in rows:
            print(f"  tol {row['tol']}: {row['kl_plus_log_z']:.4f}" + (f", NFE {row['nfe_mean']:.1f}" if "nfe_mean" in row else ""))
    else:
        rows = [test_log_likelihood(checkpoint.model, name, tol, device) for tol in args.tols]
        print(f"{checkpoint.kind} on {name}: mean test log-likelihood")
        print(f"{'tol':>8} {'log-lik':>9} {'NFE':>8} {'time/1000 (s)':>14}")
        for row in rows:
            print(f"{row['tol']:>8g} {row['test_log_likelihood']:>9.4f} {row['nfe_mean']:>8.1f} {row['time_per_1000_s']:>14.3f}")
    return {"checkpoint": str(args.checkpoint), "kind": checkpoint.kind, "dataset": name, "rows": rows}


def _plot_classifier(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["tol"] is not None]
    if not rows:
        rows = report["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    tols = [r["tol"] if r["tol"] is not None else 1.0 for r in rows]
    left.semilogx(tols, [100 * r["test_error"] for r in rows], "o-")
    left.set_xlabel("tolerance")
    left.set_ylabel("test error (%)")
    right.semilogx(tols, [r["time_per_1000_s"] for r in rows], "o-", label="time / 1000 images (s)")
    if rows[0]["nfe_mean"] is not None:
        twin = right.twinx()
        twin.semilogx(tols, [r["nfe_mean"] for r in rows], "s--", color="tab:orange")
        twin.set_ylabel("NFE", color="tab:orange")
    right.set_xlabel("tolerance")
    right.set_ylabel("time per batch of 1000 (s)")
    fig.suptitle(f"{report['kind']}: {report['test_images']} MNIST test images")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
