"""Solver overhead on the ODE-Net function, side by side with torchdiffeq in one run.

For each batch size: NFE, wall time of the solve, and the ratio
``solve_time / (NFE × time of one bare f evaluation at that batch)``, i.e. how much the solver
adds on top of the function evaluations it needs. f's time is given two ways: the median of
single evaluations, and the fastest of several blocks of back-to-back evaluations (what f
costs when nothing disturbs it, so the stricter floor). For our per-sample solver NFE is the
mean over samples (finished samples are no longer evaluated); torchdiffeq's and torchode's are
one shared count (torchode steps each sample with its own dt, but evaluates every row until
all are done). The torchode column appears when torchode is importable
(``pip install torchode``; it is not a dependency of this project).

    python bench/solver_overhead.py [--device cpu|cuda] [--batch 1000 1] [--out bench/results] [--only-ours]

``--only-ours`` skips torchdiffeq, for comparing two neuralode revisions (run each with its
checkout first on PYTHONPATH, alternating, and compare the ratios).

On the CPU at large batches glibc's allocator decides much of the result: with its defaults it
hands freed multi-megabyte blocks back to the system and page-faults them in again, inside f as
much as in any solver. ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
keeps them; the record lists the ``MALLOC_*`` settings a run had.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from neuralode.models import ODEFunc
from neuralode.solvers import solve_ivp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up, synchronised with the device."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fastest_block_seconds(fn, device: torch.device, blocks: int, per_block: int) -> float:
    """Time of one call of ``fn``: the fastest of ``blocks`` blocks of ``per_block`` calls."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(blocks):
        _sync(device)
        start = time.perf_counter()
        for _ in range(per_block):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / per_block)
    return best


def _torchode_solve(func, z0: torch.Tensor, tol: float) -> int:
    """NFE of a solve with torchode's dopri5 and its integral controller (per-sample step sizes)."""
    import torchode

    shape = z0.shape[1:]
    term = torchode.ODETerm(lambda t, y: func(t, y.view(-1, *shape)).flatten(1))
    solver = torchode.AutoDiffAdjoint(
        torchode.Dopri5(term=term), torchode.IntegralController(atol=tol, rtol=tol, term=term)
    )
    batch = z0.shape[0]
    problem = torchode.InitialValueProblem(
        y0=z0.flatten(1),
        t_start=torch.zeros(batch, device=z0.device),
        t_end=torch.ones(batch, device=z0.device),
    )
    return int(solver.solve(problem).stats["n_f_evals"].max())


def _graph_f_time(func, t, z, repeats: int) -> float | None:
    """Time of one f evaluation replayed as a CUDA graph (the floor for any GPU solver)."""
    if z.device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            func(t, z)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        func(t, z)
    return median_seconds(graph.replay, z.device, repeats * 20)


