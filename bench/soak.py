"""Load and soak: many concurrent clients, mixed RPCs and tolerances, every response checked.

A real server (``python -m server`` on the shipped checkpoints) is started; N clients send
Classify, Sample and LogDensity requests drawn from a fixed pool of inputs and tolerances
until at least ``--requests`` have completed and ``--duration`` seconds have passed. Every
response is compared with the in-process reference for its input and tolerance (each item
solved per sample, in this process): a response is *wrong* when an output differs by more than
``min(0.05, 20·tol)`` (absolute for probabilities and points, relative beyond 1 for log p;
see ``Case.check`` for why not exactly), *exact* when within 1e-5, and *lost* when the call
failed. The server's resident memory is read at the start (after warm-up) and at the end.

    python bench/soak.py --data-dir ../shared/data                  # >= 20,000 requests, 64 clients
    python bench/soak.py --data-dir ../shared/data --duration 600   # the 10-minute soak
    python bench/soak.py --data-dir ../shared/data --clients 32 --max-images 256 --duration 300 --name soak_cpu_mixed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers

CLASSIFIER, DENSITIES = "odenet-mnist", ("cnf-8gaussians", "cnf-moons")
TOLERANCES = (1e-1, 1e-2, 1e-3)
EXACT = 1e-5


@dataclass(frozen=True)
class Case:
    """One request of the pool and what the in-process model says it must return."""

    rpc: str  # "classify", "sample", "log_density"
    model: str
    tol: float
    payload: object  # images, points, or (n, seed)
    expected: dict[str, np.ndarray]  # outputs, plus "nfe"

    def send(self, client):
        if self.rpc == "classify":
            return client.classify(self.payload, model=self.model, tol=self.tol)
        if self.rpc == "sample":
            n, seed = self.payload
            return client.sample(n, model=self.model, tol=self.tol, seed=seed)
        return client.log_density(self.payload, model=self.model, tol=self.tol)

    def check(self, result) -> tuple[list[str], float, bool]:
        """(problems, largest scaled deviation from the reference, NFE equal to it).

        Results depend on the batch an item shared only through float32 rounding (matrix
        kernels differ with batch size and row position), which step-size control can amplify
        up to about the requested tolerance; so a deviation is *wrong* only beyond
        ``allowed(tol)`` (a mix-up of inputs, items or weights is O(1)), and *exact* within
        1e-5."""
        problems = [] if result.items.all_succeeded else [f"statuses {result.items.status}"]
        outputs = {"classify": ("probabilities",), "sample": ("points", "log_density"), "log_density": ("log_density",)}
        worst = 0.0
        for name in outputs[self.rpc]:
            got, want = getattr(result, name), self.expected[name]
            if got.shape != want.shape:
                problems.append(f"{name} has shape {got.shape}, expected {want.shape}")
                continue
            scale = np.maximum(1.0, np.abs(want)) if name == "log_density" else 1.0
            deviation = float((np.abs(got - want) / scale).max())
            worst = max(worst, deviation)
            if not deviation <= allowed(self.tol):
                problems.append(f"{name} deviates by {deviation:.3g} (allowed {allowed(self.tol):.3g})")
        return problems, worst, bool(np.array_equal(result.items.nfe, self.expected["nfe"]))


def allowed(tol: float) -> float:
    """The deviation from the reference a correct answer may show at ``tol``."""
    return min(0.05, 20 * tol)


def build_pool(checkpoints: Path, data_dir: Path, size: int, seed: int, max_images: int = 2) -> list[Case]:
    """``size`` cases of each RPC, with references computed in this process (per-sample
    solves, so each item's reference is what it gives alone). Classify cases hold one or two
    images, or with ``max_images`` above 2, 1 to ``max_images`` (log-uniform)."""
    import torch

    from neuralode.checkpoint import load_checkpoint
    from training.data import load_mnist

    rng = np.random.default_rng(seed)
    images = load_mnist(data_dir, train=False, download=False).images[:, 0].numpy()
    classifier = load_checkpoint(checkpoints / f"{CLASSIFIER}.pt").model
    densities = {name: load_checkpoint(checkpoints / f"{name}.pt").model for name in DENSITIES}
    pool = []
    with torch.no_grad():
        for i in range(size):
            tol = TOLERANCES[i % len(TOLERANCES)]
            count = (
                1 + i % 2 if max_images <= 2 else min(max_images, int(np.exp(rng.uniform(0, np.log(max_images + 1)))))
            )
            batch = images[rng.choice(len(images), count, replace=False)]
            logits, solution = classifier(torch.from_numpy(batch[:, None]).float() / 255, rtol=tol, atol=tol)
            expected = {"probabilities": torch.softmax(logits, 1).numpy(), "nfe": solution.nfe.numpy()}
            pool.append(Case("classify", CLASSIFIER, tol, batch, expected))

            name = DENSITIES[i % len(DENSITIES)]
            model = densities[name]
            points = (rng.normal(size=(1 + i % 4, 2)) * 1.5).astype(np.float32)
            log_p, solution = model.log_prob(torch.from_numpy(points), rtol=tol, atol=tol)
            pool.append(
                Case("log_density", name, tol, points, {"log_density": log_p.numpy(), "nfe": solution.nfe.numpy()})
            )

            n, draw_seed = 1 + i % 4, 1000 + i  # the server draws base points from the seed the same way
            drawn, log_q, solution = model.sample(
                n, rtol=tol, atol=tol, generator=torch.Generator().manual_seed(draw_seed)
            )
            expected = {"points": drawn.numpy(), "log_density": log_q.numpy(), "nfe": solution.nfe.numpy()}
            pool.append(Case("sample", name, tol, (n, draw_seed), expected))
    return pool


def resident_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory now (``VmRSS``) or at its peak (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def run_load(
    target: str, pool: list[Case], clients: int, requests: int, duration: float, seed: int, on_progress=None
) -> dict:
    """Closed-loop clients until ``requests`` completed and ``duration`` passed; every
    response checked against its case."""
    from client import Client, OdeServeError

    latencies: dict[str, list[float]] = defaultdict(list)
    lost: Counter = Counter()
    wrong: list[str] = []
    deviations: dict[float, list[float]] = defaultdict(list)  # tol -> each response's largest deviation
    nfe_equal = 0
    done = 0
    lock = threading.Lock()
    begin = time.monotonic()
    stop = threading.Event()

    def client_loop(index: int) -> None:
        nonlocal done, nfe_equal
        rng = random.Random(seed + index)
        with Client(target, timeout_s=300) as client:
            while not stop.is_set():
                case = rng.choice(pool)
                start = time.monotonic()
                try:
                    result = case.send(client)
                except OdeServeError as error:
                    with lock:
                        lost[error.code] += 1
                    continue
                latency = time.monotonic() - start
                problems, deviation, same_nfe = case.check(result)
                with lock:
                    latencies[case.rpc].append(latency)
                    deviations[case.tol].append(deviation)
                    nfe_equal += same_nfe
                    if problems:
                        wrong.append(f"{case.rpc} {case.model} tol={case.tol}: {'; '.join(problems)}")
                    done += 1
                    if done >= requests and time.monotonic() - begin >= duration:
                        stop.set()

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    while not stop.wait(5.0) and any(thread.is_alive() for thread in threads):
        if on_progress is not None:
            on_progress(done, time.monotonic() - begin)
    for thread in threads:
        thread.join(300)
    elapsed = time.monotonic() - begin
    every = [value for values in latencies.values() for value in values]
    summary = {
        "requests": done,
        "lost": sum(lost.values()),
        "lost_by_code": dict(lost),
        "wrong": len(wrong),
        "wrong_examples": wrong[:10],
        "exact_fraction": round(sum(d <= EXACT for v in deviations.values() for d in v) / max(done, 1), 4),
        "nfe_equal_fraction": round(nfe_equal / max(done, 1), 4),
        "max_deviation_by_tol": {str(tol): float(f"{max(v):.3g}") for tol, v in sorted(deviations.items())},
        "seconds": round(elapsed, 1),
        "throughput_requests_per_s": round(done / elapsed, 1),
        "latency_p50_ms": round(float(np.percentile(every, 50)) * 1e3, 1),
        "latency_p99_ms": round(float(np.percentile(every, 99)) * 1e3, 1),
        "by_rpc": {
            rpc: {
                "requests": len(values),
                "latency_p50_ms": round(float(np.percentile(values, 50)) * 1e3, 1),
                "latency_p99_ms": round(float(np.percentile(values, 99)) * 1e3, 1),
            }
            for rpc, values in sorted(latencies.items())
        },
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20_000, help="at least this many requests")
    parser.add_argument("--duration", type=float, default=0.0, help="and at least this many seconds")
    parser.add_argument("--pool", type=int, default=48, help="cases per RPC")
    parser.add_argument(
        "--max-images", type=int, default=2, help="largest Classify case (above 2: sizes log-uniform from 1)"
    )
    parser.add_argument("--warmup", type=int, default=500, help="requests before the start RSS is read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="result file name (default: soak_cpu or soak_cpu_<duration>s)")
    args = parser.parse_args()

    from live_server import end_on_sigterm, start_server

    end_on_sigterm()

    load_before = os.getloadavg()
    pool = build_pool(args.checkpoints, args.data_dir, args.pool, args.seed, args.max_images)
    workdir = ROOT / "runs" / "soak"
    workdir.mkdir(parents=True, exist_ok=True)
    server = start_server(args.checkpoints, workdir)
    rss: list[tuple[float, float]] = []
    try:
        warm = run_load(server.target, pool, args.clients, args.warmup, 0.0, args.seed + 10_000)
        rss.append((0.0, resident_mb(server.process.pid)))
        last = [0.0]

        def progress(done: int, seconds: float) -> None:
            if seconds - last[0] >= 30:
                last[0] = seconds
                rss.append((round(seconds), resident_mb(server.process.pid)))
                print(f"  {seconds:5.0f} s  {done:6d} requests  RSS {rss[-1][1]:.0f} MB", flush=True)

        summary = run_load(server.target, pool, args.clients, args.requests, args.duration, args.seed, progress)
        rss.append((summary["seconds"], resident_mb(server.process.pid)))
        peak_mb = resident_mb(server.process.pid, "VmHWM")
    finally:
        exit_code = server.stop()
    start_mb, end_mb = rss[0][1], rss[-1][1]
    report = {
        "benchmark": "soak",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "settings": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "pool": {
            "cases": len(pool),
            "tolerances": TOLERANCES,
            "exact": EXACT,
            "allowed_deviation": {str(tol): allowed(tol) for tol in TOLERANCES},
        },
        "warmup": {k: warm[k] for k in ("requests", "lost", "wrong")},
        **summary,
        "rss_mb_start": round(start_mb, 1),
        "rss_mb_end": round(end_mb, 1),
        "rss_growth_percent": round(100 * (end_mb - start_mb) / start_mb, 1),
        "rss_mb_peak": round(peak_mb, 1),
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "rss_trace_mb": rss,
        "server_exit_code": exit_code,
    }
    print(
        f"{report['requests']} requests in {report['seconds']} s with {args.clients} clients: "
        f"{report['throughput_requests_per_s']} requests/s, p50 {report['latency_p50_ms']} ms, p99 {report['latency_p99_ms']} ms"
    )
    for rpc, row in report["by_rpc"].items():
        print(
            f"  {rpc:<12} {row['requests']:6d} requests  p50 {row['latency_p50_ms']:8.1f} ms  p99 {row['latency_p99_ms']:8.1f} ms"
        )
    print(
        f"lost {report['lost']} {report['lost_by_code'] or ''}, wrong {report['wrong']}; "
        f"{100 * report['exact_fraction']:.1f}% exact (<= {EXACT}), {100 * report['nfe_equal_fraction']:.1f}% same NFE; "
        f"largest deviation by tol {report['max_deviation_by_tol']}"
    )
    for example in report["wrong_examples"]:
        print("  wrong:", example)
    print(
        f"server RSS {start_mb:.0f} MB at start, {end_mb:.0f} MB at end ({report['rss_growth_percent']:+.1f}%), "
        f"peak {peak_mb:.0f} MB, exit code {exit_code}"
    )
    name = args.name or ("soak_cpu" if args.duration == 0 else f"soak_cpu_{int(args.duration)}s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
