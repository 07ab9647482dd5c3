"""The prepared GPU run, in its CPU smoke mode: a device session is too scarce to find out
there that a flag is wrong or a module cannot be imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

from neuralode.devices import cpu_description

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_inference_script_runs_every_step_and_records_each_figure(mnist_dir, tmp_path):
    env = {
        **os.environ,
        "SMOKE": "1",
        "DEVICE": "cpu",
        "DATA": str(mnist_dir),
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "WHEELS": str(tmp_path / "no-wheels"),
    }
    done = subprocess.run(
        ["bash", "bench/gpu_inference.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "passed" in (tmp_path / "cuda_graphs_test.txt").read_text()

    inference = json.loads((tmp_path / "model_inference_cpu.json").read_text())
    for row in inference["rows"]:
        assert row["ours"]["nfe_mean"] > 0 and row["torchdiffeq"]["nfe"] > 0
        assert row["ours_step_graphs"]["same_nfe_as_ours"] is True, row["ours_step_graphs"]
        assert row["ours_step_graphs"]["max_abs_logit_difference"] < 1e-4
    overhead = json.loads((tmp_path / "solver_overhead_cpu.json").read_text())
    assert [r["batch"] for r in overhead["rows"]] == [1, 50]
    table = json.loads((tmp_path / "odenet-mnist-eval.json").read_text())  # the seed's Table 1
    assert table["test_images"] == 200 and table["device"].startswith(cpu_description())  # not a GPU
    nfe = [row["nfe_mean"] for row in sorted(table["rows"], key=lambda row: row["tol"])]
    assert nfe == sorted(nfe, reverse=True) and all(row["test_error"] < 0.05 for row in table["rows"])
    served = {
        graphs: json.loads((tmp_path / f"step-graphs-{graphs}" / "serve_load_cpu.json").read_text())
        for graphs in ("off", "on")
    }
    for graphs, record in served.items():
        assert record["settings"]["step_graphs"] == graphs
        for workload in record["engine"].values():  # every policy's breakdown, both workloads
            assert set(workload) == {"fair", "max-min", "fifo", "static"}
            for row in workload.values():
                assert 0 < row["engine_overhead_share"] < 1 and row["row_steps_per_s"] > 0, row
    # The smoke run takes the servers' sections once: step_graphs changes the engine's step only.
    assert served["off"]["mixed"]["closed_loop"]["grpc static"]["throughput_items_per_s"] > 0
    assert served["off"]["ceiling"]["row_steps"] > 0 and served["off"]["ceiling"]["step_ceiling"] > 0
    assert "mixed" not in served["on"] and "ceiling" not in served["on"]
