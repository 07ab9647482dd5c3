"""bench/scheduler_cost.py in a few steps: it drives every continuous policy with a full batch
and a queue of the sizes asked for, and records a time per step for each."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_scheduler_cost_bench_records_each_policy_at_each_queue_length(run_bench):
    recorded = run_bench("scheduler_cost.py", "--steps", "5", "--queued", "16", "300", record="scheduler_cost.json")
    assert set(recorded["ms_per_step_by_queued"]) == {"fair", "fifo"}
    for row in recorded["ms_per_step_by_queued"].values():
        assert set(row) == {"16", "300"} and all(ms > 0 for ms in row.values())
    assert recorded["command"].startswith("python bench/scheduler_cost.py") and str(ROOT) not in recorded["command"]