def measure(batch: int, device: torch.device, tol: float, repeats: int, only_ours: bool = False) -> dict:
    torch.manual_seed(0)
    func = ODEFunc(64).to(device).eval()
    z0 = torch.randn(batch, 64, 6, 6, device=device)
    t_batch = torch.full((batch,), 0.5, device=device)

    calls = {"n": 0}

    def shared_time_func(t, z):  # torchdiffeq passes one scalar time
        calls["n"] += 1
        return func(t, z)

    with torch.no_grad():
        f_time = median_seconds(lambda: func(t_batch, z0), device, repeats * 5)
        per_block = max(3, int(0.1 / f_time))  # blocks of about 0.1 s
        f_min_time = fastest_block_seconds(lambda: func(t_batch, z0), device, repeats * 3, per_block)
        graph_f_time = _graph_f_time(func, t_batch, z0, repeats)

        ours = {}

        def run_ours():
            ours["solution"] = solve_ivp(func, z0, (0.0, 1.0), rtol=tol, atol=tol)

        ours_time = median_seconds(run_ours, device, repeats)
        solution = ours["solution"].raise_for_status()
        ours_nfe = solution.nfe.double().mean().item()

        theirs_time = theirs_nfe = None
        if not only_ours:
            import torchdiffeq

            t = torch.tensor([0.0, 1.0], device=device)

            def run_theirs():
                calls["n"] = 0
                torchdiffeq.odeint(shared_time_func, z0, t, rtol=tol, atol=tol, method="dopri5")

            theirs_time = median_seconds(run_theirs, device, repeats)
            theirs_nfe = calls["n"]

        torchode_run = {}
        torchode_time = None
        if not only_ours and importlib.util.find_spec("torchode") is not None:

            def run_torchode():
                torchode_run["nfe"] = _torchode_solve(func, z0, tol)

            torchode_time = median_seconds(run_torchode, device, repeats)

    row = {
        "batch": batch,
        "f_time_ms": f_time * 1e3,
        "f_fastest_block_ms": f_min_time * 1e3,
        "ours": {
            "nfe_mean": ours_nfe,
            "nfe_max": int(solution.nfe.max()),
            "time_ms": ours_time * 1e3,
            "ratio": ours_time / (ours_nfe * f_time),
            "ratio_to_fastest_f": ours_time / (ours_nfe * f_min_time),
        },
    }
    if torchode_time is not None:
        row["torchode"] = {
            "nfe": torchode_run["nfe"],
            "time_ms": torchode_time * 1e3,
            "ratio": torchode_time / (torchode_run["nfe"] * f_time),
            "ratio_to_fastest_f": torchode_time / (torchode_run["nfe"] * f_min_time),
            "over_ours": torchode_time / ours_time,
        }
    if theirs_time is not None:
        row["torchdiffeq"] = {
            "nfe": theirs_nfe,
            "time_ms": theirs_time * 1e3,
            "ratio": theirs_time / (theirs_nfe * f_time),
            "ratio_to_fastest_f": theirs_time / (theirs_nfe * f_min_time),
        }
    if graph_f_time is not None:
        row["graph_f_time_ms"] = graph_f_time * 1e3
        row["ours"]["time_over_nfe_graph_f"] = ours_time / (ours_nfe * graph_f_time)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1000, 1])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only-ours", action="store_true", help="skip torchdiffeq")
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )

    rows = [measure(batch, device, args.tol, args.repeats, args.only_ours) for batch in args.batch]
    print(f"solver overhead on ODEFunc(64) 64x6x6, dopri5, tol {args.tol:g}, float32, {device} ({machine})")
    print(
        f"{'batch':>6} {'f ms':>8} | {'ours NFE':>9} {'ms':>9} {'ratio':>6} | {'tdq NFE':>8} {'ms':>9} {'ratio':>6} | speed-up"
    )
    for r in rows:
        o, d = r["ours"], r.get("torchdiffeq")
        theirs = (
            ""
            if d is None
            else (f" {d['nfe']:>8d} {d['time_ms']:>9.2f} {d['ratio']:>6.2f} | {d['time_ms'] / o['time_ms']:>6.2f}x")
        )
        print(
            f"{r['batch']:>6} {r['f_time_ms']:>8.3f} | {o['nfe_mean']:>9.1f} {o['time_ms']:>9.2f} {o['ratio']:>6.2f} |{theirs}"
        )
        print(
            f"{'':>6} fastest-block f {r['f_fastest_block_ms']:.3f} ms: ours {o['ratio_to_fastest_f']:.2f}"
            + ("" if d is None else f", torchdiffeq {d['ratio_to_fastest_f']:.2f}")
        )
        if "torchode" in r:
            c = r["torchode"]
            print(
                f"{'':>6} torchode NFE {c['nfe']}, {c['time_ms']:.2f} ms, ratio {c['ratio']:.2f} "
                f"(fastest f {c['ratio_to_fastest_f']:.2f}); torchode / ours {c['over_ours']:.2f}x"
            )
        if "graph_f_time_ms" in r:
            print(
                f"{'':>6} CUDA-graph f {r['graph_f_time_ms']:.4f} ms; ours / (NFE x graph f) = {o['time_over_nfe_graph_f']:.2f}"
            )

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"solver_overhead_{device.type}.json"
    record = {
        "benchmark": "solver_overhead",
        "machine": machine,
        "device": str(device),
        "torch": torch.__version__,
        "tol": args.tol,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/solver_overhead.py " + " ".join(sys.argv[1:]),
        "malloc_settings": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
