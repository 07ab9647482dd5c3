"""Named training recipes. A preset only fills in defaults: any flag given explicitly wins.

``gpu-paper`` is the recipe meant to train the paper's ODE-Net (adjoint, dopri5, tol 1e-3) to
the paper's 0.42% MNIST test error within 8 minutes on one H200: large batches to fill the
GPU, AdamW with warm-up and cosine decay scaled to the batch, TF32 for convolutions and
matrix products (the solver's state, step-size control and error norms stay float32), and a
time budget that fits the number of steps to the measured step time, so the schedule ends
on time whatever the GPU's speed. It has not been run on a GPU yet (see the issue notes).
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    "gpu-paper": {
        "device": "cuda",
        "batch_size": 1024,
        "lr": 6e-3,
        "weight_decay": 1e-4,
        "warmup": 0.05,
        "epochs": 100,  # an upper bound; the time budget decides
        "time_budget": 450.0,
        "eval_every": 0,
        "tf32": True,
        "tol": 1e-3,
    },
}
