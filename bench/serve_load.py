"""Serving under contention, side by side in one run, on real MNIST and the shipped models.

1. **Mixed load**: requests of 1–256 images (log-uniform) at a tolerance drawn from 50% 1e-1,
   30% 1e-3, 20% 1e-5. Configurations: the fair scheduler (Engine v2), the same with the whole batch
   shared max-min fairly (``--guaranteed-share 1``: processor sharing), continuous batching with
   first-come-first-served admission (the engine before v2), static batching — all through
   gRPC — and the fair scheduler in-process (no gRPC). Throughput comes from N closed-loop
   clients (saturation); latency from open-loop Poisson arrivals at one rate for all, a
   fraction of static batching's closed-loop rate. (In a closed loop the mean latency is
   clients / throughput by Little's law, so its percentiles mix throughput into latency; they
   are reported too.) Runs are interleaved; medians of throughput, latency percentiles
   (overall and per tolerance class) and mean NFE are reported.
2. **Contention**: 512 images at tol 1e-8, then after 1 s one image at tol 1e-1; the small
   request's latency against its idle latency (target: within max(5x idle, 500 ms)).
3. **Hostile**: LogDensity of 1,024 points at tol 1e-8 on cnf-moons (the costliest valid
   request: points not finite in float32, which ran every item to the NFE limit, are now
   refused), then 0.1 s later ``Sample n=1``: the sample's latency (target: <= 1 s).
4. **Auto tolerance under overload**: open-loop arrivals at twice the rate the fair server
   sustains at tol 1e-4, each request one image with a 1 s deadline: fixed tol 1e-4 vs
   ``auto_tol``: fraction answered on time, accuracy of the answers, mean NFE.
5. **Where each policy's time goes**: every configuration of section 1 in-process, under 16
   closed-loop clients of one image each and under the mixed load (the tolerance mix both),
   runs interleaved: throughput, p99, row-steps and solver steps per second, rows per step,
   joins, parks and resumes per second, time per row-step inside and outside f, the process's
   CPU cores in use, and the worker's busy time by phase as the engine reports it
   (``odeserve_engine_seconds_total``): f, the model outside the ODE (ODE-Net's downsampling and
   head), and the engine's overhead — the solver's own arithmetic, joins, leaves, parks,
   resumes and the scheduler.
6. **What continuous batching can buy here**: static batching in-process under the mixed
   load, each solver step timed (without its joins and leaves) against the rows it stepped.
   Static's steps cost ``static_ms`` per row on average, a full batch's ``full_batch_ms``: no
   schedule of the same row-steps takes less, so their ratio bounds continuous batching's
   throughput gain from the steps (``step_ceiling``), and with the rest of static's time
   (joins, leaves, scheduling) added unchanged, the whole gain (``throughput_ceiling``). Also
   ODE-Net's downsampling per image, a 256-image batch whole against the adapter's chunks.

    python bench/serve_load.py --data-dir ../shared/data [--clients 16] [--duration 20]

Writes ``bench/results/serve_load_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the test harness starts real servers

from neuralode.devices import cpu_description  # noqa: E402
from odeserve.v1 import odeserve_pb2 as pb  # noqa: E402
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc  # noqa: E402

TOLERANCES = {1e-1: 0.5, 1e-3: 0.3, 1e-5: 0.2}  # tolerance: share of requests
CLASSIFIER, MOONS = "odenet-mnist", "cnf-moons"
POLICIES: dict[str, dict] = {  # configuration: its scheduler settings (SchedulerConfig's fields)
    "fair": {"policy": "fair"},
    "max-min": {"policy": "fair", "guaranteed_share": 1.0},  # the whole batch shared equally
    "fifo": {"policy": "fifo"},
    "static": {"policy": "static"},
}


def server_flags(settings: dict) -> tuple[str, ...]:
    """``python -m server``'s flags for scheduler settings."""
    return tuple(part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value)))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def classify_request(images: np.ndarray, **accuracy) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=CLASSIFIER,
        accuracy=pb.Accuracy(**accuracy),
        images=pb.Tensor(dtype="uint8", shape=list(images.shape), data=images.tobytes()),
    )


