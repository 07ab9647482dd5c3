"""bench/step_cost.py in a few calls: a step's cost split into f and the solver's arithmetic
for the shipped ODE-Net, recorded per number of rows (compiling is left to the bench itself:
it takes about 20 s a size here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_step_cost_bench_splits_a_step_into_f_and_arithmetic(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/step_cost.py", "--rows", "1", "3", "--compile-rows", "--calls", "2", "--threads", "1"]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    recorded = json.loads((tmp_path / "step_cost_cpu.json").read_text())
    assert set(recorded["by_rows"]) == {"1", "3"}
    for figures in recorded["by_rows"].values():
        # A step is its six evaluations of f and the arithmetic around them, so each is less than it.
        assert 0 < figures["arithmetic_ms"] < figures["step_ms"] and 0 < figures["f_ms"]
        assert figures["join_arithmetic_ms"] < figures["join_ms"]
        assert "compiled_step_ms" not in figures
    assert recorded["checkpoint"] == "checkpoints/odenet-mnist.pt" and "threads" in recorded["machine"]
