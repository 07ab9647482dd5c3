"""ODE-Net inference on a checkpoint, ours vs torchdiffeq on the same weights, in one run:
batch-1 latency and batch-1000 throughput at one tolerance (the whole model: downsampling,
ODE block, head), with each side's NFE; on the GPU also ours with f from CUDA graphs, and
ours with whole solver steps from CUDA graphs (``StepGraphs``; on the CPU the same masked
steps run eagerly). Every side starts with the checkpoint's first step (its card's
``hyper.first_step``; torchdiffeq through its ``first_step`` option) or, without one, with
Hairer's rule. Written for the GPU figures of the serving issues (targets on an H200:
batch-1 ≤ 2 ms, ≥ 150k images/s at batch 1000); runs on the CPU too.

    python bench/model_inference.py [--checkpoint checkpoints/odenet-mnist.pt] [--device cuda] [--tol 1e-3]

Writes ``bench/results/model_inference_<device>.json`` with the device's name.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from solver_overhead import median_seconds  # bench/ is on the path when a bench script runs

from neuralode import solve_ivp
from neuralode.checkpoint import load_checkpoint
from neuralode.cuda_graphs import GraphedDynamics, StepGraphs
from neuralode.solvers import Stepper, get_method

ROOT = Path(__file__).resolve().parents[1]


def measure(model, images: torch.Tensor, tol: float, repeats: int) -> dict:
    """Ours (per-sample solver) and torchdiffeq's odeint (one step size for the batch) on the
    same weights and images."""
    import torchdiffeq

    device = images.device
    block = model.block
    calls = {"n": 0}

    def counted(t, z):
        calls["n"] += 1
        return block.func(t, z)

    first_step = {} if block.first_step is None else {"first_step": block.first_step}  # the model's, for all

    def theirs():
        calls["n"] = 0
        z = model.downsample(images)
        z1 = torchdiffeq.odeint(
            counted,
            z,
            torch.tensor([0.0, block.t1], device=device),
            rtol=tol,
            atol=tol,
            method="dopri5",
            options=first_step,
        )[-1]
        return model.head(z1)

    result = {}

    def ours():
        result["logits"], result["solution"] = model(images, rtol=tol, atol=tol)

    graphed_func = GraphedDynamics(block.func)

    def ours_graphed():
        z = model.downsample(images)
        solution = solve_ivp(graphed_func, z, (0.0, block.t1), method=block.method, rtol=tol, atol=tol, **first_step)
        result["graphed_logits"] = model.head(solution.y1)

    stepper = Stepper(get_method(block.method))
    step_graphs = StepGraphs(stepper, block.func)

    def ours_step_graphs():
        z = model.downsample(images)
        t0 = torch.zeros(len(z), dtype=z.dtype, device=device)
        end, tol_rows = torch.full_like(t0, block.t1), torch.full_like(t0, tol)
        given = None if block.first_step is None else torch.full_like(t0, block.first_step)
        final = step_graphs.run(stepper.init(block.func, z, t0, end, end, tol_rows, tol_rows, first_step=given))
        result["step_graphs_logits"], result["step_graphs_nfe"] = model.head(final.y), final.nfe

    n = len(images)
    with torch.no_grad():
        ours_s = median_seconds(ours, device, repeats)
        theirs_s = median_seconds(theirs, device, repeats)
        agree = float((theirs().argmax(1) == result["logits"].argmax(1)).float().mean())
        row = {
            "batch": n,
            "ours": {
                "ms": ours_s * 1e3,
                "images_per_s": n / ours_s,
                "nfe_mean": float(result["solution"].nfe.double().mean()),
            },
            "torchdiffeq": {"ms": theirs_s * 1e3, "images_per_s": n / theirs_s, "nfe": calls["n"]},
            "speedup": theirs_s / ours_s,
            "same_label_fraction": agree,
        }
        if device.type == "cuda":  # f from CUDA graphs; a failure is recorded, not fatal
            try:
                graphed_s = median_seconds(ours_graphed, device, repeats)
                row["ours_cuda_graphs"] = {
                    "ms": graphed_s * 1e3,
                    "images_per_s": n / graphed_s,
                    "sizes": graphed_func.captured_sizes,
                    "max_abs_logit_difference": float((result["graphed_logits"] - result["logits"]).abs().max()),
                }
            except Exception as error:  # noqa: BLE001
                row["ours_cuda_graphs"] = {"error": repr(error)}
        try:  # whole steps from CUDA graphs (off the GPU: the same masked steps, eagerly)
            step_graphs_s = median_seconds(ours_step_graphs, device, repeats)
            row["ours_step_graphs"] = {
                "ms": step_graphs_s * 1e3,
                "images_per_s": n / step_graphs_s,
                "sizes": step_graphs.captured_sizes,
                "same_nfe_as_ours": result["step_graphs_nfe"].tolist() == result["solution"].nfe.tolist(),
                "max_abs_logit_difference": float((result["step_graphs_logits"] - result["logits"]).abs().max()),
            }
        except Exception as error:  # noqa: BLE001 - a failure is recorded, not fatal
            row["ours_step_graphs"] = {"error": repr(error)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "odenet-mnist.pt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_checkpoint(args.checkpoint, device).model
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch:
        images = torch.rand(batch, 1, 28, 28, generator=generator).to(device)
        row = measure(model, images, args.tol, args.repeats)
        rows.append(row)
        print(
            f"batch {batch:5d}: ours {row['ours']['ms']:9.2f} ms ({row['ours']['images_per_s']:10.0f} images/s, "
            f"NFE {row['ours']['nfe_mean']:.1f})   torchdiffeq {row['torchdiffeq']['ms']:9.2f} ms "
            f"({row['torchdiffeq']['images_per_s']:10.0f} images/s, NFE {row['torchdiffeq']['nfe']})   "
            f"{row['speedup']:.2f}x"
        )
        if "ours_cuda_graphs" in row:
            print(f"             ours with f from CUDA graphs: {row['ours_cuda_graphs']}")
        print(f"             ours with whole steps from graphs: {row['ours_step_graphs']}")
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    report = {
        "benchmark": "model_inference",
        "device": name,
        "torch": torch.__version__,
        "tol": args.tol,
        "checkpoint": args.checkpoint.name,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"model_inference_{device.type}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
