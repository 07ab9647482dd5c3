"""Compiled dynamics (``compile_dynamics = on``) against eager f, served side by side in one run.

Two real servers on the shipped ODE-Net (classifier only, default ``max_batch``), one eager and
one compiling f per padded batch size; real MNIST test digits classified at tol 1e-3 in
requests of 1, 16 and 256 images, interleaved; medians of client-side latency, the ratio
eager / compiled, and what compiling cost: the warm-up's seconds and, per padded size, the
compile time and whether the compiled f measured faster (the servers' logs).

    python bench/compiled_dynamics.py --data-dir ../shared/data [--repeats 7]

Writes ``bench/results/compiled_dynamics_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers
sys.path.insert(0, str(ROOT))

from live_server import CLASSIFIER, SHIPPED, end_on_sigterm, metric, start_server  # noqa: E402

from client import Client  # noqa: E402
from neuralode.devices import cpu_description  # noqa: E402

TOL = 1e-3
COMPILED = re.compile(
    r"f compiled for (\d+) rows \((\w+)\) in ([\d.]+) s: ([\d.]+) ms against ([\d.]+) ms eager; (.+)$"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compiled_dynamics_cpu.json")
    args = parser.parse_args()
    end_on_sigterm()
    raw = args.data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    digits = np.fromfile(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoints"
        folder.mkdir()
        shutil.copy(SHIPPED / f"{CLASSIFIER}.pt", folder / f"{CLASSIFIER}.pt")
        servers, started = {}, {}
        for name, flags in (("eager", ()), ("compiled", ("--compile-dynamics", "on"))):
            (Path(tmp) / name).mkdir()
            begin = time.monotonic()
            servers[name] = start_server(folder, Path(tmp) / name, *flags, timeout=900)
            started[name] = round(time.monotonic() - begin, 1)
        try:
            clients = {name: Client(server.target, timeout_s=300) for name, server in servers.items()}
            times: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.repeats + 1):  # the first round is unrecorded
                for size in args.sizes:
                    for name, client in clients.items():
                        begin = time.perf_counter()
                        client.classify(digits[:size], model=CLASSIFIER, tol=TOL)
                        times.setdefault((name, size), []).append(time.perf_counter() - begin)
            rows = {}
            for size in args.sizes:
                eager, compiled = (statistics.median(times[(name, size)][1:]) for name in ("eager", "compiled"))
                rows[str(size)] = {
                    "eager_ms": round(1000 * eager, 1),
                    "compiled_ms": round(1000 * compiled, 1),
                    "speedup": round(eager / compiled, 2),
                }
                print(
                    f"{size:>4} images: eager {1000 * eager:.1f} ms, compiled {1000 * compiled:.1f} ms ({eager / compiled:.2f}x)"
                )
            warmup = {
                name: metric(s.metrics_url, "odeserve_warmup_seconds", model=CLASSIFIER) for name, s in servers.items()
            }
            sizes = [
                {
                    "rows": int(m.group(1)),
                    "precision": m.group(2),
                    "compile_s": float(m.group(3)),
                    "compiled_ms": float(m.group(4)),
                    "eager_ms": float(m.group(5)),
                    "used": "compiled" if m.group(6) == "compiled" else "eager",
                }
                for line in servers["compiled"].log.read_text().splitlines()
                if (m := COMPILED.search(line))
            ]
            for client in clients.values():
                client.close()
        finally:
            for server in servers.values():
                server.stop()
    print(f"warm-up: eager {warmup['eager']:.1f} s, compiled {warmup['compiled']:.1f} s; ready after {started}")
    for size in sizes:
        print(
            f"  f at {size['rows']:>3} rows: compiled in {size['compile_s']:.1f} s, {size['compiled_ms']} ms vs {size['eager_ms']} ms eager: {size['used']}"
        )
    document = {
        "benchmark": "compiled_dynamics",
        "machine": cpu_description(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/compiled_dynamics.py " + " ".join(sys.argv[1:]),
        "settings": {"tol": TOL, "repeats": args.repeats, "sizes": args.sizes, "model": CLASSIFIER},
        "latency_by_images_per_request": rows,
        "warmup_seconds": warmup,
        "ready_after_seconds": started,
        "compiled_sizes": sizes,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
