"""Training and evaluating the MNIST classifiers: ODE-Net, RK-Net, ResNet, MLP."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from neuralode.card import Dataset, Metrics, ModelCard, TableRow, Training
from neuralode.checkpoint import save_checkpoint
from neuralode.models import ODENet, Regularisation
from neuralode.models.registry import build_model, model_spec, specs
from neuralode.precision import computes_natively
from neuralode.solvers import Solution

from .common import (
    Distributed,
    command_line,
    device_name,
    first_step_hyper,
    peak_memory,
    regularisation_from,
    resolve_device,
    seed_everything,
    setup_logging,
)
from .data import ImageSet, batches, epoch_order, load_mnist, to_float
from .state import (
    Position,
    TrainingStateError,
    generator_states,
    load_state,
    position_dict,
    position_from,
    restore_generators,
    save_state,
)

log = logging.getLogger("training")

TABLE_TOLERANCES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
AUGMENTATION = "random crop 28x28 after zero-padding 4"


@dataclass(frozen=True)
class EvalRow:
    tol: float | None
    test_error: float
    nfe_mean: float | None
    nfe_max: int | None
    time_per_1000_s: float

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def classify(
    model: nn.Module, kind: str, images: Tensor, tol: float | None, precision: str = "float32"
) -> tuple[Tensor, Tensor | None]:
    """Logits, and per-image NFE for ODE models (f, the downsampling and the head evaluated in
    ``precision``)."""
    if model_spec(kind).has_ode:
        logits, solution = model(images, rtol=tol, atol=tol, precision=precision)
        return logits, solution.nfe
    return model(images), None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    kind: str,
    data: ImageSet,
    device: torch.device,
    tol: float | None,
    batch_size: int = 1000,
    precision: str = "float32",
) -> EvalRow:
    """Test error, NFE and the median wall time per batch of ``batch_size`` on ``data`` (the
    median: one batch slowed by the rest of the machine does not skew the row)."""
    model.eval()
    errors, nfes, times = 0, [], []
    for start in range(0, len(data), batch_size):
        images = to_float(data.images[start : start + batch_size]).to(device)
        labels = data.labels[start : start + batch_size].to(device)
        _sync(device)
        begin = time.perf_counter()
        logits, nfe = classify(model, kind, images, tol, precision)
        _sync(device)
        times.append((time.perf_counter() - begin) * batch_size / len(labels))
        errors += int((logits.argmax(1) != labels).sum())
        if nfe is not None:
            nfes.append(nfe)
    nfe_all = torch.cat(nfes).double() if nfes else None
    return EvalRow(
        tol=tol,
        test_error=errors / len(data),
        nfe_mean=None if nfe_all is None else float(nfe_all.mean()),
        nfe_max=None if nfe_all is None else int(nfe_all.max()),
        time_per_1000_s=statistics.median(times),
    )


def evaluation_table(model: nn.Module, kind: str, data: ImageSet, device: torch.device) -> list[EvalRow]:
    tols = TABLE_TOLERANCES if model_spec(kind).has_ode else (None,)
    return [evaluate(model, kind, data, device, tol) for tol in tols]


PRECISION_ERROR_MARGIN = 0.0005
"""bfloat16 matches float32 at a tolerance when its test error is at most this much higher
(0.05 points) and its mean NFE at most PRECISION_NFE_MARGIN times float32's."""
PRECISION_NFE_MARGIN = 1.05
"""For every model kind: rounding that reaches the error estimate shows as extra steps first
(on the shipped ODE-Net at tol 1e-4, 35.8 NFE against 32.5)."""


def precision_table(model: nn.Module, kind: str, data: ImageSet, device: torch.device) -> list[dict]:
    """Each table tolerance in float32 and in bfloat16, side by side on the same images, and
    whether bfloat16 matched float32 there: what the server's ``precision=auto`` reads."""
    rows = []
    for tol in TABLE_TOLERANCES:
        exact = evaluate(model, kind, data, device, tol)
        low = evaluate(model, kind, data, device, tol, precision="bfloat16")
        assert low.nfe_mean is not None and exact.nfe_mean is not None  # an ODE classifier counts its NFE
        matches = (
            low.test_error <= exact.test_error + PRECISION_ERROR_MARGIN
            and low.nfe_mean <= PRECISION_NFE_MARGIN * exact.nfe_mean
        )
        rows += [
            {**exact.as_dict(), "precision": "float32"},
            {**low.as_dict(), "precision": "bfloat16", "matches_float32": matches},
        ]
    return rows


