"""f in bfloat16 against float32, side by side in one run, on the shipped ODE-Net and real MNIST.

Two measurements, each alternating the precisions round by round so that a noisy machine
slows both alike:

* the ODE block alone: one solve of a batch of real test digits' features (after the
  downsampling) at each tolerance — wall time (median of rounds), mean NFE;
* the whole model on the first ``--images`` test digits at each tolerance — test error, mean
  NFE, wall time — and how many labels the two precisions disagree on.

The solver's state, error norm and step control stay float32 in both; ``bfloat16`` evaluates
f (and the downsampling and head, in the whole model) under autocast. oneDNN's choice of
kernels is recorded (``ONEDNN_VERBOSE``-free: ``torch.backends.cpu.get_cpu_capability()``).

    python bench/precision.py [--batch 1000] [--images 2000] [--rounds 3] [--threads 1]

Writes ``bench/results/precision_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuralode.checkpoint import load_checkpoint  # noqa: E402
from training.data import load_mnist, to_float  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-4)


def _timed(fn) -> tuple[float, object]:
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


@torch.no_grad()
def block_solves(model, features: torch.Tensor, rounds: int) -> list[dict]:
    rows = []
    for tol in TOLERANCES:
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        nfe: dict[str, float] = {}
        model.block(features[:8], rtol=tol, atol=tol)  # warm-up
        for _ in range(rounds):
            for precision in PRECISIONS:
                seconds, (_, solution) = _timed(lambda: model.block(features, rtol=tol, atol=tol, precision=precision))
                times[precision].append(seconds)
                nfe[precision] = float(solution.nfe.double().mean())
        median = {p: statistics.median(times[p]) for p in PRECISIONS}
        rows.append(
            {
                "tol": tol,
                **{f"{p}_s": round(median[p], 4) for p in PRECISIONS},
                **{f"{p}_nfe": round(nfe[p], 2) for p in PRECISIONS},
                "speedup": round(median["float32"] / median["bfloat16"], 2),
            }
        )
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def whole_model(model, images: torch.Tensor, labels: torch.Tensor, batch: int) -> list[dict]:
    rows = []
    for tol in TOLERANCES:
        row: dict[str, float] = {"tol": tol}
        predictions = {}
        for precision in PRECISIONS:
            errors, nfes, seconds = 0, [], 0.0
            predicted = []
            for start in range(0, len(images), batch):
                x, y = images[start : start + batch], labels[start : start + batch]
                took, (logits, solution) = _timed(lambda: model(x, rtol=tol, atol=tol, precision=precision))
                seconds += took
                errors += int((logits.argmax(1) != y).sum())
                nfes.append(solution.nfe)
                predicted.append(logits.argmax(1))
            predictions[precision] = torch.cat(predicted)
            row[f"{precision}_test_error"] = errors / len(images)
            row[f"{precision}_nfe"] = round(float(torch.cat(nfes).double().mean()), 2)
            row[f"{precision}_s"] = round(seconds, 3)
        row["labels_changed"] = int((predictions["float32"] != predictions["bfloat16"]).sum())
        row["speedup"] = round(row["float32_s"] / row["bfloat16_s"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "odenet-mnist.pt")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).model
    test = load_mnist(args.data_dir, train=False, download=False)
    images, labels = to_float(test.images[: args.images]), test.labels[: args.images]
    with torch.no_grad():
        features = model.downsample(images[: args.batch])
    print(f"ODE block, batch {args.batch}: seconds per solve (median of {args.rounds} interleaved rounds)")
    block = block_solves(model, features, args.rounds)
    print(f"whole model, {args.images} test digits in batches of {args.batch}")
    whole = whole_model(model, images, labels, args.batch)
    relative = lambda path: str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)  # noqa: E731
    record = {
        "benchmark": "precision",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/precision.py " + " ".join(sys.argv[1:]),
        "checkpoint": relative(args.checkpoint),
        "torch": torch.__version__,
        "block": block,
        "whole_model": whole,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {relative(args.out)}")


if __name__ == "__main__":
    main()
