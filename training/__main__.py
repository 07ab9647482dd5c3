"""``python -m training …``: train the paper's models and write checkpoints with model cards."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from neuralode.models import CLASSIFY, model_spec, specs
from neuralode.precision import PRECISIONS

from .common import default_data_dir
from .presets import PRESETS


def _common(
    parser: argparse.ArgumentParser, *, epochs: int | None, steps: int | None, batch_size: int, lr: float, out: str
) -> None:
    """Flags every training command has; ``epochs=None``: step-based training, no ``--epochs``."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="dataset folder (torchvision layout; downloaded there when online). Default: %(default)s",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(out), help="checkpoint to write (log next to it). Default: %(default)s"
    )
    if epochs is None:
        parser.add_argument("--steps", type=int, default=steps, help="optimizer steps. Default: %(default)s")
    else:
        parser.add_argument(
            "--epochs", type=int, default=epochs, help="passes over the training set. Default: %(default)s"
        )
        parser.add_argument("--steps", type=int, default=steps, help="optimizer steps; overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="per process. Default: %(default)s")
    parser.add_argument(
        "--lr",
        type=float,
        default=lr,
        help="peak learning rate: linear warm-up to it, then cosine decay to zero. Default: %(default)s",
    )
    parser.add_argument(
        "--tol", type=float, default=1e-3, help="solver rtol = atol during training. Default: %(default)s"
    )
    parser.add_argument("--method", default="dopri5", help="ODE solver. Default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N. Default: %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adjoint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gradients by the adjoint method (default for ODE models that support it)",
    )


def _ode_flags(parser: argparse.ArgumentParser) -> None:
    """What every model with an ODE takes: its regularisers and the first step its solves try."""
    parser.add_argument(
        "--kinetic",
        type=float,
        default=0.0,
        metavar="λ",
        help="weight of the kinetic energy ∫‖f‖² dt (per state dimension) in the loss. Default: %(default)s",
    )
    parser.add_argument(
        "--jacobian",
        type=float,
        default=0.0,
        metavar="λ",
        help="weight of the Jacobian's Frobenius norm ∫‖∂f/∂z‖²_F dt (per state dimension; a Hutchinson "
        "estimate unless the model computes the Jacobian anyway) in the loss. Default: %(default)s",
    )
    parser.add_argument(
        "--first-step",
        type=_first_step,
        default=None,
        metavar="T",
        help=FIRST_STEP_HELP + ", in training and in the checkpoint. Default: rule",
    )


def _classifier(sub, kind: str, help_text: str) -> None:
    parser = sub.add_parser(kind, help=help_text, description=help_text)
    _common(parser, epochs=3, steps=None, batch_size=128, lr=2e-3, out=f"runs/{kind}-mnist.pt")
    if model_spec(kind).has_ode:
        _ode_flags(parser)
        parser.add_argument(
            "--precision",
            choices=list(PRECISIONS),
            default="float32",
            help="what the downsampling, f and the head are evaluated in during training (the weights, "
            "the solver's state and step control stay float32); bfloat16 only where the device computes "
            "it natively (AVX512-BF16 or AMX CPUs, recent GPUs). Default: %(default)s",
        )
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of steps to warm up over")
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--no-augment", action="store_true", help="no random-crop augmentation")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the data order (for reproducibility checks)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training: after a short calibration, the step count (and the learning-rate "
        "schedule) is fitted to the measured step time; --epochs/--steps stay upper bounds",
    )
    parser.add_argument(
        "--eval-every", type=int, default=1, help="evaluate on the test set every N epochs (0: only at the end)"
    )
    parser.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TF32 for convolutions and matrix products on GPUs (solver state and error control stay float32)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice, one per core)"
    )
    resume = parser.add_argument_group("resumable training")
    resume.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="STATE",
        help="continue from this training-state file (same recipe: the flags that decide the weights "
        "must match), bit-identically to the run that never stopped; the state is then kept there "
        "unless --state names another file",
    )
    resume.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="FILE",
        help="where the training state is written. Default: --out with the suffix .state.pt",
    )
    resume.add_argument(
        "--state-every",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="write the training state this often (also after every epoch, at the end and on "
        "SIGINT/SIGTERM; 0: only then). Default: %(default)s",
    )
    resume.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEPS",
        help="stop after this many steps of this sitting, writing the training state (to split a "
        "long run into sittings)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a named recipe filling in the defaults of the flags above; explicit flags win (see training/presets.py)",
    )
    parser.set_defaults(run=lambda args: _train_classifier(kind, args))


def _train_classifier(kind: str, args: argparse.Namespace) -> None:
    from .classifiers import train

    train(kind, args)


