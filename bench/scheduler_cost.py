"""The scheduler's own cost per solver step as the queue grows: ``schedule`` and ``update`` of
one model's scheduler, every policy, with 16 to 4,000 one-item requests queued and the batch full,
driven by a fake executor (no torch: the steps themselves cost nothing here). A step of the
shipped ODE-Net's full batch takes about 100 ms on this CPU (``bench/serve_load.py`` section 5:
10 steps a second at 245 rows), so what the scheduler adds per step should stay far below that
however long the queue.

    python bench/scheduler_cost.py [--steps 200] [--name scheduler_cost]

Writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from records import write_record  # noqa: E402

from neuralode.devices import cpu_description  # noqa: E402
from server.scheduling import POLICIES, Cost, Scheduler, SchedulerConfig, State, StepOutputs  # noqa: E402

COST = Cost(start=2, step=6, expected=30.0)
FINISHING = 5  # one running item in five finishes at each step


def per_step_ms(policy: str, queued: int, steps: int, max_batch: int) -> float:
    """Median wall time of ``schedule`` + ``update`` while ``queued`` requests wait (each step's
    finished items are replaced by new requests, so the queue stays that long)."""
    scheduler = Scheduler(SchedulerConfig(max_batch=max_batch, max_queued=queued + 2 * max_batch, policy=policy))
    running: dict[int, object] = {}  # item id -> item, as the executor would hold them
    for index in range(queued + max_batch):
        scheduler.submit([index], cost=COST)
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        plan = scheduler.schedule()
        scheduled = time.perf_counter() - begin
        for item in plan.drop + plan.park:
            running.pop(item.id, None)
        for item in plan.join + plan.resume:
            running[item.id] = item
        done = list(running)[: max(1, len(running) // FINISHING)] if plan.steps else []
        outputs = StepOutputs(
            nfe={i: item.nfe + COST.step for i, item in running.items()}, finished={i: None for i in done}
        )
        for item_id in done:
            del running[item_id]
        begin = time.perf_counter()
        scheduler.update(outputs)
        times.append(scheduled + time.perf_counter() - begin)
        for index in range(len(done)):
            scheduler.submit([index], cost=COST)
        if plan.steps:
            assert all(item.state is State.RUNNING for item in running.values())
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--queued", type=int, nargs="+", default=[16, 256, 1024, 4000])
    parser.add_argument("--name", default="scheduler_cost")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    policies = [p for p in POLICIES if p != "static"]  # static schedules only between whole batches
    rows = {p: {str(n): per_step_ms(p, n, args.steps, args.max_batch) for n in args.queued} for p in policies}
    print(f"ms per step of schedule + update, batch of {args.max_batch} full, by requests queued")
    print(f"  {'policy':<8}" + "".join(f"{n:>9}" for n in args.queued))
    for policy, row in rows.items():
        print(f"  {policy:<8}" + "".join(f"{ms:>9.2f}" for ms in row.values()))
    machine = f"{cpu_description()}, Python {platform.python_version()}"
    write_record(
        args.out, args.name, "scheduler_cost", machine, {"max_batch": args.max_batch, "ms_per_step_by_queued": rows}
    )


if __name__ == "__main__":
    main()
