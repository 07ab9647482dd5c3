"""What a model's first step buys when it is served: two checkpoints of one ODE-Net (say the
same weights under Hairer's rule and tuned by ``python -m training tune … --first-step 1``),
served in process by the real engine side by side, rounds interleaved so drift in the
machine's speed hits both alike.

The load is section 5 of ``bench/serve_load.py``: closed-loop clients of one real MNIST
image each over its tolerance mix (50% 1e-1, 30% 1e-3, 20% 1e-5). Prints throughput, latency
and mean NFE per checkpoint (medians over the rounds) and the ratios of the second to the first.

    git show 172d6ef:checkpoints/odenet-mnist.pt > runs/odenet-mnist-rule.pt   # as shipped before tuning
    git show 693cd5b:checkpoints/odenet-mnist.pt > runs/odenet-mnist-span.pt   # the same, tuned
    python bench/first_step.py runs/odenet-mnist-rule.pt runs/odenet-mnist-span.pt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import CLASSIFIER, engine_times  # noqa: E402

REPORTED = ("throughput_items_per_s", "latency_p50_ms", "latency_p99_ms", "mean_nfe", "f_share")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs=2, help="the baseline, then the one compared with it")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="per round and checkpoint")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "first_step_cpu.json")
    args = parser.parse_args()

    from neuralode.checkpoint import read_card
    from training.data import load_mnist

    test = load_mnist(args.data_dir, train=False, download=False)
    images = test.images[:2000, 0].numpy()
    runs: dict[str, list[dict]] = {str(path): [] for path in args.checkpoints}
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for index, path in enumerate(args.checkpoints):  # each served alone, under the classifier's name
            folder = Path(tmp) / str(index)
            folder.mkdir()
            shutil.copy(path, folder / f"{CLASSIFIER}.pt")
            folders.append(folder)
        for round_index in range(args.rounds):
            for path, folder in zip(args.checkpoints, folders):
                row = engine_times(
                    folder, images, args.clients, args.seconds, args.warmup, args.max_batch, args.seed + round_index
                )
                runs[str(path)].append(row)
                print(f"round {round_index + 1} {path}: " + ", ".join(f"{k} {row[k]:.4g}" for k in REPORTED))
    medians = {path: {k: statistics.median(r[k] for r in rows) for k in REPORTED} for path, rows in runs.items()}
    base, other = (medians[str(path)] for path in args.checkpoints)
    ratios = {
        "throughput": other["throughput_items_per_s"] / base["throughput_items_per_s"],
        "mean_nfe": base["mean_nfe"] / other["mean_nfe"],
        "latency_p50": other["latency_p50_ms"] / base["latency_p50_ms"],
        "latency_p99": other["latency_p99_ms"] / base["latency_p99_ms"],
    }
    for path, row in medians.items():
        print(f"median {path}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    print(
        "second/first: throughput {throughput:.3f}x, NFE {mean_nfe:.3f}x fewer, p50 {latency_p50:.3f}x, "
        "p99 {latency_p99:.3f}x".format(**ratios)
    )

    import torch

    document = {
        "benchmark": "first_step",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/first_step.py " + " ".join(sys.argv[1:]),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "settings": {
            k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k != "checkpoints"
        },
        "checkpoints": [
            {
                "path": os.path.relpath(path, ROOT),
                "first_step": card.hyper.get("first_step"),
                "code_version": card.code_version,
            }
            for path, card in zip(args.checkpoints, map(read_card, args.checkpoints))
        ],
        "runs": {os.path.relpath(path, ROOT): rows for path, rows in runs.items()},
        "medians": {os.path.relpath(path, ROOT): row for path, row in medians.items()},
        "ratios_second_to_first": ratios,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
