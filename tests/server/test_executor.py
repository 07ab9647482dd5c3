"""The executor (the engine's solver-step core) against the models' own in-process solves."""

import torch

from neuralode.models import build_model
from server.adapters import LOG_DENSITY, adapter_for
from server.executor import Executor, Work


def _run(executor: Executor) -> dict[int, tuple[float, int]]:
    results = {}
    while executor.running:
        for report in executor.step():
            for outcome in report.finished:
                results[outcome.item_id] = (outcome.outputs["log_density"].item(), outcome.nfe)
    return results


def test_a_hutchinson_cnf_is_solved_with_its_own_error_norm():
    """The noise columns never change; error control must ignore them, as in-process."""
    torch.manual_seed(0)
    model = build_model("cnf", {"hidden": [16, 16], "trace": "hutchinson", "noise": "gaussian"}).eval()
    points = torch.randn(5, 2) * 2
    with torch.no_grad():
        expected, solution = model.log_prob(points, rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(7))
        executor = Executor(adapter_for(model), torch.device("cpu"))
        executor.join([(i, Work(LOG_DENSITY, row, 1e-5, 1e-5, "dopri5", 10_000, seed=7)) for i, row in enumerate(points)])
        results = _run(executor)
    assert [results[i][1] for i in range(5)] == solution.nfe.tolist()
    torch.testing.assert_close(torch.tensor([results[i][0] for i in range(5)]), expected, rtol=0, atol=1e-5)