class GrpcTarget:
    """A real server subprocess and a channel to it."""

    def __init__(self, checkpoints: Path, tmp: Path, *flags: str) -> None:
        from live_server import start_server

        tmp.mkdir(parents=True, exist_ok=True)
        self.server = start_server(checkpoints, tmp, *flags)
        self.channel = grpc.insecure_channel(
            self.server.target, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = pb_grpc.InferenceStub(self.channel)

    def classify(self, images: np.ndarray, tol: float) -> list[int]:
        return list(self.stub.Classify(classify_request(images, tol=tol), timeout=600).items.nfe)

    def submit(self, images: np.ndarray, tol: float, done) -> None:
        """``done(nfe or None)`` is called when the request ends."""
        future = self.stub.Classify.future(classify_request(images, tol=tol), timeout=600)
        future.add_done_callback(lambda f: done(None if f.exception() else list(f.result().items.nfe)))

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


class InProcessTarget:
    """The same engine without gRPC: the model's adapter prepares the items, which go straight
    to ``Engine.submit``."""

    def __init__(
        self,
        checkpoints: Path,
        max_batch: int,
        step_graphs: bool = False,
        policy: str = "fair",
        max_delay: float = 0.005,
        stats=None,
    ) -> None:
        """``policy``: a configuration of :data:`POLICIES`; ``stats``: the engine's stats sink."""
        from neuralode.devices import resolve_device
        from server.adapters import Limits
        from server.config import EngineConfig
        from server.engine import Engine
        from server.models import load_models
        from server.scheduling import SchedulerConfig
        from server.stats import discard

        device = resolve_device("auto")  # where `python -m server` puts the models too
        self.model = load_models(checkpoints, device)[CLASSIFIER]
        scheduler = SchedulerConfig(max_batch=max_batch, max_delay=max_delay, **POLICIES[policy])
        self.engine = Engine(device, EngineConfig(scheduler, step_graphs=step_graphs), stats=stats or discard)
        self.engine.add(self.model.key, self.model.adapter, label=CLASSIFIER, expected_nfe=self.model.expected_nfe)
        self.limits = Limits(max_items=1024, max_abs_input=1e6)

    def _future(self, images: np.ndarray, tol: float):
        from server.api import Kind
        from server.executor import Work

        rows = self.model.adapter.prepare(Kind.CLASSIFY, {"images": images}, self.limits)
        return self.engine.submit(
            self.model.key, [Work(Kind.CLASSIFY, row, tol, tol, "dopri5", 10_000) for row in rows]
        )[1]

    def classify(self, images: np.ndarray, tol: float) -> list[int]:
        return self._future(images, tol).result().nfe

    def submit(self, images: np.ndarray, tol: float, done) -> None:
        self._future(images, tol).add_done_callback(lambda f: done(None if f.exception() else f.result().nfe))

    def close(self) -> None:
        self.engine.close()


# ---- 1. mixed load -----------------------------------------------------------------------
def draw_request(
    rng: random.Random, images: int, max_images: int, tolerances: dict[float, float] = TOLERANCES
) -> tuple[list[int], float]:
    """One request of the mixed load: which of ``images`` it sends (1–``max_images`` of them,
    log-uniform) and its tolerance, drawn from ``tolerances`` (tolerance: share)."""
    tol = rng.choices(list(tolerances), weights=list(tolerances.values()))[0]
    size = min(max_images, int(math.exp(rng.uniform(0.0, math.log(max_images + 1)))))
    return rng.sample(range(images), size), tol


class MixedLoad:
    """Requests of 1–``max_images`` images (log-uniform) at the tolerance mix, drawn from a
    seeded generator, so every configuration gets the same sequence."""

    def __init__(self, images: np.ndarray, duration: float, warmup: float, max_images: int, seed: int) -> None:
        self.images, self.duration, self.warmup, self.max_images, self.seed = images, duration, warmup, max_images, seed

    def draw(self, rng: random.Random) -> tuple[np.ndarray, float]:
        chosen, tol = draw_request(rng, len(self.images), self.max_images)
        return self.images[chosen], tol

    def closed_loop(self, target, clients: int) -> dict:
        """``clients`` clients, each sending its next request when the last one returns: the
        throughput at saturation."""
        records: list[tuple[float, float, float, int, float]] = []  # (end, latency, tol, images, mean nfe)
        lock = threading.Lock()
        start = time.monotonic()
        stop_at = start + self.warmup + self.duration

        def client(index: int) -> None:
            rng = random.Random(self.seed + index)
            while time.monotonic() < stop_at:
                batch, tol = self.draw(rng)
                begin = time.monotonic()
                nfe = target.classify(batch, tol)
                end = time.monotonic()
                with lock:
                    records.append((end, end - begin, tol, len(batch), float(np.mean(nfe))))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        window = [r for r in records if start + self.warmup <= r[0] <= stop_at]
        row = _latencies(window)
        row["throughput_items_per_s"] = sum(r[3] for r in window) / self.duration
        row["requests_per_s"] = len(window) / self.duration
        return row

    def open_loop(self, target, rate: float) -> dict:
        """Poisson arrivals at ``rate`` requests/s, whatever the server does: latency at a
        given load. Latency counts from each request's scheduled arrival."""
        rng = random.Random(self.seed)
        records: list[tuple[float, float, float, int, float]] = []
        lock = threading.Lock()
        pending = threading.Semaphore(0)
        start = time.monotonic()
        stop_at = start + self.warmup + self.duration
        arrival, sent = start, 0
        while arrival < stop_at:
            batch, tol = self.draw(rng)
            time.sleep(max(0.0, arrival - time.monotonic()))

            def done(nfe, arrival=arrival, tol=tol, size=len(batch)) -> None:
                end = time.monotonic()
                if nfe is not None and arrival >= start + self.warmup:
                    with lock:
                        records.append((end, end - arrival, tol, size, float(np.mean(nfe))))
                pending.release()

            target.submit(batch, tol, done)
            sent += 1
            arrival += rng.expovariate(rate)
        for _ in range(sent):
            pending.acquire(timeout=600)
        row = _latencies(records)
        row["offered_requests_per_s"] = rate
        return row


def _latencies(records: list[tuple[float, float, float, int, float]]) -> dict:
    row = {
        "requests": len(records),
        "latency_p50_ms": _percentile([r[1] for r in records], 50) * 1e3,
        "latency_p99_ms": _percentile([r[1] for r in records], 99) * 1e3,
        "mean_nfe": statistics.fmean(r[4] for r in records) if records else float("nan"),
    }
    for tol in TOLERANCES:
        latencies = [r[1] for r in records if r[2] == tol]
        row[f"p50_ms_tol_{tol:g}"] = _percentile(latencies, 50) * 1e3
        row[f"p99_ms_tol_{tol:g}"] = _percentile(latencies, 99) * 1e3
    return row


def _median_row(runs: list[dict]) -> dict:
    row = {key: float(np.median([run[key] for run in runs])) for key in runs[0] if key != "requests"}
    row["requests"] = int(sum(run["requests"] for run in runs))
    row["runs"] = runs
    return row


# ---- 5. where each policy's time goes ----------------------------------------------------------
class Breakdown:
    """A stats sink that sums what the engine reports (:class:`server.stats.StepStats`,
    :class:`server.stats.IterationStats`): solver steps, rows stepped, rows moved, busy time by
    phase."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.row_steps = 0, 0
        self.moves: Counter[str] = Counter()
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, stats) -> None:
        from server.stats import IterationStats, StepStats

        if isinstance(stats, StepStats):
            self.steps += 1
            self.row_steps += stats.batch_size
        elif isinstance(stats, IterationStats):
            for phase, seconds in stats.seconds:
                self.seconds[phase] += seconds
            self.moves.update(joined=stats.joined, parked=stats.parked, resumed=stats.resumed, dropped=stats.dropped)

    def summary(self, wall: float, cpu: float) -> dict:
        """Rates per second of ``wall``; ``cpu``: the process's CPU seconds meanwhile."""
        busy = sum(self.seconds.values())
        f, model = self.seconds["f"], self.seconds["model"]
        row_steps = max(1, self.row_steps)
        return {
            "row_steps_per_s": self.row_steps / wall,
            "steps_per_s": self.steps / wall,
            "mean_rows_per_step": self.row_steps / max(1, self.steps),
            **{f"{move}_per_s": self.moves[move] / wall for move in ("joined", "parked", "resumed", "dropped")},
            "busy_fraction_of_wall": busy / wall,
            "cpu_cores_used": cpu / wall,
            "f_us_per_row_step": 1e6 * f / row_steps,
            "outside_f_us_per_row_step": 1e6 * (busy - f) / row_steps,
            "share_of_busy": {phase: seconds / busy for phase, seconds in sorted(self.seconds.items())},
            "f_share": f / busy,
            "model_outside_ode_share": model / busy,
            "engine_overhead_share": (busy - f - model) / busy,
        }


def engine_breakdown(
    checkpoints: Path,
    load: MixedLoad,
    clients: int,
    max_batch: int,
    step_graphs: bool,
    repeats: int,
    max_delay: float,
) -> dict:
    """Each configuration of :data:`POLICIES` in-process under ``load`` (closed loop, runs
    interleaved): its throughput, latency and where its engine's time went (:class:`Breakdown`)."""
    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    sinks = {policy: Breakdown() for policy in POLICIES}
    targets = {
        policy: InProcessTarget(checkpoints, max_batch, step_graphs, policy, max_delay, stats=sinks[policy])
        for policy in POLICIES
    }
    warm = MixedLoad(load.images, load.warmup, 0.0, load.max_images, load.seed + 1)
    measured = MixedLoad(load.images, load.duration, 0.0, load.max_images, load.seed)
    try:
        for _ in range(repeats):
            for policy, target in targets.items():
                warm.closed_loop(target, clients)
                sinks[policy].reset()
                cpu, begin = time.process_time(), time.perf_counter()
                row = measured.closed_loop(target, clients)
                wall, cpu = time.perf_counter() - begin, time.process_time() - cpu
                runs[policy].append(
                    {
                        "throughput_items_per_s": row["throughput_items_per_s"],
                        "latency_p50_ms": row["latency_p50_ms"],
                        "latency_p99_ms": row["latency_p99_ms"],
                        "mean_nfe": row["mean_nfe"],
                        **{key: value for key, value in row.items() if key.startswith(("p50_ms_tol", "p99_ms_tol"))},
                        **sinks[policy].summary(wall, cpu),
                    }
                )
    finally:
        for target in targets.values():
            target.close()
    return {policy: _median_of(results) for policy, results in runs.items()}


def _median_of(runs: list[dict]) -> dict:
    row: dict = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            row[key] = {k: float(np.median([run[key].get(k, 0.0) for run in runs])) for k in value}
        else:
            row[key] = float(np.median([run[key] for run in runs]))
    return row | {"runs": runs}


# ---- 6. what continuous batching can buy here ----------------------------------------------
def _timed(fn, add_seconds):
    """``fn``, reporting the wall time of every call to ``add_seconds``."""

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            add_seconds(time.perf_counter() - begin)

    return timed


class StepRows:
    """Each executor step's stepped rows and its time without the joins and leaves it ran
    (an instrument for this benchmark, wrapped in place around the executor's methods)."""

    def __init__(self, executor) -> None:
        self.steps: list[tuple[int, float]] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self._inside = 0.0
        step = executor.step
        executor._join = self._timed("joins", executor._join)
        executor._finish = self._timed("leaves", executor._finish)

        def timed_step(plan):
            self._inside, begin = 0.0, time.perf_counter()
            outputs = step(plan)
            elapsed = time.perf_counter() - begin
            self.steps.append((sum(group.batch_size for group in outputs.groups), elapsed - self._inside))
            return outputs

        executor.step = timed_step

    def _timed(self, part: str, fn):
        def add(seconds: float) -> None:
            self.seconds[part] += seconds
            self._inside += seconds

        return _timed(fn, add)


def batching_ceiling(
    checkpoints: Path,
    images: np.ndarray,
    clients: int,
    seconds: float,
    warmup: float,
    max_batch: int,
    max_delay: float,
    seed: int,
) -> dict:
    target = InProcessTarget(checkpoints, max_batch, policy="static", max_delay=max_delay)
    try:
        probe = StepRows(target.engine.workers[target.model.key].executor)
        MixedLoad(images, warmup, 0.0, max_batch, seed).closed_loop(target, clients)
        probe.steps.clear()
        probe.seconds.clear()
        begin = time.perf_counter()
        row = MixedLoad(images, seconds, 0.0, max_batch, seed + 1).closed_loop(target, clients)
        wall = time.perf_counter() - begin
        downsampling = _downsampling_per_image(target.model.adapter, images[:max_batch], target.limits)
    finally:
        target.close()
    rows, step_seconds = np.array([step for step in probe.steps if step[0] > 0], dtype=float).T
    width = max(1, max_batch // 8)
    by_rows = {}
    for low in range(0, max_batch, width):
        inside = (rows > low) & (rows <= low + width)
        if inside.any():
            by_rows[f"{low + 1}-{low + width}"] = {
                "steps": int(inside.sum()),
                "ms_per_row": 1e3 * step_seconds[inside].sum() / rows[inside].sum(),
            }
    static_ms = 1e3 * step_seconds.sum() / rows.sum()
    measured = [b for b in by_rows.values() if b["steps"] >= 10] or list(by_rows.values())  # not one-off steps
    full_batch_ms = min(b["ms_per_row"] for b in measured)
    steps_ideal = step_seconds.sum() * full_batch_ms / static_ms
    return {
        "static_items_per_s": row["throughput_items_per_s"],
        "row_steps": int(rows.sum()),
        "step_ms_per_row_by_rows": by_rows,
        "static_ms": static_ms,
        "full_batch_ms": full_batch_ms,
        "step_ceiling": static_ms / full_batch_ms,
        "throughput_ceiling": wall / (wall - step_seconds.sum() + steps_ideal),
        "share_of_wall": {
            "steps": step_seconds.sum() / wall,
            "joins": probe.seconds["joins"] / wall,
            "leaves": probe.seconds["leaves"] / wall,
        },
        "downsampling_ms_per_image": downsampling,
    }


def _downsampling_per_image(adapter, images: np.ndarray, limits, repeats: int = 10) -> dict:
    """ODE-Net's downsampling of one batch, whole against the adapter's chunks (its ``start``)."""
    import torch

    from server.api import Kind

    batch = adapter.prepare(Kind.CLASSIFY, {"images": images}, limits)
    times: dict[str, list[float]] = {"whole batch": [], "chunked": []}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved
            for name, run in (
                ("whole batch", adapter.model.downsample),
                ("chunked", lambda x: adapter.start(Kind.CLASSIFY, x)),
            ):
                begin = time.perf_counter()
                run(batch)
                times[name].append(time.perf_counter() - begin)
    return {name: 1e3 * statistics.median(ts) / len(batch) for name, ts in times.items()} | {"images": len(batch)}


# ---- 2. contention and 3. hostile ----------------------------------------------------------
def contention(target: GrpcTarget, images: np.ndarray) -> dict:
    small = classify_request(images[512:513], tol=1e-1)
    idle = []
    for _ in range(5):
        begin = time.monotonic()
        target.stub.Classify(small, timeout=60)
        idle.append(time.monotonic() - begin)
    big = target.stub.Classify.future(classify_request(images[:512], tol=1e-8), timeout=900)
    time.sleep(1.0)
    begin = time.monotonic()
    target.stub.Classify(small, timeout=900)
    loaded = time.monotonic() - begin
    big_running = not big.done()
    big.cancel()
    idle_s = float(np.median(idle))
    bound = max(5 * idle_s, 0.5)
    return {
        "idle_ms": idle_s * 1e3,
        "under_load_ms": loaded * 1e3,
        "target_ms": bound * 1e3,
        "big_still_running": big_running,
        "meets_target": loaded <= bound,
    }


def hostile(target: GrpcTarget) -> dict:
    points = np.random.default_rng(0).normal(scale=3.0, size=(1024, 2))
    request = pb.LogDensityRequest(
        model=MOONS,
        accuracy=pb.Accuracy(tol=1e-8),
        points=pb.Tensor(dtype="float64", shape=[1024, 2], data=points.astype("<f8").tobytes()),
    )
    big = target.stub.LogDensity.future(request, timeout=900)
    time.sleep(0.1)  # the whole request takes about a second on the CPU
    begin = time.monotonic()
    target.stub.Sample(pb.SampleRequest(model=MOONS, n=1, accuracy=pb.Accuracy(tol=1e-1)), timeout=900)
    seconds = time.monotonic() - begin
    big_running = not big.done()
    big.cancel()
    return {
        "sample_ms": seconds * 1e3,
        "target_ms": 1000.0,
        "hostile_still_running": big_running,
        "meets_target": seconds <= 1.0,
    }


# ---- 4. auto tolerance under overload -------------------------------------------------------
def capacity(target: GrpcTarget, images: np.ndarray, tol: float, clients: int, seconds: float) -> float:
    """Requests per second the server sustains with one image per request at ``tol``."""
    done = []
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < stop_at:
            target.stub.Classify(classify_request(images[rng.randrange(len(images))][None], tol=tol), timeout=600)
            done.append(time.monotonic())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(done) / seconds


def overload(
    target: GrpcTarget, images: np.ndarray, labels: np.ndarray, rate: float, seconds: float, auto: bool, seed: int
) -> dict:
    """Poisson arrivals at ``rate``; each request has a 1 s deadline."""
    rng = random.Random(seed)
    outcomes: list[tuple[bool, bool | None, float]] = []  # (on time, correct, mean nfe)
    lock = threading.Lock()
    futures = []
    accuracy = dict(auto_tol=True) if auto else dict(tol=1e-4)
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while next_at < end:
        time.sleep(max(0.0, next_at - time.monotonic()))
        index = rng.randrange(len(images))
        future = target.stub.Classify.future(classify_request(images[index][None], **accuracy), timeout=1.0)

        def record(f, index=index):
            try:
                response = f.result()
                row = (True, response.labels[0] == labels[index], float(np.mean(response.items.nfe)))
            except grpc.RpcError:
                row = (False, None, float("nan"))
            with lock:
                outcomes.append(row)

        future.add_done_callback(record)
        futures.append(future)
        next_at += rng.expovariate(rate)
    for future in futures:
        try:
            future.result()
        except grpc.RpcError:
            pass
    time.sleep(0.2)
    answered = [o for o in outcomes if o[0]]
    return {
        "requests": len(outcomes),
        "on_time_fraction": len(answered) / max(1, len(outcomes)),
        "accuracy_of_answers": statistics.fmean(o[1] for o in answered) if answered else float("nan"),
        "mean_nfe": statistics.fmean(o[2] for o in answered) if answered else float("nan"),
    }


def _relative(path: Path) -> str:
    return os.path.relpath(path, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients of the mixed load")
    parser.add_argument(
        "--offered-load",
        type=float,
        default=0.7,
        help="open-loop arrival rate of the mixed load, as a fraction of static batching's closed-loop rate",
    )
    parser.add_argument("--max-images", type=int, default=256, help="largest request of the mixed load")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per mixed-load run")
    parser.add_argument(
        "--open-loop-seconds",
        type=float,
        default=None,
        help="seconds per open-loop run of the mixed load (default: --duration); at about 7 requests/s, "
        "20 s put its p99 on the 2nd-slowest of some 150 requests, 150 s on the 11th of 1,100",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="mixed-load runs per configuration; medians are reported"
    )
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-delay-ms", type=float, default=10.0, help="static batching's collection window")
    parser.add_argument(
        "--step-graphs",
        choices=("off", "on"),
        default="off",
        help="the servers' and the in-process engine's step_graphs setting",
    )
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument(
        "--capacity-clients",
        type=int,
        default=128,
        help="closed-loop clients that measure the capacity at tol 1e-4 (enough to fill the batch)",
    )
    parser.add_argument("--engine-clients", type=int, default=16, help="one-image clients of the engine section")
    parser.add_argument("--engine-seconds", type=float, default=20.0, help="seconds per engine-section run")
    parser.add_argument("--sections", default="mixed,contention,hostile,auto,engine,ceiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="result file name (default: serve_load_<device>)")
    args = parser.parse_args()
    from live_server import end_on_sigterm

    end_on_sigterm()
    sections = set(args.sections.split(","))

    import torch

    from neuralode.allocator import keep_freed_memory

    # The in-process targets stand in for a server, which keeps freed memory by default.
    allocator = keep_freed_memory() or "kept freed memory (as the server by default)"

    from training.data import load_mnist

    test = load_mnist(args.data_dir, train=False, download=False)
    images, labels = test.images[:2000, 0].numpy(), test.labels[:2000].numpy()
    record: dict = {"load_average_1m_before": round(os.getloadavg()[0], 2), "in_process_allocator": allocator}
    batch_flags = (
        "--max-batch",
        str(args.max_batch),
        "--max-delay-ms",
        str(args.max_delay_ms),
        "--step-graphs",
        args.step_graphs,
    )
    step_graphs = args.step_graphs == "on"
    with tempfile.TemporaryDirectory() as tmp:
        targets = {
            name: GrpcTarget(args.checkpoints, Path(tmp) / name, *batch_flags, *server_flags(settings))
            for name, settings in POLICIES.items()
            if sections - {"engine", "ceiling"}  # these two run in-process
        }
        try:
            if "mixed" in sections:
                load = MixedLoad(images, args.duration, args.warmup, args.max_images, args.seed)
                mixed_targets = {f"grpc {name}": target for name, target in targets.items()}
                mixed_targets["in-process fair"] = InProcessTarget(args.checkpoints, args.max_batch, step_graphs)
                closed: dict[str, list[dict]] = {name: [] for name in mixed_targets}
                for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits all alike
                    for name, target in mixed_targets.items():
                        closed[name].append(load.closed_loop(target, args.clients))
                closed_rows = {name: _median_row(results) for name, results in closed.items()}
                rate = args.offered_load * closed_rows["grpc static"]["requests_per_s"]
                opened: dict[str, list[dict]] = {name: [] for name in mixed_targets}
                open_seconds = args.open_loop_seconds or args.duration
                for repeat in range(args.repeats):  # each round its own arrivals, the same for every target
                    arrivals = MixedLoad(images, open_seconds, args.warmup, args.max_images, args.seed + repeat)
                    for name, target in mixed_targets.items():
                        opened[name].append(arrivals.open_loop(target, rate))
                mixed_targets["in-process fair"].close()
                open_rows = {name: _median_row(results) for name, results in opened.items()}
                record["mixed"] = {"closed_loop": closed_rows, "open_loop": open_rows}
                ratios = {}
                for policy in ("fair", "max-min", "fifo"):
                    c, o = closed_rows[f"grpc {policy}"], open_rows[f"grpc {policy}"]
                    ratios[f"{policy}_over_static_throughput"] = (
                        c["throughput_items_per_s"] / closed_rows["grpc static"]["throughput_items_per_s"]
                    )
                    ratios[f"{policy}_over_static_p99_open_loop"] = (
                        o["latency_p99_ms"] / open_rows["grpc static"]["latency_p99_ms"]
                    )
                    ratios[f"{policy}_p99_loose_over_tight_open_loop"] = o["p99_ms_tol_0.1"] / o["p99_ms_tol_1e-05"]
                    ratios[f"{policy}_over_static_p99_closed_loop"] = (
                        c["latency_p99_ms"] / closed_rows["grpc static"]["latency_p99_ms"]
                    )
                ratios["grpc_over_in_process_throughput"] = (
                    closed_rows["grpc fair"]["throughput_items_per_s"]
                    / closed_rows["in-process fair"]["throughput_items_per_s"]
                )
                record["mixed_ratios"] = ratios
            if "contention" in sections:
                record["contention"] = {name: contention(targets[name], images) for name in ("fair", "fifo")}
            if "hostile" in sections:
                record["hostile"] = {name: hostile(targets[name]) for name in ("fair", "fifo")}
            if "auto" in sections:
                fair_target = targets["fair"]
                sustained = capacity(fair_target, images, 1e-4, args.capacity_clients, args.overload_seconds / 2)
                rate = 2 * sustained
                record["auto"] = {"capacity_requests_per_s_at_1e-4": sustained, "offered_requests_per_s": rate}
                for repeat in range(2):  # interleaved
                    for name, auto in (("fixed 1e-4", False), ("auto", True)):
                        result = overload(
                            fair_target, images, labels, rate, args.overload_seconds, auto, args.seed + repeat
                        )
                        record["auto"].setdefault(name, []).append(result)
        finally:
            for target in targets.values():
                target.close()
    if "engine" in sections:
        workloads = {
            f"{args.engine_clients} x 1 image": (args.engine_clients, 1),
            f"{args.clients} x 1-{args.max_images} images": (args.clients, args.max_images),
        }
        record["engine"] = {
            name: engine_breakdown(
                args.checkpoints,
                MixedLoad(images, args.engine_seconds, args.warmup, max_images, args.seed),
                clients,
                args.max_batch,
                step_graphs,
                args.repeats,
                args.max_delay_ms / 1e3,
            )
            for name, (clients, max_images) in workloads.items()
        }
    if "ceiling" in sections:
        record["ceiling"] = batching_ceiling(
            args.checkpoints,
            images,
            args.clients,
            args.duration,
            args.warmup,
            args.max_batch,
            args.max_delay_ms / 1e3,
            args.seed,
        )

    record["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = torch.cuda.get_device_name() if device == "cuda" else cpu_description()
    _print(record, args, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name or f'serve_load_{device}'}.json"
    settings = {k: _relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    command = "python bench/serve_load.py " + " ".join(sys.argv[1:])
    document = {
        "benchmark": "serve_load",
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "settings": settings,
        "tolerance_mix": {str(k): v for k, v in TOLERANCES.items()},
        **record,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {_relative(path)}")


def _print(record: dict, args, machine: str) -> None:
    print(f"serve_load on {machine}; {args.clients} clients; max batch {args.max_batch}")
    if "mixed" in record:
        mix = ", ".join(f"{share:.0%} at {tol:g}" for tol, share in TOLERANCES.items())
        print(
            f"\n1. mixed load: 1-{args.max_images} images/request, tolerances {mix}; median of {args.repeats} "
            f"interleaved runs of {args.duration:g} s (open loop {args.open_loop_seconds or args.duration:g} s)"
        )
        for loop, rows in record["mixed"].items():
            what = (
                f"{args.clients} clients, each sending when its last request returns"
                if loop == "closed_loop"
                else f"Poisson arrivals at {next(iter(rows.values()))['offered_requests_per_s']:.1f} requests/s "
                f"({args.offered_load:.0%} of static's closed-loop rate)"
            )
            print(f"{loop.replace('_', ' ')}: {what}")
            print(
                f"  {'configuration':<18} {'items/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99 1e-1':>9} {'p99 1e-3':>9} "
                f"{'p99 1e-5':>9} {'NFE':>6} {'requests':>8}"
            )
            for name, r in rows.items():
                items = f"{r['throughput_items_per_s']:>8.1f}" if "throughput_items_per_s" in r else f"{'':>8}"
                print(
                    f"  {name:<18} {items} {r['latency_p50_ms']:>8.0f} {r['latency_p99_ms']:>8.0f} "
                    f"{r['p99_ms_tol_0.1']:>9.0f} {r['p99_ms_tol_0.001']:>9.0f} {r['p99_ms_tol_1e-05']:>9.0f} "
                    f"{r['mean_nfe']:>6.1f} {r['requests']:>8d}"
                )
        for name, value in record["mixed_ratios"].items():
            print(f"  {name}: {value:.2f}")
    if "contention" in record:
        print("\n2. contention: 512 images at 1e-8, then 1 image at 1e-1")
        for name, r in record["contention"].items():
            print(
                f"  {name:<5} idle {r['idle_ms']:.0f} ms, under load {r['under_load_ms']:.0f} ms "
                f"(target {r['target_ms']:.0f} ms: {'met' if r['meets_target'] else 'missed'})"
            )
    if "hostile" in record:
        print("\n3. hostile: 1,024 points at 1e-8 on cnf-moons, then Sample n=1")
        for name, r in record["hostile"].items():
            print(
                f"  {name:<5} Sample n=1 took {r['sample_ms']:.0f} ms (target 1000 ms: {'met' if r['meets_target'] else 'missed'})"
            )
    if "auto" in record:
        a = record["auto"]
        print(
            f"\n4. overload: capacity {a['capacity_requests_per_s_at_1e-4']:.1f} requests/s at 1e-4, offered "
            f"{a['offered_requests_per_s']:.1f}/s, 1 s deadlines"
        )
        for name in ("fixed 1e-4", "auto"):
            for r in a[name]:
                print(
                    f"  {name:<10} on time {r['on_time_fraction']:.1%}, accuracy {r['accuracy_of_answers']:.2%}, "
                    f"mean NFE {r['mean_nfe']:.1f} ({r['requests']} requests)"
                )

    if "engine" in record:
        print(f"\n5. where each policy's time goes: in-process, closed loop, median of {args.repeats} interleaved runs")
        for workload, rows in record["engine"].items():
            print(f"  {workload}, the tolerance mix")
            print(
                f"    {'policy':<8} {'items/s':>8} {'p99 ms':>7} {'row-steps/s':>11} {'rows/step':>9} {'steps/s':>7} "
                f"{'joins/s':>7} {'parks/s':>7} {'resumes/s':>9} {'f us/rs':>8} {'rest us/rs':>10} {'engine':>7} "
                f"{'busy':>5} {'cores':>5}"
            )
            for policy, r in rows.items():
                print(
                    f"    {policy:<8} {r['throughput_items_per_s']:>8.1f} {r['latency_p99_ms']:>7.0f} "
                    f"{r['row_steps_per_s']:>11.0f} {r['mean_rows_per_step']:>9.1f} {r['steps_per_s']:>7.1f} "
                    f"{r['joined_per_s']:>7.1f} {r['parked_per_s']:>7.1f} {r['resumed_per_s']:>9.1f} "
                    f"{r['f_us_per_row_step']:>8.0f} {r['outside_f_us_per_row_step']:>10.0f} "
                    f"{r['engine_overhead_share']:>7.1%} {r['busy_fraction_of_wall']:>5.0%} {r['cpu_cores_used']:>5.2f}"
                )
            for policy, r in rows.items():
                shares = ", ".join(f"{phase} {share:.1%}" for phase, share in r["share_of_busy"].items())
                print(f"    {policy:<8} busy time: {shares}")
    if "ceiling" in record:
        c = record["ceiling"]
        print(
            f"\n6. what continuous batching can buy here: static batching, {args.clients} clients, mixed load, in-process"
        )
        print(
            f"  {c['static_items_per_s']:.1f} items/s; steps {c['share_of_wall']['steps']:.0%} of the time, joins "
            f"{c['share_of_wall']['joins']:.0%}, leaves {c['share_of_wall']['leaves']:.0%}"
        )
        print(
            "  ms per row-step by stepped rows: "
            + ", ".join(f"{k}: {b['ms_per_row']:.3f} ({b['steps']})" for k, b in c["step_ms_per_row_by_rows"].items())
        )
        print(
            f"  static {c['static_ms']:.3f} ms per row-step, a full batch {c['full_batch_ms']:.3f}: step ceiling "
            f"{c['step_ceiling']:.2f}x, throughput ceiling {c['throughput_ceiling']:.2f}x static"
        )
        d = c["downsampling_ms_per_image"]
        print(
            f"  downsampling of {d['images']} images: {d['whole batch']:.3f} ms per image whole, {d['chunked']:.3f} in the adapter's chunks"
        )


if __name__ == "__main__":
    main()
