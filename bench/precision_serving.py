"""Served throughput by precision: requests asking ``precision=float32`` against the same
requests asking ``auto`` (and, with ``--precisions``, ``bfloat16``), on one real server.

One ``python -m server`` process serves the shipped ODE-Net (or ``--checkpoint``, whose card's
precision table is what ``auto`` reads); N closed-loop gRPC clients send
``bench/serve_load.py``'s mixed load — 1–256 real MNIST test digits per request (log-uniform),
tolerance 50% 1e-1 / 30% 1e-3 / 20% 1e-5 (or ``--tolerances``, in equal shares) — every request of a run asking one precision. Each
round runs every precision once on the same request sequence, in alternating order from round
to round, so that a noisy machine slows all alike. Reported per precision: throughput (items/s,
median of rounds, and the ratio to float32 round by round), closed-loop latency p50/p99 over
all rounds' requests, the answers' MNIST test error, and per tolerance the mean NFE and the
share of items the server says it solved in bfloat16.

    python bench/precision_serving.py --data-dir ../shared/data [--rounds 4] [--seconds 20]

Writes ``bench/results/precision_serving_cpu.json``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers
sys.path.insert(0, str(ROOT))

from live_server import CLASSIFIER, end_on_sigterm, start_server  # noqa: E402
from records import write_record  # noqa: E402
from serve_load import TOLERANCES, draw_request  # noqa: E402

from neuralode.devices import cpu_description  # noqa: E402
from odeserve.v1 import odeserve_pb2 as pb  # noqa: E402
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc  # noqa: E402
from training.data import load_mnist  # noqa: E402


@dataclass(frozen=True)
class Answer:
    """One request's outcome, as the client saw it."""

    end: float
    latency: float
    tol: float
    items: int
    errors: int
    nfe: float
    precision: str


def run(
    stub,
    images,
    labels,
    precision: str,
    tolerances: dict[float, float],
    clients: int,
    seconds: float,
    warmup: float,
    seed: int,
    max_images: int,
):
    """``clients`` closed-loop clients for ``warmup + seconds``, each request's tolerance drawn
    from ``tolerances`` (tolerance: share); the answers ending after the warm-up."""
    answers: list[Answer] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + warmup + seconds

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)  # the same requests for every precision of a round
        while time.monotonic() < stop_at:
            chosen, tol = draw_request(rng, len(images), max_images, tolerances)
            batch = images[chosen]
            request = pb.ClassifyRequest(
                model=CLASSIFIER,
                accuracy=pb.Accuracy(tol=tol, precision=precision),
                images=pb.Tensor(dtype="uint8", shape=list(batch.shape), data=batch.tobytes()),
            )
            begin = time.monotonic()
            response = stub.Classify(request, timeout=600)
            end = time.monotonic()
            errors = int((np.asarray(response.labels) != labels[chosen]).sum())
            answer = Answer(
                end,
                end - begin,
                tol,
                len(chosen),
                errors,
                float(np.mean(response.items.nfe)),
                response.solved.precision,
            )
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [a for a in answers if start + warmup <= a.end <= stop_at]


def summary(runs: list[list[Answer]], seconds: float) -> dict:
    answers = [a for answers in runs for a in answers]
    latencies = [a.latency for a in answers]
    items = sum(a.items for a in answers)
    by_tol: dict[float, list[Answer]] = defaultdict(list)
    for answer in answers:
        by_tol[answer.tol].append(answer)
    return {
        "items_per_s": round(statistics.median(sum(a.items for a in r) / seconds for r in runs), 1),
        "items_per_s_by_round": [round(sum(a.items for a in r) / seconds, 1) for r in runs],
        "requests": len(answers),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
        "test_error": round(sum(a.errors for a in answers) / items, 5),
        "items": items,
        "by_tol": {
            str(tol): {
                "mean_nfe": round(sum(a.nfe * a.items for a in group) / sum(a.items for a in group), 2),
                "bfloat16_share": round(
                    sum(a.items for a in group if a.precision == "bfloat16") / sum(a.items for a in group), 3
                ),
                "test_error": round(sum(a.errors for a in group) / sum(a.items for a in group), 5),
            }
            for tol, group in sorted(by_tol.items(), reverse=True)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / f"{CLASSIFIER}.pt")
    parser.add_argument("--precisions", nargs="+", default=["float32", "auto"], choices=["float32", "auto", "bfloat16"])
    parser.add_argument(
        "--tolerances",
        type=float,
        nargs="+",
        default=None,
        help="request tolerances, in equal shares (default: the mixed load's 50%% 1e-1 / 30%% 1e-3 / 20%% 1e-5)",
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each run's measurement")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=256)
    parser.add_argument(
        "--server-flags", default="", help="more `python -m server` flags, e.g. '--compile-dynamics on'"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="precision_serving_cpu")
    args = parser.parse_args()
    end_on_sigterm()
    test = load_mnist(args.data_dir, train=False, download=False)
    images, labels = test.images[:, 0].numpy(), test.labels.numpy()
    tolerances = TOLERANCES if args.tolerances is None else {tol: 1.0 / len(args.tolerances) for tol in args.tolerances}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        folder.mkdir()
        shutil.copy(args.checkpoint, folder / f"{CLASSIFIER}.pt")
        (Path(tmp) / "server").mkdir()
        server = start_server(folder, Path(tmp) / "server", *args.server_flags.split(), timeout=900)
        channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)])
        stub = pb_grpc.InferenceStub(channel)
        runs: dict[str, list[list[Answer]]] = {p: [] for p in args.precisions}
        try:
            for precision in args.precisions:  # a precision the server refuses ends the bench here
                probe = pb.ClassifyRequest(
                    model=CLASSIFIER,
                    accuracy=pb.Accuracy(tol=0.1, precision=precision),
                    images=pb.Tensor(dtype="uint8", shape=[1, 28, 28], data=images[0].tobytes()),
                )
                try:
                    stub.Classify(probe, timeout=600)
                except grpc.RpcError as error:
                    raise SystemExit(f"precision {precision}: {error.code().name}: {error.details()}") from None
            for round_ in range(args.rounds):
                order = args.precisions if round_ % 2 == 0 else args.precisions[::-1]
                for precision in order:
                    answers = run(
                        stub,
                        images,
                        labels,
                        precision,
                        tolerances,
                        args.clients,
                        args.seconds,
                        args.warmup,
                        round_,
                        args.max_images,
                    )
                    runs[precision].append(answers)
                    print(
                        f"round {round_ + 1} {precision:>8}: {sum(a.items for a in answers) / args.seconds:.1f} items/s",
                        flush=True,
                    )
        finally:
            channel.close()
            server.stop()
    results = {p: summary(r, args.seconds) for p, r in runs.items()}
    base = runs[args.precisions[0]]
    for precision, rounds in runs.items():
        results[precision]["ratio_by_round"] = [
            round(sum(a.items for a in r) / sum(a.items for a in b), 2) for r, b in zip(rounds, base)
        ]
    for precision, row in results.items():
        print(precision, {k: v for k, v in row.items() if k != "items_per_s_by_round"})
    relative = (
        str(args.checkpoint.resolve().relative_to(ROOT))
        if args.checkpoint.resolve().is_relative_to(ROOT)
        else args.checkpoint.name
    )
    write_record(
        args.out,
        args.name,
        "precision_serving",
        cpu_description(),
        {
            "settings": {
                "checkpoint": relative,
                "clients": args.clients,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "max_images": args.max_images,
                "tolerances": {str(t): round(s, 3) for t, s in tolerances.items()},
                "server_flags": args.server_flags,
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
