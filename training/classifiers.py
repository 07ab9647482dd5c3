"""Training and evaluating the MNIST classifiers: ODE-Net, RK-Net, ResNet, MLP."""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from neuralode.checkpoint import save_checkpoint
from neuralode.models import ODENet, Regularisation
from neuralode.models.registry import ODE_CLASSIFIERS, build_model
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
from .data import ImageSet, batches, load_mnist, to_float

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


def classify(model: nn.Module, kind: str, images: Tensor, tol: float | None) -> tuple[Tensor, Tensor | None]:
    """Logits, and per-image NFE for ODE models."""
    if kind in ODE_CLASSIFIERS:
        logits, solution = model(images, rtol=tol, atol=tol)
        return logits, solution.nfe
    return model(images), None


@torch.no_grad()
def evaluate(
    model: nn.Module, kind: str, data: ImageSet, device: torch.device, tol: float | None, batch_size: int = 1000
) -> EvalRow:
    """Test error, NFE and mean wall time per batch of ``batch_size`` on ``data``."""
    model.eval()
    errors, nfes, times = 0, [], []
    for start in range(0, len(data), batch_size):
        images = to_float(data.images[start : start + batch_size]).to(device)
        labels = data.labels[start : start + batch_size].to(device)
        _sync(device)
        begin = time.perf_counter()
        logits, nfe = classify(model, kind, images, tol)
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
        time_per_1000_s=sum(times) / len(times),
    )


def evaluation_table(model: nn.Module, kind: str, data: ImageSet, device: torch.device) -> list[EvalRow]:
    tols = TABLE_TOLERANCES if kind in ODE_CLASSIFIERS else (None,)
    return [evaluate(model, kind, data, device, tol) for tol in tols]


