"""Closed-loop load on the service, side by side in one run:

* continuous (solver-step) batching vs static batching, both through gRPC;
* the gRPC path vs the in-process engine (same engine, no network), continuous batching.

N clients each send one request after another for a fixed duration; every request classifies
real MNIST test images at a tolerance drawn from a mixed distribution. Prints throughput,
p50/p90/p99 latency and mean NFE per item, and writes ``bench/results/serve_load_<device>.json``.

    python bench/serve_load.py --data-dir ../shared/data [--clients 16] [--duration 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers

TOLERANCES = {1e-1: 0.5, 1e-3: 0.3, 1e-5: 0.2}  # tolerance: share of requests


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Load:
    def __init__(self, images: np.ndarray, clients: int, duration: float, warmup: float, per_request: int, seed: int) -> None:
        self.images, self.clients, self.duration, self.warmup, self.per_request, self.seed = images, clients, duration, warmup, per_request, seed

    def run(self, send) -> dict:
        """``send(images, tol) -> nfe array``; returns the measured figures."""
        records: list[tuple[float, float, float]] = []  # (end time, latency, mean nfe)
        lock = threading.Lock()
        start = time.monotonic()
        stop_at = start + self.warmup + self.duration

        def client(index: int) -> None:
            rng = random.Random(self.seed + index)
            while time.monotonic() < stop_at:
                tol = rng.choices(list(TOLERANCES), weights=list(TOLERANCES.values()))[0]
                batch = self.images[rng.sample(range(len(self.images)), self.per_request)]
                begin = time.monotonic()
                nfe = send(batch, tol)
                end = time.monotonic()
                with lock:
                    records.append((end, end - begin, float(np.mean(nfe))))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        window = [r for r in records if start + self.warmup <= r[0] <= stop_at]
        latencies = [r[1] for r in window]
        return {
            "requests": len(window),
            "throughput_items_per_s": len(window) * self.per_request / self.duration,
            "latency_p50_ms": _percentile(latencies, 50) * 1e3,
            "latency_p90_ms": _percentile(latencies, 90) * 1e3,
            "latency_p99_ms": _percentile(latencies, 99) * 1e3,
            "mean_nfe": statistics.fmean(r[2] for r in window) if window else float("nan"),
        }


def grpc_run(load: Load, checkpoints: Path, model: str, tmp: Path, *flags: str) -> dict:
    from conftest import start_server

    from client import Client

    server = start_server(checkpoints, tmp, *flags)
    try:
        with Client(server.target, timeout_s=600) as client:
            return load.run(lambda images, tol: client.classify(images, model=model, tol=tol).items.nfe)
    finally:
        server.stop()


def in_process_run(load: Load, checkpoints: Path, model: str, max_batch: int) -> dict:
    import torch

    from server.config import ServerConfig
    from server.engine import Engine
    from server.models import load_models
    from server.wire import classify_work
    from odeserve.v1 import odeserve_pb2 as pb

    models = load_models(checkpoints, torch.device("cpu"))
    engine = Engine({model: models[model].adapter}, torch.device("cpu"), max_batch=max_batch)
    config = ServerConfig()

    def send(images: np.ndarray, tol: float):
        request = pb.ClassifyRequest(model=model, images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()),
                                     accuracy=pb.Accuracy(tol=tol))  # fmt: skip
        _, future = engine.submit(model, classify_work(request, models[model], config))
        return future.result().nfe

    try:
        return load.run(send)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--model", default="odenet-mnist")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-request", type=int, default=1, help="images per request")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=10.0, help="static batching's collection window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import tempfile

    import torch

    from training.data import load_mnist

    images = load_mnist(args.data_dir, train=False, download=False).images[:2000, 0].numpy()
    load = Load(images, args.clients, args.duration, args.warmup, args.per_request, args.seed)
    batch_flags = ("--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms))
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "grpc continuous": grpc_run(load, args.checkpoints, args.model, Path(tmp), *batch_flags),
            "grpc static": grpc_run(load, args.checkpoints, args.model, Path(tmp), *batch_flags, "--batching", "static"),
            "in-process continuous": in_process_run(load, args.checkpoints, args.model, args.max_batch),
        }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    mix = ", ".join(f"{share:.0%} at {tol:g}" for tol, share in TOLERANCES.items())
    print(f"serve_load: {args.model}, {args.clients} closed-loop clients, {args.per_request} image(s)/request, "
          f"tolerances {mix}, {args.duration:g} s each, max batch {args.max_batch}; {machine}")  # fmt: skip
    print(f"{'configuration':<24} {'items/s':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'NFE':>6} {'requests':>9}")
    for name, r in rows.items():
        print(f"{name:<24} {r['throughput_items_per_s']:>9.1f} {r['latency_p50_ms']:>9.1f} {r['latency_p90_ms']:>9.1f} "
              f"{r['latency_p99_ms']:>9.1f} {r['mean_nfe']:>6.1f} {r['requests']:>9d}")  # fmt: skip
    ratios = {
        "continuous_over_static_throughput": rows["grpc continuous"]["throughput_items_per_s"] / rows["grpc static"]["throughput_items_per_s"],
        "continuous_over_static_p99": rows["grpc continuous"]["latency_p99_ms"] / rows["grpc static"]["latency_p99_ms"],
        "grpc_over_in_process_throughput": rows["grpc continuous"]["throughput_items_per_s"] / rows["in-process continuous"]["throughput_items_per_s"],
    }  # fmt: skip
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_load_{device}.json"
    record = {"benchmark": "serve_load", "machine": machine, "date": time.strftime("%Y-%m-%d"), "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "tolerance_mix": {str(k): v for k, v in TOLERANCES.items()},
        "rows": rows, "ratios": ratios}  # fmt: skip
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
