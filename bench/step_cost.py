"""What one solver step of the shipped ODE-Net costs at the small batches of one-image traffic,
split into f and the solver's own arithmetic, and what compiling the whole step would buy.

At 16 clients × 1 image the serving engine steps about 13 rows at a time (``bench/serve_load.py``
section 5), joining about 3 new ones a step. This measures, per number of rows, in one process:

- ``step``: one eager dopri5 step with the model's f (what the engine's worker runs);
- ``f``: the six evaluations of f such a step makes, alone;
- ``arithmetic``: the same step with an f that costs nothing (a stored tensor): the stages'
  sums, the error norm, step control and the state's update — the engine's ``step`` phase;
- ``join``: ``Stepper.init`` on that many new rows (f at y0, Hairer's first-step rule), with
  the model's f and with a free one;
- ``compiled``: the whole masked step, f included, compiled by ``torch.compile`` for that many
  rows (what :class:`~neuralode.cuda_graphs.StepGraphs` replays on a GPU), its compile time and
  how far its state lands from the eager step's. Compiling only the arithmetic, with f left
  eager, breaks the graph at each of f's six calls and is measured too (``arithmetic_compiled``).

    python bench/step_cost.py [--rows 1 4 13 16] [--compile-rows 4 16] [--threads 2] [--name step_cost_cpu]

Writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from records import write_record  # noqa: E402

from neuralode.checkpoint import load_checkpoint  # noqa: E402
from neuralode.cuda_graphs import masked_step  # noqa: E402
from neuralode.devices import cpu_description  # noqa: E402
from neuralode.solvers import SolverState, Stepper, get_method  # noqa: E402

TOL = 1e-3


def best_ms(call: Callable[[], object], calls: int, blocks: int = 5) -> float:
    """The fastest block's mean time per call: the cost when nothing else disturbs it."""
    for _ in range(3):
        call()
    times = []
    for _ in range(blocks):
        begin = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - begin) / calls)
    return 1e3 * min(times)


def rows_of_state(stepper: Stepper, func, y0: torch.Tensor) -> SolverState:
    rows = y0.shape[0]

    def column(value: float) -> torch.Tensor:
        return torch.full((rows,), value)

    return stepper.init(func, y0, column(0.0), column(1.0), column(1.0), column(TOL), column(TOL))


@torch.no_grad()
def measure(model, stepper: Stepper, rows: int, calls: int, compile_it: bool) -> dict:
    func = model.block.func
    y0 = model.downsample(torch.rand(rows, 1, 28, 28))
    state = rows_of_state(stepper, func, y0)
    stored = func(state.t, state.y)

    def free(t, y):
        return stored

    t = state.t
    figures = {
        "step_ms": best_ms(lambda: stepper.step(func, state), calls),
        "f_ms": 6 * best_ms(lambda: func(t, y0), calls),
        "arithmetic_ms": best_ms(lambda: stepper.step(free, state), calls),
        "join_ms": best_ms(lambda: rows_of_state(stepper, func, y0), calls),
        "join_arithmetic_ms": best_ms(lambda: rows_of_state(stepper, free, y0), calls),
    }
    if compile_it:
        torch._dynamo.reset()
        begin = time.perf_counter()
        compiled = torch.compile(lambda s: masked_step(stepper, func, s), dynamic=False)
        compiled(state)
        figures["compile_s"] = time.perf_counter() - begin
        figures["compiled_step_ms"] = best_ms(lambda: compiled(state), calls)
        eager_next, _ = masked_step(stepper, func, state)
        compiled_next, _ = compiled(state)
        figures["compiled_max_abs_dy"] = float((eager_next.y - compiled_next.y).abs().max())
        torch._dynamo.reset()
        eager_func = torch._dynamo.disable(free)
        arithmetic = torch.compile(lambda s: masked_step(stepper, eager_func, s), dynamic=False)
        arithmetic(state)
        figures["arithmetic_compiled_ms"] = best_ms(lambda: arithmetic(state), calls)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "odenet-mnist.pt")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 13, 16])
    parser.add_argument("--compile-rows", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--calls", type=int, default=50, help="calls per timed block")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch's intra-op threads (the server's default: one per core)"
    )
    parser.add_argument("--name", default="step_cost_cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).model.eval()
    stepper = Stepper(get_method("dopri5"))
    by_rows = {}
    for rows in sorted(set(args.rows) | set(args.compile_rows)):
        by_rows[str(rows)] = figures = measure(model, stepper, rows, args.calls, rows in args.compile_rows)
        share = figures["arithmetic_ms"] / figures["step_ms"]
        line = (
            f"{rows:>4} rows: step {figures['step_ms']:.2f} ms (f {figures['f_ms']:.2f}, arithmetic "
            f"{figures['arithmetic_ms']:.2f} = {share:.0%}); join {figures['join_ms']:.2f} ms "
            f"(arithmetic {figures['join_arithmetic_ms']:.2f})"
        )
        if "compiled_step_ms" in figures:
            line += (
                f"; compiled step {figures['compiled_step_ms']:.2f} ms ({figures['compile_s']:.0f} s to compile, "
                f"max |dy| {figures['compiled_max_abs_dy']:.1e}), arithmetic compiled around an eager f "
                f"{figures['arithmetic_compiled_ms']:.2f} ms"
            )
        print(line)
    figures = {
        "checkpoint": os.path.relpath(args.checkpoint.resolve(), ROOT),
        "method": "dopri5",
        "tol": TOL,
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "by_rows": by_rows,
        "median_arithmetic_share": statistics.median(f["arithmetic_ms"] / f["step_ms"] for f in by_rows.values()),
    }
    write_record(args.out, args.name, "step_cost", f"{cpu_description()}, {torch.get_num_threads()} threads", figures)


if __name__ == "__main__":
    main()
