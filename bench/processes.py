"""Threads or processes: a CPU machine's cores used by one server process with an intra-op
thread per core, or by one server process per core with one thread each (issue 33, item 3).

A server runs each model's steps on one Python thread; f's convolutions use torch's intra-op
threads, but everything around them (the solver's arithmetic, joins, scheduling, gRPC) holds
the interpreter's lock. At one image per request that is most of a step, so the second core of
this CPU mostly waits. Separate processes have no shared lock. Each layout is real ``python -m
server`` processes on their own ports (``OMP_NUM_THREADS`` set per process), and the clients
are one SDK ``Client`` shared by ``--clients`` threads, ``round_robin`` over the processes'
addresses: spread per call, as behind a headless Service (deploy/k8s). Every layout and policy
is started first and then measured in turn, interleaved (every other round in reverse order),
so drift hits them alike. A layout may carry server settings of its own
(``1x2:keep-freed-memory=off``), so one setting's effect is measured the same way, side by side.

    python bench/processes.py --data-dir ../shared/data
    python bench/processes.py --data-dir ../shared/data --layouts 1x2 1x2:keep-freed-memory=off
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers

from live_server import RunningServer, end_on_sigterm, metric, start_server  # noqa: E402
from records import write_record  # noqa: E402

from client import Client  # noqa: E402
from neuralode.devices import cpu_description  # noqa: E402

CLASSIFIER = "odenet-mnist"
TOLERANCES = {1e-1: 0.5, 1e-3: 0.3, 1e-5: 0.2}  # tolerance: share of requests, as bench/serve_load.py


def parse_layout(text: str) -> tuple[int, int, tuple[str, ...]]:
    """``"2x1"``: two processes of one intra-op thread each; settings of the servers may follow,
    ``"1x2:keep-freed-memory=off"`` (``--keep-freed-memory off``), to compare them side by side."""
    shape, *settings = text.split(":")
    processes, _, threads = shape.partition("x")
    flags = []
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not (name and equals):
            raise ValueError(f"layout {text!r}: a server setting is written name=value, got {setting!r}")
        flags += [f"--{name}", value]
    return int(processes), int(threads), tuple(flags)


class Layout:
    """Server processes started alike, and one client spread over them."""

    def __init__(self, servers: list[RunningServer]) -> None:
        self.servers = servers
        self.client = Client(
            "ipv4:" + ",".join(server.target for server in servers), load_balancing="round_robin", timeout_s=600
        )

    def _stat_fields(self) -> list[list[str]] | None:
        """Each server process's /proc stat fields after its name (Linux), else None."""
        stats = [Path(f"/proc/{server.process.pid}/stat") for server in self.servers]
        if not all(stat.exists() for stat in stats):
            return None
        return [stat.read_text().rsplit(")", 1)[1].split() for stat in stats]

    def cpu_seconds(self) -> float | None:
        """User and system CPU time of the server processes so far (Linux), else None."""
        fields = self._stat_fields()
        if fields is None:
            return None
        return sum(int(f[11]) + int(f[12]) for f in fields) / os.sysconf("SC_CLK_TCK")

    def page_faults(self) -> int | None:
        """Minor page faults of the server processes so far (Linux), else None: memory the
        processes had handed back and touched again."""
        fields = self._stat_fields()
        return None if fields is None else sum(int(f[7]) for f in fields)

    def items_served(self) -> list[float]:
        """Items each process has answered (its ``odeserve_items_total``): how the calls spread."""
        return [metric(server.metrics_url, "odeserve_items_total") for server in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.stop()


def start_layouts(checkpoints: Path, tmp: Path, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], Layout]:
    """A :class:`Layout` per ``(policy, "PROCESSESxTHREADS")``: every server of every layout is
    started side by side (each loads and warms up its models); all or none."""

    def start(policy: str, layout: str, index: int) -> RunningServer:
        folder = tmp / f"{policy}-{layout}-{index}"
        folder.mkdir(parents=True)
        _, threads, flags = parse_layout(layout)
        return start_server(
            checkpoints, folder, "--http-port", "-1", "--policy", policy, *flags, env={"OMP_NUM_THREADS": str(threads)}
        )

    jobs = [(key, index) for key in wanted for index in range(parse_layout(key[1])[0])]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [(key, pool.submit(start, *key, index)) for key, index in jobs]
    started: dict[tuple[str, str], list[RunningServer]] = {key: [] for key in wanted}
    failures = []
    for key, future in futures:
        try:
            started[key].append(future.result())
        except Exception as error:  # the others are stopped, then the first error raised
            failures.append(error)
    if failures:
        for servers in started.values():
            for server in servers:
                server.stop()
        raise failures[0]
    return {key: Layout(servers) for key, servers in started.items()}


