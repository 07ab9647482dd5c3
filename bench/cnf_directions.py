"""A CNF is served both ways: ``LogDensity`` solves from the data back to the base, ``Sample``
from the base forward to the data. This measures each direction's cost and accuracy per
tolerance for checkpoints side by side, against the same solves at ``--reference`` tolerance:

* back: mean NFE, and the mean |log p - log p_ref| per point on the held-out test points;
* forward: mean NFE, and the mean |log q - log p_ref(x)| per sample, where log q is what the
  sampling solve reports for its own sample x and log p_ref(x) is x solved back accurately
  (it mixes the error in x with the error in log q, both of which a client receives).

    python bench/cnf_directions.py checkpoints/cnf-moons.pt runs/other.pt [--points 5000]
    python bench/cnf_directions.py checkpoints/cnf-moons.pt --precisions float32 bfloat16

``--precisions`` measures the solves with f in each precision, against the same float32
reference (``tune --precision-table`` writes the same comparison into a card).

Writes ``bench/results/cnf_directions_<name>.json``. A CNF's card carries the same table for
its own checkpoint (``metrics.directions``, written by training and ``tune``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from neuralode.checkpoint import load_checkpoint
from training.densities import direction_errors

ROOT = Path(__file__).resolve().parents[1]


def directions(path: Path, points: int, reference: float, precision: str) -> dict:
    checkpoint = load_checkpoint(path)
    dataset = checkpoint.card.dataset.name
    measured = direction_errors(
        checkpoint.model, dataset, "cpu", points=points, reference=reference, precision=precision
    )
    return {"checkpoint": str(path), "dataset": dataset, "precision": precision, "rows": measured["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--reference", type=float, default=1e-8, help="tolerance of the reference solves")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="what f is evaluated in for the measured solves (the reference stays float32)",
    )
    parser.add_argument("--name", default=None, help="result file suffix (default: the first checkpoint's stem)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    reports = [directions(path, args.points, args.reference, p) for path in args.checkpoints for p in args.precisions]
    print("tol: back NFE / mean |error| (nats); forward NFE / mean |error|")
    for report in reports:
        print(report["checkpoint"], report["precision"])
        for row in report["rows"]:
            print(
                f"  {row['tol']:g}: back {row['back_nfe_mean']:.2f} / {row['back_log_density_error']:.4f}; "
                f"forward {row['forward_nfe_mean']:.2f} / {row['forward_log_density_error']:.4f}"
            )
    name = args.name or args.checkpoints[0].stem
    out = args.out / f"cnf_directions_{name}.json"
    command = "python bench/cnf_directions.py " + " ".join(sys.argv[1:])
    out.write_text(
        json.dumps(
            {
                "benchmark": "cnf_directions",
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "date": time.strftime("%Y-%m-%d"),
                "command": command,
                "points": args.points,
                "reference_tol": args.reference,
                "compared": reports,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
