"""Two clients of one running server, on real MNIST: what a small client gets beside a big one.

``flood``: a privileged caller's 1,024 images at tol 1e-8 with priority 1, then a
default-priority client's 1-image tol 1e-2 calls one after another (each with a 10 s deadline):
their latency percentiles and how many were answered. ``admission``: one client's
4 x 1,024 + 256 images at tol 1e-8 at once, then another client's 1-image tol 1e-1 calls: how
many were admitted, and what the big client was told.

    ODESERVE_TOKENS="ops priority=1, hog, small" python -m server --metrics-port 0 &
    python bench/fair_clients.py --data-dir ../shared/data flood --calls 100
    python bench/fair_clients.py --data-dir ../shared/data admission --calls 43

A server without tokens ignores the ones sent: each client has a connection of its own, which
is how the server tells unauthenticated clients apart. ``--name`` keeps the figures in
bench/results/<name>.json."""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

MODEL = "odenet-mnist"


def _request(images: np.ndarray, tol: float, priority: int = 0) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=MODEL,
        images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()),
        accuracy=pb.Accuracy(tol=tol),
        scheduling=pb.Scheduling(priority=priority),
    )


def _stub(target: str) -> pb_grpc.InferenceStub:
    # A connection of its own (no subchannel shared with the other client's channel).
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    return pb_grpc.InferenceStub(channel)


def _metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _small_calls(stub, images: np.ndarray, calls: int, tol: float, token: str) -> dict:
    seconds, codes = [], collections.Counter()
    for index in range(calls):
        begin = time.monotonic()
        try:
            stub.Classify(_request(images[index % len(images)][None], tol), timeout=10, metadata=_metadata(token))
            seconds.append(time.monotonic() - begin)
            codes["OK"] += 1
        except grpc.RpcError as error:
            codes[error.code().name] += 1
    summary: dict = {"calls": calls, "codes": dict(codes)}
    if seconds:
        p50, p99 = np.percentile(seconds, [50, 99])
        summary.update(p50_s=round(float(p50), 3), p99_s=round(float(p99), 3), max_s=round(max(seconds), 3))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=("flood", "admission"))
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--big-token", default="", help="the big client's token (default: ops for flood, hog)")
    parser.add_argument("--small-token", default="", help="the small client's token (default: small)")
    parser.add_argument("--name", default="", help="write the figures to bench/results/<name>.json too")
    parser.add_argument(
        "--server",
        default='ODESERVE_TOKENS="ops priority=1, hog, small" python -m server --metrics-port 0',
        help="how the measured server was started, for the record",
    )
    args = parser.parse_args()
    raw = (args.data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    digits = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:1024]
    big, small = _stub(args.target), _stub(args.target)
    big_token = args.big_token or ("ops" if args.scenario == "flood" else "hog")
    small_token = args.small_token or "small"
    small.Classify(_request(digits[:1], 1e-2), timeout=30, metadata=_metadata(small_token))  # warm-up
    if args.scenario == "flood":
        calls = [big.Classify.future(_request(digits, 1e-8, priority=1), timeout=600, metadata=_metadata(big_token))]
    else:
        calls = [
            big.Classify.future(_request(images, 1e-8), timeout=600, metadata=_metadata(big_token))
            for images in (digits, digits, digits, digits, digits[:256])
        ]
    time.sleep(3.0)  # the big requests are in the batch and the queue
    result = {
        "scenario": args.scenario,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/fair_clients.py " + " ".join(sys.argv[1:]),
        "server": args.server,
    }
    result["small"] = _small_calls(small, digits, args.calls, 1e-2 if args.scenario == "flood" else 1e-1, small_token)
    result["big"] = [call.code().name if call.done() else "still running" for call in calls]
    refused = [call.details() for call in calls if call.done() and call.code() is not grpc.StatusCode.OK]
    if refused:
        result["big_refused_with"] = refused[0]
    for call in calls:
        call.cancel()
    print(json.dumps(result, indent=1))
    if args.name:
        (Path(__file__).parent / "results" / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
