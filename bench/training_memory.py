"""The memory a training step keeps for its backward pass: the adjoint's O(1) against
backpropagation through the solver's O(L̃), on the shipped ODE-Net and real MNIST digits.

The paper's claim is about what autograd stores, not about a process's resident set (most of
which is Python, torch and the data set). So this counts exactly that: every tensor saved for
backward during one forward pass (``torch.autograd.graph.saved_tensors_hooks``; a storage saved
twice counts once), for the same network trained with the adjoint (ODE-Net) and without it
(RK-Net), at a batch of 128 training-sized digits and tolerances from loose to tight, so that
the number of evaluations L̃ grows. Each row also gives the forward NFE and, for the adjoint,
the backward solve's NFE (the compute it trades for the memory).

    python bench/training_memory.py [--data-dir ../shared/data] [--batch 128] [--tolerances 1e-1 1e-2 1e-3 1e-4 1e-5]

Writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from records import write_record  # noqa: E402

from neuralode.checkpoint import load_checkpoint  # noqa: E402
from neuralode.devices import cpu_description  # noqa: E402
from training.data import load_mnist, to_float  # noqa: E402

MODES = {"odenet (adjoint)": True, "rknet (backprop through the solver)": False}


def saved_for_backward(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """One training step's forward and backward: bytes saved for backward, NFE both ways."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits, solution = model(images)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    backward = solution.backward
    return {
        "saved_mib": sum(storages.values()) / 2**20,
        "nfe_forward": float(solution.nfe.float().mean()),
        "nfe_backward": None if backward is None or backward.nfe is None else float(backward.nfe.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "odenet-mnist.pt")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    parser.add_argument("--name", default="training_memory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).model.train()
    digits = load_mnist(args.data_dir, train=True, download=False).head(args.batch)
    images, labels = to_float(digits.images), digits.labels
    rows = []
    for tol in args.tolerances:
        model.block.rtol = model.block.atol = tol
        for mode, adjoint in MODES.items():
            model.block.adjoint = adjoint
            figures = {"tol": tol, "mode": mode, **saved_for_backward(model, images, labels)}
            rows.append(figures)
            backward = "" if figures["nfe_backward"] is None else f", backward NFE {figures['nfe_backward']:.1f}"
            print(
                f"tol {tol:g}, {mode}: {figures['saved_mib']:.1f} MiB saved for backward, "
                f"forward NFE {figures['nfe_forward']:.1f}{backward}"
            )
    figures = {
        "checkpoint": os.path.relpath(args.checkpoint.resolve(), ROOT),
        "batch": args.batch,
        "images": f"the first {args.batch} MNIST training digits",
        "rows": rows,
    }
    write_record(args.out, args.name, "training_memory", cpu_description(), figures)


if __name__ == "__main__":
    main()
