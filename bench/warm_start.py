"""A warm start: the first request of each kind after the server is ready against steady state,
with ``warmup`` on and off side by side in one run, and the start-up time the warm-up costs.

Each round starts a real ``python -m server`` on the shipped checkpoints once with each setting
(interleaved, so drift in the machine's speed hits both alike). After one ``ListModels`` and one
refused call per RPC (so the client's connection and stubs, and the server's handlers, are past
their first use: what remains is the model's), it sends the first request of each case below in
turn, then ``--steady`` more of each: the first's latency over their median is the ratio, at the
client and for the engine's part (queue + compute, as the response reports it). Cases:
Classify of 1 and of ``--batch`` real MNIST test digits, Sample of n = 1 and ``--batch``,
LogDensity of 1 and ``--batch`` points, all at the model card's tolerance. Start-up is the
time from launching the process to its ``odeserve ready`` line; the warm-up's own seconds per
model come from ``odeserve_warmup_seconds``. Medians over rounds are reported.

    python bench/warm_start.py --data-dir ../shared/data [--rounds 3] [--steady 9] [--threads 1]

Writes ``bench/results/warm_start_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers

from live_server import CLASSIFIER, DENSITIES, SHIPPED, end_on_sigterm, scrape, start_server, value  # noqa: E402

from client import Client, OdeServeError  # noqa: E402

SETTINGS = ("on", "off")
FIGURES = ("first_s", "steady_s", "first_engine_s", "steady_engine_s")


def cases(digits: np.ndarray, batch: int) -> dict[str, Callable[[Client], object]]:
    density = DENSITIES[0]
    points = np.random.default_rng(0).normal(size=(batch, 2)).astype(np.float32)
    return {
        "classify_1": lambda c: c.classify(digits[:1], model=CLASSIFIER),
        f"classify_{batch}": lambda c: c.classify(digits[:batch], model=CLASSIFIER),
        "sample_1": lambda c: c.sample(1, model=density),
        f"sample_{batch}": lambda c: c.sample(batch, model=density),
        "log_density_1": lambda c: c.log_density(points[:1], model=density),
        f"log_density_{batch}": lambda c: c.log_density(points, model=density),
    }


def _seconds(call: Callable[[Client], object], client: Client) -> tuple[float, float]:
    """The call's latency at the client, and the engine's part of it (queue and compute)."""
    begin = time.perf_counter()
    result = call(client)
    seconds = time.perf_counter() - begin
    timing = result.timing  # type: ignore[attr-defined]
    return seconds, timing.queue_seconds + timing.compute_seconds


def _prime(client: Client, digits: np.ndarray) -> None:
    """One refused call per RPC (a tolerance beyond max_tol, refused before the model is looked
    at): the client's stubs and the server's handlers and translators are then past their first
    call, so what a case's first request pays beyond steady state is the model's."""
    density = DENSITIES[0]
    for call in (
        lambda: client.classify(digits[:1], model=CLASSIFIER, tol=10.0),
        lambda: client.sample(1, model=density, tol=10.0),
        lambda: client.log_density(np.zeros((1, 2), np.float32), model=density, tol=10.0),
    ):
        try:
            call()
        except OdeServeError as error:
            assert error.code == "INVALID_ARGUMENT", error
        else:
            raise AssertionError("a tolerance beyond max_tol was served")


def one_server(setting: str, calls: dict, digits: np.ndarray, args, tmp: Path) -> dict:
    env = {"OMP_NUM_THREADS": str(args.threads)}
    begin = time.perf_counter()
    flags = ("--warmup", setting, "--device", args.device, "--compile-dynamics", args.compile_dynamics)
    running = start_server(SHIPPED, tmp, *flags, env=env, timeout=900)
    startup = time.perf_counter() - begin
    try:
        with Client(running.target, timeout_s=300, retries=0) as client:
            client.models()
            _prime(client, digits)
            first = {name: _seconds(call, client) for name, call in calls.items()}
            repeated = {name: [_seconds(call, client) for _ in range(args.steady)] for name, call in calls.items()}
        samples = scrape(running.metrics_url)
    finally:
        running.stop()
    return {
        "startup_s": startup,
        "warmup_s": {m: round(value(samples, "odeserve_warmup_seconds", model=m), 3) for m in (CLASSIFIER, *DENSITIES)},
        "first_s": {name: client_s for name, (client_s, _) in first.items()},
        "steady_s": {name: statistics.median(s for s, _ in runs) for name, runs in repeated.items()},
        "first_engine_s": {name: engine_s for name, (_, engine_s) in first.items()},
        "steady_engine_s": {name: statistics.median(e for _, e in runs) for name, runs in repeated.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steady", type=int, default=9, help="requests after the first, per case")
    parser.add_argument("--batch", type=int, default=256, help="the larger request (the server's max_batch)")
    parser.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile-dynamics", default="off", choices=("off", "on"), help="the servers' setting")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    end_on_sigterm()
    from training.data import load_mnist

    digits = load_mnist(args.data_dir, train=False, download=False).images[: args.batch, 0].numpy()
    calls = cases(digits, args.batch)
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for setting in SETTINGS if round_index % 2 == 0 else reversed(SETTINGS):
                folder = Path(tmp) / f"{setting}-{round_index}"
                folder.mkdir()
                runs[setting].append(one_server(setting, calls, digits, args, folder))
                print(f"round {round_index + 1}, warmup {setting}: {json.dumps(runs[setting][-1])}", flush=True)
    median = lambda values: round(statistics.median(values), 4)  # noqa: E731
    table = {}
    for setting in SETTINGS:
        rows = {}
        for name in calls:
            row = {key: median([r[key][name] for r in runs[setting]]) for key in FIGURES}
            row["ratio"] = round(row["first_s"] / row["steady_s"], 2)
            row["engine_ratio"] = round(row["first_engine_s"] / row["steady_engine_s"], 2)
            rows[name] = row
        table[setting] = {
            "startup_s": median([r["startup_s"] for r in runs[setting]]),
            "warmup_s": {m: median([r["warmup_s"][m] for r in runs[setting]]) for m in runs[setting][0]["warmup_s"]},
            "cases": rows,
        }
    print(
        f"\nfirst request after ready / steady median at the client, and the ratio of the engine's queue + compute "
        f"(median of {args.rounds} rounds; {args.threads} thread(s))"
    )
    print(f"{'case':<18}" + "".join(f"{'warmup ' + s:>28}" for s in SETTINGS))
    for name in calls:
        cells = [table[s]["cases"][name] for s in SETTINGS]
        print(
            f"{name:<18}"
            + "".join(f"{c['first_s'] * 1e3:>10.1f} / {c['steady_s'] * 1e3:6.1f} ms {c['ratio']:5.2f}x" for c in cells)
            + "   engine "
            + "  ".join(f"{c['engine_ratio']:.2f}x" for c in cells)
        )
    print("start-up to ready: " + ", ".join(f"warmup {s} {table[s]['startup_s']:.2f} s" for s in SETTINGS))
    print("warm-up per model: " + ", ".join(f"{m} {s:.2f} s" for m, s in table["on"]["warmup_s"].items()))
    import torch

    device = (
        "cuda" if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    out = args.out or ROOT / "bench" / "results" / f"warm_start_{device}.json"
    relative = lambda path: str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)  # noqa: E731
    record = {
        "benchmark": "warm_start",
        "machine": machine,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/warm_start.py " + " ".join(sys.argv[1:]),
        "settings": {
            "rounds": args.rounds,
            "steady": args.steady,
            "batch": args.batch,
            "threads": args.threads,
            "compile_dynamics": args.compile_dynamics,
        },
        "checkpoints": relative(SHIPPED),
        "torch": torch.__version__,
        "results": table,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {relative(out)}")


if __name__ == "__main__":
    main()