def card_metrics(model: nn.Module, kind: str, test_set: ImageSet, device: torch.device, tol: float) -> Metrics:
    """A model card's ``metrics``: the evaluation table, and the error at the training ``tol``
    (the server's default) or the one error of a model without an ODE."""
    table = evaluation_table(model, kind, test_set, device)
    for row in table:
        log.info("eval %s", row.as_dict())
    return Metrics(
        test_error=_row_at(table, tol if model_spec(kind).has_ode else None).test_error,
        table=tuple(TableRow(**row.as_dict()) for row in table),
        eval_device=device_name(device),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hyperparameters(kind: str, args: argparse.Namespace) -> dict:
    spec = model_spec(kind)
    if spec.has_ode:
        return {**spec.hyper, "method": args.method, "tol": args.tol} | first_step_hyper(args)
    return dict(spec.hyper)


class RegularisedForward(nn.Module):
    """ODE-Net's training forward (logits, solution, regulariser integrals) as a module's
    ``forward``, so that DistributedDataParallel sees it and averages its gradients."""

    def __init__(
        self, model: ODENet, regularisation: Regularisation, noise: torch.Generator, precision: str = "float32"
    ) -> None:
        super().__init__()
        self.model, self.regularisation, self.noise, self.precision = model, regularisation, noise, precision

    def forward(self, images: Tensor) -> tuple[Tensor, Solution, Tensor]:
        return self.model.forward_regularised(
            images, self.regularisation, generator=self.noise, precision=self.precision
        )


def train(kind: str, args: argparse.Namespace) -> Path:
    """Train ``kind`` on MNIST, evaluate it on the held-out test set, write a checkpoint.

    Training state goes to ``--state`` (default: beside ``--out``) every ``--state-every``
    seconds, at the end, on SIGINT/SIGTERM and after ``--stop-after`` steps; ``--resume``
    continues from such a file, bit-identically to the run that never stopped."""
    adjoint = _adjoint_choice(kind, args.adjoint)
    regularisation = regularisation_from(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = _precision_choice(getattr(args, "precision", "float32"), device)  # ODE classifiers have the flag
    world = Distributed.from_environment(device)
    device = world.device_for(device)
    if device.type == "cuda":  # TF32 only inside convolutions and matrix products; the solver stays float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    out = Path(args.out)
    # Read from --resume; written to --state when given, else back where it was read from.
    state_path = Path(args.state or args.resume or out.with_suffix(".state.pt"))
    setup_logging(out.with_suffix(".log"), world.is_main, append=args.resume is not None)
    generator = seed_everything(args.seed)

    train_set = load_mnist(args.data_dir, train=True).head(args.train_subset)
    test_set = load_mnist(args.data_dir, train=False).head(args.test_subset)
    hyper = hyperparameters(kind, args)
    model = build_model(kind, hyper).to(device)
    forward: nn.Module = model
    # Hutchinson noise from its own stream: the data order and crops stay those of the
    # unregularised run with the same seed.
    noise = torch.Generator(device=device).manual_seed(args.seed)
    if model_spec(kind).has_ode:
        ode_net = cast(ODENet, model)  # an ODE classifier is an ODENet (RK-Net: without the adjoint)
        ode_net.block.adjoint = adjoint
        forward = RegularisedForward(ode_net, regularisation, noise, precision)
    trained = nn.parallel.DistributedDataParallel(forward) if world.enabled else forward

    steps_per_epoch = len(train_set) // (args.batch_size * world.world_size)
    if steps_per_epoch == 0:
        raise SystemExit("--batch-size is larger than the training set")
    total_steps = args.steps or args.epochs * steps_per_epoch
    optimizer = _optimizer(args, model)
    plan = StepPlan(total_steps, args.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)
    budget = TimeBudget(args.time_budget, device) if args.time_budget else None
    recipe = _recipe(
        kind, hyper, args, adjoint, regularisation, precision, world.world_size, len(train_set), len(test_set)
    )
    generators = {"data": generator, "noise": noise}

    position, order, best, running = Position(), None, None, _Running()
    if args.resume is not None:
        try:
            state = load_state(args.resume, recipe)
        except TrainingStateError as error:
            raise SystemExit(str(error)) from None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict({**state["schedule"], "lr_lambdas": [None]})
        plan.total = int(state["plan_total"])
        if budget is not None:
            budget.step_seconds = state["budget_step_seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        restore_generators(generators, state["rng"]["generators"])
        position, order, best = position_from(state), state["order"], state["best"]
        vars(running).update(state["running"])
        position.sittings += 1
        log.info(
            "resumed from %s: epoch %d, batch %d of %d, step %d of %d, %.0f s trained before (sitting %d)",
            args.resume,
            position.epoch,
            position.batch,
            steps_per_epoch,
            position.step,
            plan.total,
            position.elapsed_s,
            position.sittings,
        )
    log.info(
        "%s: %d parameters, %d training / %d test images, %d steps (%d epochs of %d) at batch %d x %d, tol %g, "
        "adjoint %s, %s, %s, %s",
        kind,
        sum(p.numel() for p in model.parameters()),
        len(train_set),
        len(test_set),
        plan.total,
        math.ceil(plan.total / steps_per_epoch),
        steps_per_epoch,
        args.batch_size,
        world.world_size,
        args.tol,
        adjoint,
        regularisation,
        precision,
        device_name(device),
    )

    def write_state() -> None:
        if not world.is_main:
            return
        position.elapsed_s = previous_elapsed + (time.perf_counter() - begin)
        save_state(
            state_path,
            {
                "recipe": recipe,
                "position": position_dict(position),
                "model": _cpu(model.state_dict()),
                "optimizer": optimizer.state_dict(),
                "schedule": _schedule_state(schedule),
                "plan_total": plan.total,
                "budget_step_seconds": None if budget is None else budget.step_seconds,
                "rng": {"torch": torch.get_rng_state(), "generators": generator_states(generators)},
                "order": order,
                "best": best,
                "running": vars(running),
                "command": command_line(),
            },
        )

    stop = StopRequest()
    previous_elapsed, begin, last_saved = position.elapsed_s, time.perf_counter(), time.perf_counter()
    steps_this_sitting = 0
    images_per_step = args.batch_size * world.world_size
    bar = tqdm(total=plan.total, initial=position.step, disable=not world.is_main, unit="step", dynamic_ncols=True)
    with stop.installed():
        while position.step < plan.total:
            if position.batch == 0:
                position.epoch += 1
                order = epoch_order(train_set, shuffle=not args.no_shuffle, generator=generator)
            epochs = math.ceil(plan.total / steps_per_epoch)
            bar.set_description(f"epoch {position.epoch}/{epochs}")
            model.train()
            epoch_begin = time.perf_counter()
            assert order is not None  # drawn at the first batch of every epoch, or restored with the position
            for images, labels in batches(
                train_set,
                order,
                args.batch_size,
                augment=not args.no_augment,
                generator=generator,
                rank=world.rank,
                world_size=world.world_size,
                first=position.batch,
            ):
                if position.step >= plan.total:
                    break
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                solution = integrals = None
                if model_spec(kind).has_ode:
                    logits, solution, integrals = trained(images)
                else:
                    logits = trained(images)
                loss = nn.functional.cross_entropy(logits, labels)
                if regularisation.active:
                    assert integrals is not None  # regularisers apply to ODE models only
                    loss = loss + regularisation.penalty(integrals)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                position.step += 1
                position.batch += 1
                steps_this_sitting += 1
                running.add(loss, logits, labels, solution, integrals)
                bar.update(1)
                rate = bar.format_dict["rate"]
                postfix = running.postfix() | {"img/s": f"{(rate or 0) * images_per_step:.0f}"}
                if position.history:
                    postfix["test_err"] = f"{position.history[-1]['test_error']:.4f}"
                bar.set_postfix(postfix, refresh=False)
                fitted = budget.fit(position.step, begin) if budget is not None else None
                if fitted is not None and budget is not None:
                    plan.total = world.from_main(min(plan.total, fitted), device)
                    bar.total = plan.total
                    log.info(
                        "time budget %.0f s: %.3f s per step, so %d steps in all",
                        args.time_budget,
                        budget.step_seconds,
                        plan.total,
                    )
                stopping = world.from_main(int(stop.requested or steps_this_sitting == args.stop_after), device)
                if stopping:
                    write_state()
                    bar.close()
                    reason = f"signal {stop.requested}" if stop.requested else f"--stop-after {args.stop_after}"
                    log.info(
                        "stopped (%s) at epoch %d, step %d of %d; continue with: %s --resume %s",
                        reason,
                        position.epoch,
                        position.step,
                        plan.total,
                        _without_resume(),
                        state_path,
                    )
                    world.close()
                    raise SystemExit(128 + stop.requested if stop.requested else 0)
                if args.state_every and time.perf_counter() - last_saved >= args.state_every:
                    write_state()
                    last_saved = time.perf_counter()
            position.batch = 0
            epoch_time = time.perf_counter() - epoch_begin
            if world.is_main:
                last = position.step >= plan.total
                evaluated = ""
                if last or (args.eval_every and position.epoch % args.eval_every == 0):
                    row = evaluate(model, kind, test_set, device, args.tol if model_spec(kind).has_ode else None)
                    evaluated = f"; test error {row.test_error:.4f} ({len(test_set)} images)"
                    position.history.append(
                        {
                            "epoch": position.epoch,
                            "step": position.step,
                            "test_error": row.test_error,
                            "elapsed_s": round(previous_elapsed + time.perf_counter() - begin, 1),
                        }
                    )
                    if best is None or row.test_error < best["test_error"]:
                        best = {
                            "epoch": position.epoch,
                            "test_error": row.test_error,
                            "model": _cpu(model.state_dict()),
                        }
                regularisers = ""
                if regularisation.active:
                    regularisers = f", kinetic {running.kinetic:.4g} jacobian {running.jacobian:.4g} per dimension"
                log.info(
                    "epoch %d: %.1f s, train loss %.4f acc %.4f, NFE forward %.1f backward %.1f%s%s",
                    position.epoch,
                    epoch_time,
                    running.loss,
                    running.accuracy,
                    running.nfe_forward,
                    running.nfe_backward,
                    regularisers,
                    evaluated,
                )
            write_state()
            last_saved = time.perf_counter()
    bar.close()
    duration = previous_elapsed + time.perf_counter() - begin

    path = out
    if world.is_main:
        card = ModelCard(
            kind=kind,
            hyper=hyper,
            task="classify",
            input={"shape": [1, 28, 28], "dtype": "float32", "range": [0.0, 1.0], "classes": 10},
            dataset=Dataset(
                name="MNIST",
                train_images=len(train_set),
                test_images=len(test_set),
                augmentation=None if args.no_augment else AUGMENTATION,
            ),
            training=Training(
                command=command_line(),
                tol=args.tol if model_spec(kind).has_ode else None,
                method=args.method if model_spec(kind).has_ode else None,
                adjoint=adjoint,
                epochs=position.epoch,
                steps=position.step,
                batch_size=args.batch_size,
                world_size=world.world_size,
                preset=args.preset,
                time_budget_s=args.time_budget,
                tf32=args.tf32,
                precision=precision,
                optimizer=args.optimizer,
                lr=args.lr,
                weight_decay=args.weight_decay,
                warmup=args.warmup,
                seed=args.seed,
                device=device_name(device),
                regularisation=regularisation.card() if model_spec(kind).has_ode else None,
                duration_s=round(duration, 1),
                sittings=position.sittings,
                images_per_s=round(position.step * images_per_step / duration, 1),
                peak_memory_mib=peak_memory(device),
                test_error_history=position.history,
            ),
            metrics=card_metrics(model, kind, test_set, device, args.tol),
        )
        save_checkpoint(path, model, card)
        log.info("wrote %s", path)
    world.barrier()
    world.close()
    return path


def _recipe(
    kind: str,
    hyper: dict,
    args: argparse.Namespace,
    adjoint: bool,
    regularisation: Regularisation,
    precision: str,
    world_size: int,
    train_images: int,
    test_images: int,
) -> dict:
    """What decides a run's weights: a state is only continued under the same recipe."""
    return {
        "kind": kind,
        "hyper": hyper,
        "adjoint": adjoint,
        "regularisation": regularisation.card(),
        "precision": precision,
        "batch_size": args.batch_size,
        "world_size": world_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup,
        "epochs": args.epochs,
        "steps": args.steps,
        "time_budget": args.time_budget,
        "seed": args.seed,
        "augment": not args.no_augment,
        "shuffle": not args.no_shuffle,
        "train_images": train_images,
        "test_images": test_images,
    }


def _cpu(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in state_dict.items()}


def _schedule_state(schedule: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """The schedule's counters; its function is rebuilt from the recipe, never stored."""
    return {key: value for key, value in schedule.state_dict().items() if key != "lr_lambdas"}


def _without_resume() -> str:
    """This command line less any ``--resume FILE``, to print what continues the run."""
    words, kept, skip = command_line().split(" "), [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--resume":
            skip = True
        elif not word.startswith("--resume="):
            kept.append(word)
    return " ".join(kept)


class StopRequest:
    """SIGINT/SIGTERM as a request to stop after the current step (and write the state),
    instead of an exception in the middle of a solve."""

    def __init__(self) -> None:
        self.requested = 0

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signum
        log.info("signal %d: stopping after this step, writing the training state", signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _adjoint_choice(kind: str, requested: bool | None) -> bool:
    """ODE-Net trains with the adjoint unless told otherwise; RK-Net is by definition
    backpropagation through the solver; the other kinds have no ODE to adjoint."""
    spec = model_spec(kind)
    if spec.adjoint:
        return True if requested is None else requested
    if requested:
        # an ODE trained by backpropagating through the solver: name the kinds of its task that do
        kin = " or ".join(s.kind for s in specs() if s.task == spec.task and s.adjoint)
        raise SystemExit(
            f"{kind} does not train with the adjoint" + (f" (that is {kin})" if spec.has_ode and kin else "")
        )
    return False


def _precision_choice(precision: str, device: torch.device) -> str:
    """``precision``, refused where it would make training slower instead of faster: bfloat16
    on a device that emulates it (on an AVX2-only CPU the ODE block's convolution took 12x
    longer, docs/server.md)."""
    if not computes_natively(precision, device):
        raise SystemExit(
            f"--precision {precision}: {device_name(device)} has no {precision} units, so it would be emulated "
            "and train several times slower than float32 (docs/training.md, 'Training in bfloat16')"
        )
    return precision


def _row_at(table: list[EvalRow], tol: float | None) -> EvalRow:
    return next((row for row in table if row.tol == tol), table[0])


class StepPlan:
    """Linear warm-up over a fraction ``warmup`` of the steps, then cosine decay to zero, over
    ``total`` steps; ``total`` may be lowered while training (a time budget) and the decay
    then follows the new end."""

    def __init__(self, total: int, warmup: float) -> None:
        self.total, self.warmup = total, warmup

    def factor(self, step: int) -> float:
        warmup_steps = max(1, round(self.warmup * self.total))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, self.total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A fixed-length :class:`StepPlan` as a scheduler."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, StepPlan(total_steps, warmup).factor)


class TimeBudget:
    """Fits the number of training steps to a wall-clock budget: times the steps after
    ``first`` (kernels and allocator warmed up) until ``last`` or a tenth of the budget,
    whichever comes first, then says once how many steps fit in what is left."""

    def __init__(self, seconds: float, device: torch.device, first: int = 5, last: int = 25) -> None:
        self.seconds, self.device, self.first, self.last = seconds, device, first, last
        self.step_seconds: float | None = None
        self._mark: float | None = None

    def fit(self, step: int, began: float) -> int | None:
        if self.step_seconds is not None or step < self.first:
            return None
        _sync(self.device)
        now = time.perf_counter()
        if self._mark is None:
            self._mark = now
            return None
        if step < self.last and now - began < 0.1 * self.seconds:
            return None
        self.step_seconds = (now - self._mark) / (step - self.first)
        left = self.seconds - (now - began)
        return step + max(0, int(left / self.step_seconds))


def _optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


class _Running:
    """Exponential moving averages for the progress bar."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay, self.n = decay, 0
        self.loss = self.accuracy = self.nfe_forward = self.nfe_backward = self.kinetic = self.jacobian = 0.0

    def _mix(self, old: float, new: float) -> float:
        return new if self.n == 1 else self.decay * old + (1 - self.decay) * new

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor, solution, integrals: Tensor | None) -> None:
        self.n += 1
        if integrals is not None:
            kinetic, jacobian = integrals.detach().double().mean(0).tolist()
            self.kinetic, self.jacobian = self._mix(self.kinetic, kinetic), self._mix(self.jacobian, jacobian)
        self.loss = self._mix(self.loss, float(loss.detach()))
        self.accuracy = self._mix(self.accuracy, float((logits.argmax(1) == labels).float().mean()))
        if solution is not None:
            self.nfe_forward = self._mix(self.nfe_forward, float(solution.nfe.double().mean()))
            if solution.backward is not None and solution.backward.nfe is not None:
                self.nfe_backward = self._mix(self.nfe_backward, float(solution.backward.nfe.double().mean()))

    def postfix(self) -> dict:
        return {
            "loss": f"{self.loss:.3f}",
            "acc": f"{self.accuracy:.3f}",
            "nfe_f": f"{self.nfe_forward:.0f}",
            "nfe_b": f"{self.nfe_backward:.0f}",
        }
