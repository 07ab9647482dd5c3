"""``python -m client``: classify images, sample, evaluate log-densities, list models.

python -m client classify --model odenet-mnist --tol 1e-2 digit.png
python -m client sample --model cnf-8gaussians --n 5 --seed 1 --tol 1e-3
python -m client log-density --model cnf-8gaussians -- 0,0 -1.5,2    ("--" before points with a leading minus)
python -m client models
python -m client health [--service NAME]          (exit status 0 only when SERVING: a container health check)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import TLS, Client, OdeServeError, RequestOptions
from ._calls import options_of

REQUEST_OPTIONS = options_of(RequestOptions)


class UsageError(Exception):
    """Something the command line was given cannot be used: one line on stderr, exit status 2."""


def _load_image(path: Path) -> np.ndarray:
    """Any image Pillow reads as a [28, 28] uint8 array: converted to grayscale (colour and
    alpha dropped), resized with Lanczos when it is not 28x28."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UsageError("reading image files needs Pillow: pip install 'odeserve-client[cli]' (or pillow)") from None
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
    except UnidentifiedImageError:
        raise UsageError(f"{path}: not an image file Pillow can read (PNG, JPEG, BMP, ...)") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise UsageError(f"{path}: {getattr(error, 'strerror', None) or error}") from None
    if gray.size != (28, 28):
        gray = gray.resize((28, 28), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


def _point(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is comma-separated numbers, got {text!r}") from None


def _request_options(parser: argparse.ArgumentParser) -> None:
    """--model and a flag per request option (--tol, --max-nfe, ...)."""
    parser.add_argument("--model", required=True, help="a served model's name (see: models)")
    for option in REQUEST_OPTIONS:
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=_parsing(option), help=option.help)


def _parsing(option) -> Callable[[str], object]:
    """The option's parser, whose refusal says what was expected (not "invalid _tolerance value")."""
    parse = option.cli_type

    def parsed(text: str) -> object:
        try:
            return parse(text)
        except ValueError as error:
            if option.parser is not None:  # its message says what it expects
                raise argparse.ArgumentTypeError(str(error)) from None
            expected = "an integer" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"{expected}; got {text!r}") from None

    parsed.__name__ = option.name  # argparse names a type by it in other messages
    return parsed


def _request_kwargs(args: argparse.Namespace) -> dict:
    return {"model": args.model, **{option.name: getattr(args, option.name) for option in REQUEST_OPTIONS}}


def _items(result) -> dict:
    solved = result.solved
    return {
        "nfe": result.items.nfe.tolist(),
        "status": result.items.status,
        "queue_seconds": result.timing.queue_seconds,
        "compute_seconds": result.timing.compute_seconds,
        "solved": {
            "rtol": solved.rtol,
            "atol": solved.atol,
            "method": solved.method,
            "precision": solved.precision,
            "preemptions": solved.preemptions,
        },
    }


def run(args: argparse.Namespace, client: Client) -> dict:
    if args.command == "classify":
        images = np.stack([_load_image(p) for p in args.images])
        result = client.classify(images, **_request_kwargs(args))
        rows = [
            {"image": str(p), "label": int(label), "probability": float(probs.max()), "nfe": int(nfe), "status": status}
            for p, label, probs, nfe, status in zip(
                args.images, result.labels, result.probabilities, result.items.nfe, result.items.status
            )
        ]
        return {"predictions": rows, **_items(result)}
    if args.command == "sample":
        sampled = client.sample(args.n, seed=args.seed, **_request_kwargs(args))
        return {"points": sampled.points.tolist(), "log_density": sampled.log_density.tolist(), **_items(sampled)}
    if args.command == "log-density":
        density = client.log_density(np.asarray(args.points, dtype=np.float32), **_request_kwargs(args))
        return {"points": args.points, "log_density": density.log_density.tolist(), **_items(density)}
    if args.command == "health":
        return {"service": args.service, "status": client.health(args.service)}
    return {
        "models": [
            {
                "name": m.name,
                "version": m.version,
                "kind": m.kind,
                "task": m.task,
                "default_tol": m.default_tol,
                "device": m.device,
                "test_error": m.card.get("metrics", {}).get("test_error"),
            }
            for m in client.models()
        ]
    }


