"""f in bfloat16 against float32, side by side in one run, on the shipped ODE-Net and real MNIST.

Two measurements, each alternating the variants round by round so that a noisy machine
slows all alike:

* the ODE block alone: one solve of a batch of real test digits' features (after the
  downsampling) at each tolerance, f eager and compiled (``neuralode.compiled.CompiledDynamics``,
  as the server's ``compile_dynamics = on`` runs it; compiled before timing) in each precision —
  wall time (median of rounds), mean NFE, speed-up over float32 eager, and the largest
  difference from float32 eager's z(1);
* the whole model on the first ``--images`` test digits at each tolerance — test error, mean
  NFE, wall time — and how many labels the two precisions disagree on.

The solver's state, error norm and step control stay float32 in both; ``bfloat16`` evaluates
f (and the downsampling and head, in the whole model) under autocast. oneDNN's choice of
kernels is recorded: torch's CPU capability and, from ``ONEDNN_VERBOSE`` in a child process,
the ISA oneDNN dispatches to and the implementation of a bfloat16 convolution of f's shape.

    python bench/precision.py [--batch 1000] [--images 2000] [--rounds 3] [--threads 1]

Writes ``bench/results/precision_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuralode.checkpoint import load_checkpoint  # noqa: E402
from neuralode.compiled import CompiledDynamics  # noqa: E402
from neuralode.devices import cpu_description  # noqa: E402
from training.data import load_mnist, to_float  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-4)


def _timed(fn) -> tuple[float, object]:
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


VARIANTS = tuple((precision, compiled) for compiled in (False, True) for precision in PRECISIONS)


def _variant(precision: str, compiled: bool) -> str:
    return f"{precision}{'_compiled' if compiled else ''}"


@torch.no_grad()
def block_solves(model, features: torch.Tensor, rounds: int) -> tuple[list[dict], list[dict]]:
    """Each tolerance's row, and each padded size compiled: whether its compiled f was kept."""
    block = model.block
    funcs = {False: block.func, True: CompiledDynamics(block.func, max_rows=len(features))}
    rows = []
    for tol in TOLERANCES:
        times: dict[str, list[float]] = {_variant(*v): [] for v in VARIANTS}
        nfe: dict[str, float] = {}
        y1: dict[str, torch.Tensor] = {}
        for precision, compiled in VARIANTS:  # warm-up: compiles every padded size this solve meets
            block._solve(funcs[compiled], features, {"rtol": tol, "atol": tol, "precision": precision})
        for round_ in range(rounds):
            for precision, compiled in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                name = _variant(precision, compiled)
                seconds, solution = _timed(
                    lambda: block._solve(funcs[compiled], features, {"rtol": tol, "atol": tol, "precision": precision})
                )
                times[name].append(seconds)
                nfe[name] = float(solution.nfe.double().mean())
                y1[name] = solution.y1
        median = {name: statistics.median(values) for name, values in times.items()}
        rows.append(
            {
                "tol": tol,
                **{f"{name}_s": round(median[name], 4) for name in median},
                **{f"{name}_nfe": round(nfe[name], 2) for name in median},
                **{
                    f"{name}_speedup": round(median["float32"] / median[name], 2)
                    for name in median
                    if name != "float32"
                },
                **{
                    f"{name}_max_diff": round(float((y1[name] - y1["float32"]).abs().max()), 4)
                    for name in median
                    if name != "float32"
                },
            }
        )
        print(rows[-1], flush=True)
    compiled_sizes = [
        {
            "rows": c.rows,
            "precision": c.precision,
            "compile_s": round(c.compile_seconds, 1),
            "compiled_ms": round(c.compiled_ms, 2),
            "eager_ms": round(c.eager_ms, 2),
            "kept": c.kept,
        }
        for c in funcs[True].sizes.values()
    ]
    print("compiled sizes:", compiled_sizes)
    return rows, compiled_sizes


_ONEDNN_PROBE = """
import torch
torch.set_num_threads(1)
conv = torch.nn.Conv2d(65, 64, 3, padding=1)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    conv(torch.randn(16, 65, 6, 6))
"""


def onednn_kernels() -> dict[str, str]:
    """The ISA oneDNN dispatches to here and the implementation it ran a bfloat16 convolution
    of f's shape with (its verbose log, read in a child process so this one stays quiet)."""
    log = subprocess.run(
        [sys.executable, "-c", _ONEDNN_PROBE],
        env={**os.environ, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    isa = next((line.split("isa:", 1)[1] for line in log if ",info,cpu,isa:" in line), "unknown")
    convolution = next((line.split(",")[6] for line in log if ",exec,cpu,convolution," in line), "unknown")
    return {"isa": isa, "bfloat16_convolution": convolution}


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
    block, compiled_sizes = block_solves(model, features, args.rounds)
    print(f"whole model, {args.images} test digits in batches of {args.batch}")
    whole = whole_model(model, images, labels, args.batch)
    relative = lambda path: str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)  # noqa: E731
    record = {
        "benchmark": "precision",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
        "cpu": cpu_description(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": onednn_kernels(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/precision.py " + " ".join(sys.argv[1:]),
        "checkpoint": relative(args.checkpoint),
        "torch": torch.__version__,
        "block": block,
        "compiled_sizes": compiled_sizes,
        "whole_model": whole,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {relative(args.out)}")


if __name__ == "__main__":
    main()
