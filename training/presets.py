"""Named training recipes. A preset only fills in defaults: any flag given explicitly wins.

``gpu-paper`` is the recipe meant to train the paper's ODE-Net (adjoint, dopri5, tol 1e-3) to
the paper's 0.42% MNIST test error within 8 minutes on one H200: large batches to fill the
GPU, AdamW with warm-up and cosine decay scaled to the batch, TF32 for convolutions and
matrix products (the solver's state, step-size control and error norms stay float32), and a
time budget that fits the number of steps to the measured step time, so the schedule ends
on time whatever the GPU's speed. It has not been run on a GPU yet (see the issue notes).

``cpu-paper`` is the same model and solver (adjoint, dopri5, tol 1e-3) on this project's
2-core CPU: one thread, so the other core stays free for serving or working beside it; the
batch and peak learning rate of the 3-epoch runs that reached 0.67-0.74% (known stable with
the adjoint, NFE included), trained five times longer under the same warm-up and cosine decay,
with AdamW's usual weight decay; the test error after every epoch; the training state every
five minutes, so that the hours it takes can span sittings (``--resume``). docs/training.md
gives its measured runs.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    "cpu-paper": {
        "device": "cpu",
        "threads": 1,
        "batch_size": 128,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 1e-2,
        "warmup": 0.02,
        "epochs": 15,
        "eval_every": 1,
        "state_every": 300.0,
        "tol": 1e-3,
    },
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
