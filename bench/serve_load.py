"""Closed-loop load on the service, side by side in one run:

* continuous (solver-step) batching vs static batching, both through gRPC;
* the gRPC path vs the in-process engine (same engine, no network), continuous batching.

N clients each send one request after another for a fixed duration; every request classifies
real MNIST test images at a tolerance drawn from a mixed distribution. Each configuration runs
several times, interleaved; the medians of throughput, p50/p90/p99 latency and mean NFE per
item are printed and written to ``bench/results/serve_load_<device>.json``.

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


class GrpcTarget:
    """A real server subprocess and a client connected to it."""

    def __init__(self, checkpoints: Path, model: str, tmp: Path, *flags: str) -> None:
        from conftest import start_server

        from client import Client

        tmp.mkdir(parents=True, exist_ok=True)
        self.server = start_server(checkpoints, tmp, *flags)
        self.client = Client(self.server.target, timeout_s=600)
        self.model = model

    def send(self, images: np.ndarray, tol: float):
        return self.client.classify(images, model=self.model, tol=tol).items.nfe

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class InProcessTarget:
    """The same engine without gRPC: requests go straight to ``Engine.submit``."""

    def __init__(self, checkpoints: Path, model: str, max_batch: int) -> None:
        import torch

        from neuralode.devices import resolve_device
        from server.config import ServerConfig
        from server.engine import Engine
        from server.models import load_models

        device = resolve_device("auto")  # where `python -m server` puts the models too
        self.models = load_models(checkpoints, device)
        self.engine = Engine(device, max_batch=max_batch)
        self.engine.add(self.models[model].key, self.models[model].adapter, label=model)
        self.model, self.config = model, ServerConfig()

    def send(self, images: np.ndarray, tol: float):
        from odeserve.v1 import odeserve_pb2 as pb
        from server.wire import classify_work

        request = pb.ClassifyRequest(model=self.model, accuracy=pb.Accuracy(tol=tol),
                                     images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()))  # fmt: skip
        _, future = self.engine.submit(self.models[self.model].key, classify_work(request, self.models[self.model], self.config))
        return future.result().nfe

    def close(self) -> None:
        self.engine.close()


def _median_row(runs: list[dict]) -> dict:
    keys = ("throughput_items_per_s", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "mean_nfe")
    row = {key: float(np.median([run[key] for run in runs])) for key in keys}
    row["requests"] = int(sum(run["requests"] for run in runs))
    row["runs"] = runs
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--model", default="odenet-mnist")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-request", type=int, default=1, help="images per request")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians are reported")
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
        targets = {
            "grpc continuous": GrpcTarget(args.checkpoints, args.model, Path(tmp) / "continuous", *batch_flags),
            "grpc static": GrpcTarget(args.checkpoints, args.model, Path(tmp) / "static", *batch_flags, "--batching", "static"),
            "in-process continuous": InProcessTarget(args.checkpoints, args.model, args.max_batch),
        }
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        try:
            for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits all alike
                for name, target in targets.items():
                    runs[name].append(load.run(target.send))
        finally:
            for target in targets.values():
                target.close()
    rows = {name: _median_row(results) for name, results in runs.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    mix = ", ".join(f"{share:.0%} at {tol:g}" for tol, share in TOLERANCES.items())
    print(f"serve_load: {args.model}, {args.clients} closed-loop clients, {args.per_request} image(s)/request, "
          f"tolerances {mix}, median of {args.repeats} interleaved runs of {args.duration:g} s, max batch {args.max_batch}; {machine}")  # fmt: skip
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
