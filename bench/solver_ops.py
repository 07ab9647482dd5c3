"""The solver's own work per solve, counted instead of timed: tensor operations (aten ops
dispatched, f's excluded) and Python function calls, for the ODE-Net function with dopri5.

Timings on a shared machine swing with its load; these counts do not, so they compare two
revisions exactly (run each with its checkout first on PYTHONPATH and give it a ``--label``).
The solver's time on a small batch is about proportional to them.

    python bench/solver_ops.py --label after [--out bench/results/solver_ops.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from neuralode.models import ODEFunc
from neuralode.solvers import solve_ivp


def _aten_ops(run) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def _python_calls(run) -> int:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    return pstats.Stats(profiler).total_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, help="add this run to a JSON file of runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    func = ODEFunc(64).eval()
    rows = []
    for batch in args.batch:
        z0 = torch.randn(batch, 64, 6, 6)
        calls = {"n": 0}

        def counted(t, z):
            calls["n"] += 1
            return func(t, z)

        def solve():
            return solve_ivp(counted, z0, (0.0, 1.0), rtol=args.tol, atol=args.tol)

        t = torch.full((batch,), 0.5)

        def f_alone():
            for _ in range(f_calls):
                counted(t, z0)

        with torch.no_grad():
            solution = solve()  # warm-up, and the number of f calls
            f_calls = calls["n"]
            solver_ops = _aten_ops(solve) - _aten_ops(f_alone)
            solver_calls = _python_calls(solve) - _python_calls(f_alone)
        row = {
            "batch": batch,
            "nfe": int(solution.nfe.max()),
            "f_calls": f_calls,
            "solver_aten_ops": solver_ops,
            "solver_python_calls": solver_calls,
        }
        rows.append(row)
        print(
            f"{args.label:>8} | batch {batch:>5}: NFE {row['nfe']}, solver's own aten ops {solver_ops}, "
            f"Python calls {solver_calls}"
        )
    if args.out:
        runs = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "solver_ops", "runs": {}}
        runs["runs"][args.label] = {
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "tol": args.tol,
            "method": "dopri5",
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
