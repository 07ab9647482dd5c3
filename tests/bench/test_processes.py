"""bench/processes.py in one short run: real servers in two layouts, one SDK client spread over
each layout's processes, a record per layout with the figures the docs quote."""

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_processes_bench_spreads_calls_over_every_process_and_records_each_layout(run_bench):
    two = "2x1:keep-freed-memory=off"  # a layout's servers started with a setting of their own
    args = ("--layouts", "1x1", two, "--policies", "fair", "--loads", "one", "--clients", "4")
    recorded = run_bench("processes.py", *args, "--seconds", "1", "--repeats", "1", record="processes_cpu.json")
    layouts = recorded["medians"]["one"]["fair"]
    assert set(layouts) == {"1x1", two}
    for figures in layouts.values():
        assert figures["items_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]
        assert set(figures["p99_ms_by_tol"]) <= {"0.1", "0.001", "1e-05"}
        assert figures["server_page_faults_per_item"] >= 0
    # round_robin reaches both processes of the two-process layout, and the one of the other.
    spread = recorded["items_per_process"]["fair"]
    assert len(spread["1x1"]) == 1 and len(spread[two]) == 2
    assert all(items > 0 for items in spread["1x1"] + spread[two])
    ratio = recorded["ratios"]["one"][f"fair: {two} over 1x1 throughput"]
    assert ratio == round(layouts[two]["items_per_s"] / layouts["1x1"]["items_per_s"], 2)
    assert recorded["command"].startswith("python bench/processes.py") and "cores" in recorded["machine"]


def test_a_layout_names_its_processes_threads_and_server_settings():
    sys.path.insert(0, str(ROOT / "bench"))
    from processes import parse_layout

    assert parse_layout("2x1") == (2, 1, ())
    assert parse_layout("1x2:keep-freed-memory=off:max-batch=64") == (
        1,
        2,
        ("--keep-freed-memory", "off", "--max-batch", "64"),
    )
    with pytest.raises(ValueError, match="a server setting is written name=value, got 'keep-freed-memory'"):
        parse_layout("1x2:keep-freed-memory")


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_sigterm_to_the_bench_stops_the_servers_it_started():
    args = ("--layouts", "2x1", "--policies", "fair", "--loads", "one", "--clients", "2", "--seconds", "1")
    with tempfile.TemporaryDirectory() as out:
        bench = subprocess.Popen(
            [sys.executable, "bench/processes.py", *args, "--repeats", "50", "--out", out],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert bench.stdout is not None
            first_run = bench.stdout.readline()  # printed once its servers answered a run
            assert "fair 2x1" in first_run, first_run
            servers = _children(bench.pid)
            assert len(servers) == 2
            bench.send_signal(signal.SIGTERM)
            bench.wait(timeout=120)
        finally:
            bench.kill()
    assert bench.returncode != 0  # interrupted, not finished
    assert [pid for pid in servers if Path(f"/proc/{pid}").exists()] == []
