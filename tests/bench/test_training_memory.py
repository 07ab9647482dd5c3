"""bench/training_memory.py on a few real digits: what a training step saves for backward stays
the same with the adjoint however many evaluations the solve takes, and grows with them when
backpropagating through the solver (the paper's O(1) against O(L̃))."""


def test_the_adjoint_saves_the_same_memory_at_any_tolerance_and_backprop_more_with_more_steps(run_bench, mnist_dir):
    args = ("--batch", "8", "--tolerances", "1e-1", "1e-5", "--data-dir", str(mnist_dir))
    rows = run_bench("training_memory.py", *args, record="training_memory.json", threads=1)["rows"]
    adjoint = [row for row in rows if row["mode"].startswith("odenet")]
    backprop = [row for row in rows if row["mode"].startswith("rknet")]
    loose, tight = backprop
    assert tight["nfe_forward"] > 2 * loose["nfe_forward"]  # tol 1e-5 takes many more evaluations
    assert adjoint[0]["saved_mib"] == adjoint[1]["saved_mib"]
    assert all(row["nfe_backward"] > 0 for row in adjoint) and all(row["nfe_backward"] is None for row in backprop)
    assert loose["saved_mib"] > adjoint[0]["saved_mib"]
    # Every further evaluation stores its activations: memory grows about in step with NFE.
    growth = (tight["saved_mib"] - loose["saved_mib"]) / (tight["nfe_forward"] - loose["nfe_forward"])
    assert growth > 0.25 * loose["saved_mib"] / loose["nfe_forward"]