def _density(sub, kind: str, help_text: str) -> None:
    parser = sub.add_parser(kind, help=help_text, description=help_text)
    _common(parser, epochs=None, steps=1000, batch_size=512, lr=1e-3, out=f"runs/{kind}.pt")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument(
        "--data",
        help="toy density for maximum likelihood: 8gaussians, moons, circles, checkerboard, pinwheel, 2spirals",
    )
    task.add_argument("--target", help="energy target for reverse KL: U1, U2, U3, U4")
    if model_spec(kind).has_ode:  # the CNF's architecture (a density model with an ODE)
        parser.add_argument("--dynamics", choices=["concatsquash", "planar"], default="concatsquash")
        parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64], help="concatsquash layer widths")
        parser.add_argument("--width", type=int, default=32, help="M, the planar dynamics' width")
        parser.add_argument("--trace", choices=["exact", "hutchinson"], default="exact")
        parser.add_argument("--t1", type=float, default=1.0, help="integration time")
        _ode_flags(parser)
        parser.add_argument(
            "--density-curvature",
            type=float,
            default=0.0,
            metavar="λ",
            help="weight of ∫ (d tr(∂f/∂z)/dt)² dt, how fast the log-density's rate changes along a "
            "trajectory, in the loss: what keeps a regularised CNF from solving in one step. "
            "Default: %(default)s",
        )
        parser.add_argument(
            "--local-error",
            type=float,
            default=0.0,
            metavar="λ",
            help="weight of the solver's scaled error estimate for one step over the whole span, at "
            "--tol (at most 1 where that step is accepted), from both ends (back from the data, "
            "forward from base draws), in the loss: asks for solves that end in their first step; "
            "goes with --first-step at the span. Default: %(default)s",
        )
    else:  # the planar flow's
        parser.add_argument("--layers", type=int, default=8, help="K, the number of planar layers")
    parser.set_defaults(run=lambda args: _train_density(kind, args))


def _train_density(kind: str, args: argparse.Namespace) -> None:
    from .densities import train

    train(kind, args)


def _evaluate(sub) -> None:
    text = (
        "reproduce the seed's Table 1 on a checkpoint: error/likelihood, NFE and time vs tolerance; "
        "given several checkpoints of one dataset, compare them side by side"
    )
    parser = sub.add_parser("evaluate", help=text, description=text)
    parser.add_argument("checkpoints", type=Path, nargs="+", metavar="checkpoint")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument(
        "--first-step",
        type=_first_step,
        default=argparse.SUPPRESS,
        metavar="T",
        help=FIRST_STEP_HELP + ". Default: each checkpoint's own setting",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/eval"),
        help="folder for the JSON and PNG (never checkpoints/, the folder the server serves). Default: %(default)s",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="file name (no suffix) of the JSON and PNG. Default: <checkpoint>-eval, or <a>-vs-<b> for several",
    )
    parser.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import run

    run(args)


def _first_step(value: str) -> float | None:
    if value == "rule":
        return None
    step = float(value)
    if not step > 0:
        raise argparse.ArgumentTypeError(f"a first step must be > 0 (or 'rule'), got {value}")
    return step


FIRST_STEP_HELP = (
    "the step each adaptive solve tries first: a time (the model's integration time, 1 for the "
    "shipped models, tries the whole span: cheap for regularised models, whose solves then mostly "
    "end in one step) or 'rule' for Hairer's rule, which costs one evaluation"
)


def _tune(sub) -> None:
    text = (
        "write a copy of a checkpoint that the server solves with other settings, its card's tables "
        "measured again under them (see docs/training.md)"
    )
    parser = sub.add_parser("tune", help=text, description=text)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(
        "--first-step",
        type=_first_step,
        default=argparse.SUPPRESS,  # absent: keep the card's ('rule' is a value: None)
        metavar="T",
        help=FIRST_STEP_HELP + " (default: the card's)",
    )
    parser.add_argument(
        "--precision-table",
        action="store_true",
        help="measure each table tolerance in float32 and bfloat16 side by side (classifiers): the "
        "server's precision=auto serves bfloat16 where it matched float32 (docs/solvers.md)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the new checkpoint")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="MNIST, for a classifier's table (a CNF's test points are drawn). Default: %(default)s",
    )
    parser.add_argument("--device", default="auto", help="where the table is measured. Default: %(default)s")
    parser.add_argument("--test-subset", type=int, default=None, help="measure on the first N test images")
    parser.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> None:
    from .tune import run

    run(args)


def _card(sub) -> None:
    text = "print a checkpoint's model card (JSON), checked, without loading its model"
    parser = sub.add_parser("card", help=text, description=text)
    parser.add_argument("checkpoint", type=Path)
    parser.set_defaults(run=_print_card, needs_train_extra=False)


def _print_card(args: argparse.Namespace) -> None:
    from neuralode.checkpoint import CheckpointError, read_card

    try:
        card = read_card(args.checkpoint)
    except (OSError, CheckpointError) as error:
        raise SystemExit(str(error)) from None
    print(json.dumps(card.to_dict(), indent=2, sort_keys=True))


TRAIN_EXTRA = ("torchvision", "tqdm", "matplotlib")
"""What ``pip install -e ".[train]"`` adds and every command but ``card`` needs."""


def _require_train_extra(command: str) -> None:
    missing = [name for name in TRAIN_EXTRA if not _importable(name)]
    if missing:
        raise SystemExit(
            f"python -m training {command} needs the 'train' extra ({', '.join(missing)} missing): "
            'pip install -e ".[train]"'
        )


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a ``--preset``'s values as defaults under the explicit flags."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for spec in specs():  # a command per model kind
        (_classifier if spec.task == CLASSIFY else _density)(sub, spec.kind, spec.description)
    _evaluate(sub)
    _tune(sub)
    _card(sub)
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        sub.choices[args.command].set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if getattr(args, "needs_train_extra", True):
        _require_train_extra(args.command)
    try:
        args.run(args)
    except BrokenPipeError:  # output piped into a reader that stopped early (`card … | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


if __name__ == "__main__":
    main()