def closed_loop(layout: Layout, images: np.ndarray, max_images: int, clients: int, seconds: float, seed: int) -> dict:
    """``clients`` threads, each sending its next request when its last one returns."""
    for _ in range(2 * len(layout.servers)):  # every process answers once before the clock starts
        for tol in TOLERANCES:
            layout.client.classify(images[:1], model=CLASSIFIER, tol=tol)
    latencies: dict[float, list[float]] = {tol: [] for tol in TOLERANCES}
    answered = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(seed + index)
        while time.monotonic() < stop_at:
            tol = rng.choices(list(TOLERANCES), weights=list(TOLERANCES.values()))[0]
            size = min(max_images, int(math.exp(rng.uniform(0.0, math.log(max_images + 1)))))
            batch = images[rng.sample(range(len(images)), size)]
            begin = time.monotonic()
            layout.client.classify(batch, model=CLASSIFIER, tol=tol)
            with lock:
                answered[0] += size
                latencies[tol].append(time.monotonic() - begin)

    cpu_before, faults_before, start = layout.cpu_seconds(), layout.page_faults(), time.monotonic()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu_after, faults_after = time.monotonic() - start, layout.cpu_seconds(), layout.page_faults()
    every = [latency for values in latencies.values() for latency in values]
    return {
        "items_per_s": round(answered[0] / elapsed, 1),
        "p50_ms": round(1e3 * float(np.percentile(every, 50)), 1),
        "p99_ms": round(1e3 * float(np.percentile(every, 99)), 1),
        "p99_ms_by_tol": {f"{tol:g}": round(1e3 * float(np.percentile(v, 99)), 1) for tol, v in latencies.items() if v},
        "server_cores": None
        if cpu_before is None or cpu_after is None
        else round((cpu_after - cpu_before) / elapsed, 2),
        "server_page_faults_per_item": None
        if faults_before is None or faults_after is None
        else round((faults_after - faults_before) / max(1, answered[0]), 1),
    }


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the interleaved runs."""

    def median(values) -> float | None:
        values = list(values)
        return None if None in values else round(statistics.median(values), 2)

    return {
        key: {k: median(run[key][k] for run in runs) for k in runs[0][key]}
        if isinstance(runs[0][key], dict)
        else median(run[key] for run in runs)
        for key in runs[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["1x2", "2x1"],
        help="PROCESSESxTHREADS each, optionally followed by server settings: 1x2:keep-freed-memory=off",
    )
    parser.add_argument("--policies", nargs="+", default=["fair", "static"])
    parser.add_argument("--loads", nargs="+", default=["one", "mixed"], help="one: 1 image a request; mixed: 1–256")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="per run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="processes_cpu")
    args = parser.parse_args()
    end_on_sigterm()

    from training.data import load_mnist

    images = load_mnist(args.data_dir, train=False, download=False).images[:2000, 0].numpy()
    max_images = {"one": 1, "mixed": 256}
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {
        load: {policy: {layout: [] for layout in args.layouts} for policy in args.policies} for load in args.loads
    }
    with tempfile.TemporaryDirectory() as tmp:
        wanted = [(policy, layout) for policy in args.policies for layout in args.layouts]
        layouts = start_layouts(args.checkpoints, Path(tmp), wanted)
        try:
            for repeat in range(args.repeats):
                order = list(layouts.items())
                for load in args.loads:
                    for (policy, layout), running in order if repeat % 2 == 0 else reversed(order):
                        figures = closed_loop(
                            running, images, max_images[load], args.clients, args.seconds, args.seed + 1000 * repeat
                        )
                        runs[load][policy][layout].append(figures)
                        print(f"{load:>5} {policy:>6} {layout}: {figures}", flush=True)
            spread = {
                policy: {layout: running.items_served() for (p, layout), running in layouts.items() if p == policy}
                for policy in args.policies
            }
        finally:
            for running in layouts.values():
                running.close()

    medians = {
        load: {
            policy: {layout: median_run(r) for layout, r in by_layout.items()}
            for policy, by_layout in by_policy.items()
        }
        for load, by_policy in runs.items()
    }
    ratios: dict[str, dict] = {}
    for load, by_policy in medians.items():
        ratios[load] = {}
        first, *others = args.layouts
        for policy, by_layout in by_policy.items():
            for layout in others:
                ratios[load][f"{policy}: {layout} over {first} throughput"] = round(
                    by_layout[layout]["items_per_s"] / by_layout[first]["items_per_s"], 2
                )
        if {"fair", "static"} <= set(by_policy):
            for layout in args.layouts:
                fair, static = by_policy["fair"][layout], by_policy["static"][layout]
                ratios[load][f"{layout}: fair over static throughput"] = round(
                    fair["items_per_s"] / static["items_per_s"], 2
                )
                ratios[load][f"{layout}: fair over static p99"] = round(fair["p99_ms"] / static["p99_ms"], 2)
    machine = cpu_description()
    write_record(
        args.out,
        args.name,
        "server processes against intra-op threads, over gRPC (issue 33)",
        machine,
        {
            "settings": {
                "clients": args.clients,
                "seconds": args.seconds,
                "repeats": args.repeats,
                "tolerances": {f"{tol:g}": share for tol, share in TOLERANCES.items()},
                "checkpoints": os.path.relpath(args.checkpoints, ROOT),
                "client": "one SDK Client, round_robin over the processes' addresses, shared by the client threads",
            },
            "medians": medians,
            "ratios": ratios,
            "items_per_process": spread,
            "runs": runs,
        },
    )
    for load, figures in ratios.items():
        print(load, figures)


if __name__ == "__main__":
    main()