def card_metrics(model: nn.Module, kind: str, test_set: ImageSet, device: torch.device, tol: float) -> dict:
    """A model card's ``metrics``: the evaluation table, and the error at the training ``tol``
    (the server's default) or the one error of a model without an ODE."""
    table = evaluation_table(model, kind, test_set, device)
    for row in table:
        log.info("eval %s", row.as_dict())
    return {
        "test_error": _row_at(table, tol if kind in ODE_CLASSIFIERS else None).test_error,
        "table": [row.as_dict() for row in table],
        "eval_device": device_name(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hyperparameters(kind: str, args: argparse.Namespace) -> dict:
    if kind in ODE_CLASSIFIERS:
        return {"channels": 64, "method": args.method, "tol": args.tol} | first_step_hyper(args)
    return {}


class RegularisedForward(nn.Module):
    """ODE-Net's training forward (logits, solution, regulariser integrals) as a module's
    ``forward``, so that DistributedDataParallel sees it and averages its gradients."""

    def __init__(self, model: ODENet, regularisation: Regularisation, noise: torch.Generator) -> None:
        super().__init__()
        self.model, self.regularisation, self.noise = model, regularisation, noise

    def forward(self, images: Tensor) -> tuple[Tensor, Solution, Tensor]:
        return self.model.forward_regularised(images, self.regularisation, generator=self.noise)


def train(kind: str, args: argparse.Namespace) -> Path:
    """Train ``kind`` on MNIST, evaluate it on the held-out test set, write a checkpoint."""
    adjoint = _adjoint_choice(kind, args.adjoint)
    regularisation = regularisation_from(args)
    device = resolve_device(args.device)
    world = Distributed.from_environment(device)
    device = world.device_for(device)
    if device.type == "cuda":  # TF32 only inside convolutions and matrix products; the solver stays float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    out = Path(args.out)
    setup_logging(out.with_suffix(".log"), world.is_main)
    generator = seed_everything(args.seed)

    train_set = load_mnist(args.data_dir, train=True).head(args.train_subset)
    test_set = load_mnist(args.data_dir, train=False).head(args.test_subset)
    hyper = hyperparameters(kind, args)
    model = build_model(kind, hyper).to(device)
    forward: nn.Module = model
    if kind in ODE_CLASSIFIERS:
        model.block.adjoint = adjoint
        # Hutchinson noise from its own stream: the data order and crops stay those of the
        # unregularised run with the same seed.
        forward = RegularisedForward(model, regularisation, torch.Generator(device=device).manual_seed(args.seed))
    trained = nn.parallel.DistributedDataParallel(forward) if world.enabled else forward

    steps_per_epoch = len(train_set) // (args.batch_size * world.world_size)
    if steps_per_epoch == 0:
        raise SystemExit("--batch-size is larger than the training set")
    total_steps = args.steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = _optimizer(args, model)
    plan = StepPlan(total_steps, args.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)
    budget = TimeBudget(args.time_budget, device) if args.time_budget else None
    log.info(
        "%s: %d parameters, %d training / %d test images, %d steps (%d epochs of %d) at batch %d x %d, tol %g, "
        "adjoint %s, %s, %s",
        kind, sum(p.numel() for p in model.parameters()), len(train_set), len(test_set), total_steps, epochs,
        steps_per_epoch, args.batch_size, world.world_size, args.tol, adjoint, regularisation, device_name(device),
    )  # fmt: skip

    step, epoch, begin = 0, 0, time.perf_counter()
    while step < plan.total:
        epoch += 1
        model.train()
        epoch_begin = time.perf_counter()
        running = _Running()
        bar = tqdm(total=min(steps_per_epoch, plan.total - step), desc=f"epoch {epoch}", disable=not world.is_main)
        for images, labels in batches(
            train_set, args.batch_size, shuffle=not args.no_shuffle, augment=not args.no_augment, generator=generator,
            rank=world.rank, world_size=world.world_size,
        ):  # fmt: skip
            if step >= plan.total:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            solution = integrals = None
            if kind in ODE_CLASSIFIERS:
                logits, solution, integrals = trained(images)
            else:
                logits = trained(images)
            loss = nn.functional.cross_entropy(logits, labels)
            if regularisation.active:
                loss = loss + regularisation.penalty(integrals)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running.add(loss, logits, labels, solution, integrals)
            bar.update(1)
            bar.set_postfix(running.postfix(), refresh=False)
            fitted = budget.fit(step, begin) if budget is not None else None
            if fitted is not None:
                plan.total = world.from_main(min(plan.total, fitted), device)
                bar.total = min(steps_per_epoch, plan.total - step + bar.n)
                log.info(
                    "time budget %.0f s: %.3f s per step, so %d steps in all",
                    args.time_budget,
                    budget.step_seconds,
                    plan.total,
                )
        bar.close()
        epoch_time = time.perf_counter() - epoch_begin
        if world.is_main:
            last = step >= plan.total
            evaluated = ""
            if last or (args.eval_every and epoch % args.eval_every == 0):
                row = evaluate(model, kind, test_set, device, args.tol if kind in ODE_CLASSIFIERS else None)
                evaluated = f"; test error {row.test_error:.4f} ({len(test_set)} images)"
            regularisers = ""
            if regularisation.active:
                regularisers = f", kinetic {running.kinetic:.4g} jacobian {running.jacobian:.4g} per dimension"
            log.info(
                "epoch %d: %.1f s, train loss %.4f acc %.4f, NFE forward %.1f backward %.1f%s%s",
                epoch, epoch_time, running.loss, running.accuracy, running.nfe_forward, running.nfe_backward,
                regularisers, evaluated,
            )  # fmt: skip
    duration = time.perf_counter() - begin

    path = out
    if world.is_main:
        card = {
            "kind": kind,
            "hyper": hyper,
            "task": "classify",
            "input": {"shape": [1, 28, 28], "dtype": "float32", "range": [0.0, 1.0], "classes": 10},
            "dataset": {"name": "MNIST", "train_images": len(train_set), "test_images": len(test_set),
                        "augmentation": None if args.no_augment else AUGMENTATION},
            "training": {
                "command": command_line(), "tol": args.tol if kind in ODE_CLASSIFIERS else None,
                "method": args.method if kind in ODE_CLASSIFIERS else None, "adjoint": adjoint,
                "epochs": epoch, "steps": step, "batch_size": args.batch_size, "world_size": world.world_size,
                "preset": args.preset, "time_budget_s": args.time_budget, "tf32": args.tf32,
                "optimizer": args.optimizer, "lr": args.lr, "seed": args.seed, "device": device_name(device),
                "regularisation": regularisation.card() if kind in ODE_CLASSIFIERS else None,
                "duration_s": round(duration, 1), "images_per_s": round(step * args.batch_size * world.world_size / duration, 1),
                "peak_memory_mib": peak_memory(device),
            },
            "metrics": card_metrics(model, kind, test_set, device, args.tol),
        }  # fmt: skip
        save_checkpoint(path, model, card)
        log.info("wrote %s", path)
    world.barrier()
    world.close()
    return path


def _adjoint_choice(kind: str, requested: bool | None) -> bool:
    """ODE-Net trains with the adjoint unless told otherwise; RK-Net is by definition
    backpropagation through the solver; the other kinds have no ODE to adjoint."""
    if kind == "odenet":
        return True if requested is None else requested
    if requested:
        raise SystemExit(f"{kind} does not train with the adjoint" + (" (that is odenet)" if kind == "rknet" else ""))
    return False


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
        return {"loss": f"{self.loss:.3f}", "acc": f"{self.accuracy:.3f}", "nfe_f": f"{self.nfe_forward:.0f}",
                "nfe_b": f"{self.nfe_backward:.0f}"}  # fmt: skip
