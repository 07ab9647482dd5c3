"""The seed's comparison (Chen et al. 2018, §4.1): a planar normalizing flow of depth K against
a planar CNF of width M = K, trained by reverse KL on the same energy targets, side by side.

Prints the final E_q[log q + U] (= KL(q‖p) − log Z; lower is better, equal targets share
log Z) for each K = M, and writes ``bench/results/nf_vs_cnf.json``.

    python bench/nf_vs_cnf.py [--sizes 2 8 32] [--targets U1 U2] [--steps 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from neuralode.models import Regularisation, build_model
from training.densities import kl_estimate, objective

ROOT = Path(__file__).resolve().parents[1]


def train(kind: str, hyper: dict, target: str, steps: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(kind, hyper)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    args = argparse.Namespace(target=target, data=None, adjoint=kind == "cnf")
    generator = torch.Generator().manual_seed(seed)
    begin = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = objective(model, args, Regularisation(), batch, generator, "cpu")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - begin
    tol = hyper.get("tol")
    estimate = kl_estimate(model.eval(), target, tol, "cpu")
    return {
        "kl_plus_log_z": estimate["kl_plus_log_z"],
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32], help="K = M")
    parser.add_argument("--targets", nargs="+", default=["U1", "U2"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tol", type=float, default=1e-3, help="CNF solver tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    rows = []
    for target in args.targets:
        for size in args.sizes:
            nf = train("planar-nf", {"dim": 2, "layers": size}, target, args.steps, args.batch, 1e-2, args.seed)
            cnf_hyper = {"dim": 2, "dynamics": "planar", "width": size, "trace": "exact", "tol": args.tol}
            cnf = train("cnf", cnf_hyper, target, args.steps, args.batch, 1e-2, args.seed)
            rows.append({"target": target, "size": size, "nf": nf, "cnf": cnf})
            print(
                f"{target} K=M={size:<3} NF {nf['kl_plus_log_z']:8.3f} ({nf['train_seconds']:6.1f} s)   "
                f"CNF {cnf['kl_plus_log_z']:8.3f} ({cnf['train_seconds']:6.1f} s)",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "nf_vs_cnf.json"
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    path.write_text(
        json.dumps(
            {
                "benchmark": "nf_vs_cnf",
                "machine": machine,
                "date": time.strftime("%Y-%m-%d"),
                "settings": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
