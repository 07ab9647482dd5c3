"""bench/processes.py in one short run: real servers in two layouts, one SDK client spread over
each layout's processes, a record per layout with the figures the docs quote."""


def test_the_processes_bench_spreads_calls_over_every_process_and_records_each_layout(run_bench):
    args = ("--layouts", "1x1", "2x1", "--policies", "fair", "--loads", "one", "--clients", "4")
    recorded = run_bench("processes.py", *args, "--seconds", "1", "--repeats", "1", record="processes_cpu.json")
    layouts = recorded["medians"]["one"]["fair"]
    assert set(layouts) == {"1x1", "2x1"}
    for figures in layouts.values():
        assert figures["items_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]
        assert set(figures["p99_ms_by_tol"]) <= {"0.1", "0.001", "1e-05"}
    # round_robin reaches both processes of the two-process layout, and the one of the other.
    spread = recorded["items_per_process"]["fair"]
    assert len(spread["1x1"]) == 1 and len(spread["2x1"]) == 2
    assert all(items > 0 for items in spread["1x1"] + spread["2x1"])
    ratio = recorded["ratios"]["one"]["fair: 2x1 over 1x1 throughput"]
    assert ratio == round(layouts["2x1"]["items_per_s"] / layouts["1x1"]["items_per_s"], 2)
    assert recorded["command"].startswith("python bench/processes.py") and "cores" in recorded["machine"]
