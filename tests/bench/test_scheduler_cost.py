"""bench/scheduler_cost.py in a few steps: it drives every continuous policy with a full batch
and a queue of the sizes asked for, and records a time per step for each."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_scheduler_cost_bench_records_each_policy_at_each_queue_length(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/scheduler_cost.py", "--steps", "5", "--queued", "16", "300", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    recorded = json.loads((tmp_path / "scheduler_cost.json").read_text())
    assert set(recorded["ms_per_step_by_queued"]) == {"fair", "fifo"}
    for row in recorded["ms_per_step_by_queued"].values():
        assert set(row) == {"16", "300"} and all(ms > 0 for ms in row.values())
    assert recorded["command"].startswith("python bench/scheduler_cost.py") and str(ROOT) not in recorded["command"]