def render(command: str, report: dict) -> str:
    lines = []
    if command == "classify":
        lines.append(f"{'image':<30} {'label':>5} {'prob':>6} {'NFE':>5} status")
        for row in report["predictions"]:
            lines.append(
                f"{row['image']:<30} {row['label']:>5} {row['probability']:>6.3f} {row['nfe']:>5} {row['status']}"
            )
    elif command in ("sample", "log-density"):
        points = report["points"]
        lines.append(f"{'point':<28} {'log p':>9} {'NFE':>5} status")
        for point, log_p, nfe, status in zip(points, report["log_density"], report["nfe"], report["status"]):
            text = ", ".join(f"{v:.4f}" for v in point)
            lines.append(f"{text:<28} {log_p:>9.4f} {nfe:>5} {status}")
    elif command == "health":
        lines.append(report["status"])
    else:
        lines.append(f"{'name':<24} {'kind':<8} {'task':<9} {'tol':>7} {'version':<13} device")
        for m in report["models"]:
            lines.append(
                f"{m['name']:<24} {m['kind']:<8} {m['task']:<9} {m['default_tol']:>7g} {m['version']:<13} {m['device']}"
            )
    if "solved" in report:
        solved = report["solved"]
        same = solved["rtol"] == solved["atol"]
        tolerance = f"tol {solved['rtol']:g}" if same else f"rtol {solved['rtol']:g}, atol {solved['atol']:g}"
        lines.append(f"solved at {tolerance} ({solved['method']}, {solved['precision']})")
    if "compute_seconds" in report:
        lines.append(
            f"server: queue {report['queue_seconds'] * 1e3:.1f} ms, compute {report['compute_seconds'] * 1e3:.1f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("ODESERVE_TARGET", "127.0.0.1:50051"),
        help="host:port (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--token", default=os.environ.get("ODESERVE_TOKEN"), help="bearer token")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate to verify the server (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key, for mutual TLS")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = parser.add_subparsers(dest="command", required=True)
    classify = sub.add_parser(
        "classify",
        parents=[output],
        help="classify image files like MNIST digits (white on black)",
        description="Each image is converted to grayscale (colour and alpha dropped) and resized "
        "to 28x28 when it is another size; MNIST digits are white on black.",
    )
    _request_options(classify)
    classify.add_argument("images", type=Path, nargs="+", help="PNG, JPEG, ... files (needs Pillow)")
    sample = sub.add_parser("sample", parents=[output], help="draw points from a density model")
    _request_options(sample)
    sample.add_argument("--n", type=int, default=5)
    sample.add_argument("--seed", type=int, default=0)
    density = sub.add_parser("log-density", parents=[output], help="log-density of points under a density model")
    _request_options(density)
    density.add_argument("points", type=_point, nargs="+", help="comma-separated coordinates, e.g. 0.5,-1")
    sub.add_parser("models", parents=[output], help="list served models")
    health = sub.add_parser("health", parents=[output], help="the gRPC health status; exit status 0 only when SERVING")
    health.add_argument("--service", default="", help="a model's name or odeserve.v1.Inference (default: the server)")
    args = parser.parse_args(argv)

    tls = TLS.from_files(args.tls_ca, args.tls_key, args.tls_cert) if args.tls_ca else None
    try:
        with Client(args.target, timeout_s=args.timeout, tls=tls, token=args.token) as client:
            report = run(args, client)
    except OdeServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render(args.command, report))
    return 1 if args.command == "health" and report["status"] != "SERVING" else 0


if __name__ == "__main__":
    sys.exit(main())
