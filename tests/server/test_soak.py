"""The short version of ``bench/soak.py``: many clients, mixed RPCs and tolerances against a
real server; no request lost, every response equal to the in-process reference."""

import importlib.util
import sys

from live_server import ROOT


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_concurrent_mixed_load_loses_nothing_and_answers_correctly(server, shipped, mnist_dir):
    soak = _soak_module()
    pool = soak.build_pool(shipped, mnist_dir, size=12, seed=1)
    summary = soak.run_load(server.target, pool, clients=16, requests=400, duration=0.0, seed=1)
    assert summary["requests"] >= 400
    assert summary["lost"] == 0, summary["lost_by_code"]
    assert summary["wrong"] == 0, summary["wrong_examples"]
    assert set(summary["by_rpc"]) == {"classify", "sample", "log_density"}
    assert summary["exact_fraction"] > 0.5  # most items still match bit for bit (to 1e-5)
