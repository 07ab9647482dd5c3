"""NFE of ``odeint`` when many output times are asked for, against asking for the end alone.

Landing every step on an output time (neuralode before dense output) pays for each output
with shorter steps; interpolating from the steps' dense output (torchdiffeq's behaviour, and
neuralode's ``odeint`` now) costs nothing extra. Uses only ``neuralode.odeint``, so it runs
against any checkout: put one first on PYTHONPATH and give it a ``--label``.

    python bench/output_times_nfe.py --label after [--out bench/results/output_times_nfe.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from neuralode import odeint
from neuralode.models import ODEFunc


def _counted(func):
    calls = {"n": 0}

    def counted(t, y):
        calls["n"] += 1
        return func(t, y)

    return counted, calls


def _problems():
    torch.manual_seed(0)
    odenet = ODEFunc(64).eval()
    z0 = torch.randn(1, 64, 6, 6)

    def odenet_rhs(t, z):
        with torch.no_grad():
            return odenet(t.reshape(1), z)

    def van_der_pol(t, y):
        return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])

    yield "odenet 64x6x6, t in [0, 1]", odenet_rhs, z0, 1.0
    yield "van der Pol, t in [0, 10]", van_der_pol, torch.tensor([2.0, 0.0], dtype=torch.float64), 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="what this run measures, e.g. before / after")
    parser.add_argument("--outputs", type=int, nargs="+", default=[2, 101])
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-3, 1e-6])
    parser.add_argument("--out", type=Path, help="add this run to a JSON file of runs")
    args = parser.parse_args()
    rows = []
    for name, func, y0, t1 in _problems():
        for tol in args.tol:
            for n in args.outputs:
                counted, calls = _counted(func)
                t = torch.linspace(0.0, t1, n, dtype=y0.dtype)
                odeint(counted, y0, t, rtol=tol, atol=tol)
                rows.append({"problem": name, "tol": tol, "output_times": n, "nfe": calls["n"]})
                print(f"{args.label:>8} | {name:<28} tol {tol:<6g} {n:>4} output times: NFE {calls['n']}")
    if args.out:
        runs = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "output_times_nfe", "runs": {}}
        runs["runs"][args.label] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
