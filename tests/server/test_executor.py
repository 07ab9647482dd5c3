"""The executor (the engine's solver-step core): plans applied to real rows of solver state.

Parking is exact: a parked row is kept untouched and resumes where it stopped, so a preempted
solve ends bit-identical to one that never was, with the same NFE."""

from __future__ import annotations

import torch
from live_server import CLASSIFIER

from neuralode.checkpoint import load_checkpoint
from neuralode.models import build_model
from neuralode.solvers import Status
from server.adapters import Adapter, Limits, Start, adapter_for
from server.api import Kind
from server.executor import Executor, Work, first_step_of, step_cost
from server.scheduling import Item, Plan, Scheduler, SchedulerConfig


class ElementwiseAdapter(Adapter):
    """dy/dt = sin(t·y) − y³ per element: rows never interact, whatever the batch."""

    task = "test"

    def dynamics(self, t, y):
        return torch.sin(t[:, None] * y) - y**3

    def start(self, kind, inputs):
        t0 = torch.zeros(len(inputs), dtype=inputs.dtype)
        return Start(inputs, t0, t0 + 3.0)

    def finish(self, kind, y1):
        return {"y": y1}


def _items(works: list[Work]) -> list[Item]:
    return Scheduler(SchedulerConfig(max_batch=1, max_queued=10_000)).submit(works, cost=step_cost("dopri5")).items


def _run(executor: Executor, plan: Plan, until: set[int] | None = None, steps: int | None = None) -> dict[int, object]:
    """Apply ``plan``, then step until the items ``until`` finished (or ``steps`` steps)."""
    outcomes = {}
    taken = 0
    while True:
        outputs = executor.step(plan)
        plan = Plan()
        outcomes.update(outputs.finished)
        taken += 1
        if (until is not None and until <= outcomes.keys()) or taken == steps or not executor.running:
            return outcomes


def test_a_parked_row_resumes_bit_identically_among_other_rows():
    tolerances = (1e-3, 1e-6, 1e-9)
    works = [
        Work(Kind.CLASSIFY, torch.tensor([0.5, -1.2, 2.0]) * (i + 1), tol, tol, "dopri5", 100_000)
        for i, tol in enumerate(tolerances)
    ]
    plain = Executor(ElementwiseAdapter(), torch.device("cpu"))
    items = _items(works)
    finished = _run(plain, Plan(join=items), until={i.id for i in items})
    expected = [finished[i.id] for i in items]  # in the works' order, not the order they finished

    preempting = Executor(ElementwiseAdapter(), torch.device("cpu"))
    items = _items(works)
    parked = items[1]
    _run(preempting, Plan(join=items), steps=3)
    outcomes = _run(preempting, Plan(park=[parked]), steps=5)
    assert parked.id in preempting.parked and parked.id not in outcomes
    outcomes.update(_run(preempting, Plan(resume=[parked]), until={i.id for i in items} - outcomes.keys()))
    for before, after in zip(expected, (outcomes[i.id] for i in items)):
        assert after.status is Status.SUCCESS and after.nfe == before.nfe
        assert torch.equal(after.outputs["y"], before.outputs["y"])


def test_step_graphs_give_every_item_the_same_solve_through_joins_parks_and_leaves():
    """The GPU engine's path (masked steps per padded batch size), run eagerly: items joining
    and leaving between steps, one parked and resumed, each ends as under the plain executor."""
    tolerances = (1e-2, 1e-4, 1e-6, 1e-8, 1e-3)
    works = [
        Work(Kind.CLASSIFY, torch.tensor([0.5, -1.2, 2.0]) * (i + 1), tol, tol, "dopri5", 100_000)
        for i, tol in enumerate(tolerances)
    ]
    runs = []
    for step_graphs in (False, True):
        executor = Executor(ElementwiseAdapter(), torch.device("cpu"), step_graphs=step_graphs)
        items = _items(works)
        outcomes = _run(executor, Plan(join=items[:3]), steps=2)
        outcomes.update(_run(executor, Plan(join=items[3:], park=[items[1]]), steps=4))
        outcomes.update(_run(executor, Plan(resume=[items[1]]), until={i.id for i in items}))
        runs.append([outcomes[i.id] for i in items])
    for plain, graphed in zip(*runs):
        assert graphed.status is plain.status is Status.SUCCESS and graphed.nfe == plain.nfe
        torch.testing.assert_close(graphed.outputs["y"], plain.outputs["y"], rtol=1e-5, atol=1e-6)


