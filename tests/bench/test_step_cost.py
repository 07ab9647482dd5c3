"""bench/step_cost.py in a few calls: a step's cost split into f and the solver's arithmetic
for the shipped ODE-Net, recorded per number of rows (compiling is left to the bench itself:
it takes about 20 s a size here)."""


def test_the_step_cost_bench_splits_a_step_into_f_and_arithmetic(run_bench):
    args = ("--rows", "1", "3", "--compile-rows", "--calls", "2", "--threads", "1")
    recorded = run_bench("step_cost.py", *args, record="step_cost_cpu.json")
    assert set(recorded["by_rows"]) == {"1", "3"}
    for figures in recorded["by_rows"].values():
        # A step is its six evaluations of f and the arithmetic around them, so each is less than it.
        assert 0 < figures["arithmetic_ms"] < figures["step_ms"] and 0 < figures["f_ms"]
        assert figures["join_arithmetic_ms"] < figures["join_ms"]
        assert "compiled_step_ms" not in figures
    assert recorded["checkpoint"] == "checkpoints/odenet-mnist.pt" and "threads" in recorded["machine"]