def test_a_preempted_odenet_item_equals_its_unpreempted_solve_bit_for_bit(shipped):
    """The shipped ODE-Net, one row in the batch at each step in both runs."""
    adapter = adapter_for(load_checkpoint(shipped / f"{CLASSIFIER}.pt").model)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    work, other = (Work(Kind.CLASSIFY, image, 1e-5, 1e-5, "dopri5", 10_000) for image in images)

    alone = Executor(adapter, torch.device("cpu"))
    item = _items([work])[0]
    expected = _run(alone, Plan(join=[item]), until={item.id})[item.id]

    executor = Executor(adapter, torch.device("cpu"))
    item, intruder = _items([work])[0], _items([other])[0]
    _run(executor, Plan(join=[item]), steps=4)
    _run(executor, Plan(park=[item], join=[intruder]), until={intruder.id})
    assert executor.running == 0 and list(executor.parked) == [item.id]
    outcome = _run(executor, Plan(resume=[item]), until={item.id})[item.id]
    assert outcome.nfe == expected.nfe > 20
    assert torch.equal(outcome.outputs["probabilities"], expected.outputs["probabilities"])


def test_dropping_discards_running_and_parked_rows():
    executor = Executor(ElementwiseAdapter(), torch.device("cpu"))
    items = _items([Work(Kind.CLASSIFY, torch.ones(3) * i, 1e-9, 1e-9, "dopri5", 100_000) for i in range(1, 5)])
    executor.step(Plan(join=items))
    executor.step(Plan(park=items[:1]))
    executor.step(Plan(drop=items[:2]))
    assert not executor.parked and executor.running == 2
    assert set(executor.groups["dopri5", "float32"].ids) == {items[2].id, items[3].id}


def test_an_item_whose_start_already_ends_it_leaves_at_once():
    """max_nfe too small to start: the item ends at its start, with NaN outputs."""
    executor = Executor(ElementwiseAdapter(), torch.device("cpu"))
    starved, fine = _items(
        [
            Work(Kind.CLASSIFY, torch.ones(3), 1e-3, 1e-3, "dopri5", 1),
            Work(Kind.CLASSIFY, torch.ones(3), 1e-3, 1e-3, "dopri5", 10_000),
        ]
    )
    outputs = executor.step(Plan(join=[starved, fine]))
    assert starved.id in outputs.finished and outputs.finished[starved.id].status is Status.MAX_NFE
    assert torch.isnan(outputs.finished[starved.id].outputs["y"]).all()
    assert executor.groups["dopri5", "float32"].ids == [fine.id]


def test_a_hutchinson_cnf_is_solved_with_its_own_error_norm():
    """The noise columns never change; error control must ignore them, as in-process."""
    torch.manual_seed(0)
    model = build_model("cnf", {"hidden": [16, 16], "trace": "hutchinson", "noise": "gaussian"}).eval()
    points = torch.randn(5, 2) * 2
    adapter = adapter_for(model)
    with torch.no_grad():
        expected, solution = model.log_prob(points, rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(0))
        rows = adapter.prepare(Kind.LOG_DENSITY, {"points": points.numpy()}, Limits(max_items=10, max_abs_input=1e6))
        executor = Executor(adapter, torch.device("cpu"))
        items = _items([Work(Kind.LOG_DENSITY, row, 1e-5, 1e-5, "dopri5", 10_000) for row in rows])
        results = _run(executor, Plan(join=items), until={i.id for i in items})
    assert [results[i.id].nfe for i in items] == solution.nfe.tolist()
    torch.testing.assert_close(
        torch.stack([results[i.id].outputs["log_density"] for i in items]), expected, rtol=0, atol=1e-5
    )


def test_a_model_with_a_first_step_is_served_as_it_solves_in_process(shipped):
    """The shipped ODE-Net given ``first_step=1`` (as ``training tune`` writes it): the
    engine's items take the model's own solves, and starting one costs one evaluation, not
    Hairer's two."""
    model = load_checkpoint(shipped / f"{CLASSIFIER}.pt", overrides={"first_step": 1.0}).model
    adapter = adapter_for(model)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    tolerances = (1e-1, 1e-3, 1e-5)
    with torch.no_grad():
        solutions = [model(image[None], rtol=tol, atol=tol) for image, tol in zip(images, tolerances)]
    executor = Executor(adapter, torch.device("cpu"))
    items = _items([Work(Kind.CLASSIFY, image, tol, tol, "dopri5", 10_000) for image, tol in zip(images, tolerances)])
    results = _run(executor, Plan(join=items), until={i.id for i in items})
    for item, (logits, solution) in zip(items, solutions):
        assert results[item.id].nfe == int(solution.nfe[0])
        torch.testing.assert_close(
            results[item.id].outputs["probabilities"], torch.softmax(logits[0], 0), rtol=0, atol=1e-6
        )
    assert results[items[0].id].nfe == 7  # one step over the whole span at tol 0.1
    assert step_cost("dopri5", first_step_of(adapter, "dopri5")).start == 1
    assert step_cost("dopri5").start == 2 and first_step_of(adapter, "rk4") is None
