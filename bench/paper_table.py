"""The paper's MNIST table (Chen et al. 2018, Table 1) from trained checkpoints, side by side
with the paper's figures: test error, parameters, training images/s and peak memory.

    python bench/paper_table.py runs/mlp-mnist.pt runs/resnet-mnist.pt runs/rknet-mnist.pt \\
        runs/odenet-mnist.pt --gnu-time-dir runs --out bench/results/paper_table_cpu.json
    python bench/paper_table.py runs/odenet-cpu-paper.pt --out bench/results/paper_table_cpu.json --update

Test error and parameters come from each card (measured on the full test set at the end of
training). Images/s is the training loop alone, from the ``epoch N: T s`` lines of the log
next to the checkpoint (the card's own ``images_per_s`` also counts the per-epoch test-set
evaluations). Peak memory is the process's peak resident set: ``Maximum resident set size`` from a
``/usr/bin/time -v -o <dir>/<name>.time`` file where there is one (so runs from before the
card recorded memory count the same way), else the card's ``peak_memory_mib``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neuralode.card import ModelCard  # noqa: E402
from neuralode.checkpoint import read_card  # noqa: E402
from neuralode.devices import cpu_description  # noqa: E402

PAPER_TEST_ERROR = {"mlp": 0.0160, "resnet": 0.0041, "rknet": 0.0047, "odenet": 0.0042}
PAPER_PARAMETERS = {"mlp": 0.24e6, "resnet": 0.60e6, "rknet": 0.22e6, "odenet": 0.22e6}
_EPOCH = re.compile(r"INFO epoch \d+: ([0-9.]+) s,")
_GNU_TIME_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def row(path: Path, gnu_time_dir: Path | None) -> dict:
    card = read_card(path)
    training = card.training
    epoch_seconds = [float(s) for s in _EPOCH.findall(path.with_suffix(".log").read_text())]
    loop_seconds = sum(epoch_seconds)
    images = training.steps * training.batch_size * (1 if "world_size" in training.absent else training.world_size)
    kind = card.kind
    table = card.metrics.table
    return {
        "kind": kind,
        "name": path.stem,
        "parameters": card.parameters,
        "test_error": card.metrics.test_error,
        "tol": training.tol,
        "nfe_mean": next((r.nfe_mean for r in table if r.tol == training.tol), None),
        "table": [r.to_dict() for r in table],
        "epochs": training.epochs,
        "steps": training.steps,
        "train_loop_s": round(loop_seconds, 1),
        "images_per_s": round(images / loop_seconds, 1),
        "peak_rss_mib": _peak_rss(card, path, gnu_time_dir),
        "paper_test_error": PAPER_TEST_ERROR.get(kind),
        "paper_parameters": PAPER_PARAMETERS.get(kind),
        "command": _relative(training.command),
        "device": training.device,
        "code_version": card.code_version,
    }


def _relative(command: str) -> str:
    """``command`` with absolute paths made relative to the repository, as records keep them."""
    return " ".join(os.path.relpath(word, ROOT) if os.path.isabs(word) else word for word in command.split(" "))


def _peak_rss(card: ModelCard, path: Path, gnu_time_dir: Path | None) -> float | None:
    """The whole process's peak (GNU time's, taken at exit) where there is one, so that all
    rows count alike; else the card's, taken just before the checkpoint was written."""
    if gnu_time_dir is not None and (gnu_time_dir / f"{path.stem}.time").exists():
        match = _GNU_TIME_RSS.search((gnu_time_dir / f"{path.stem}.time").read_text())
        if match:
            return round(int(match.group(1)) / 1024, 1)
    recorded = card.training.peak_memory_mib
    return recorded["host_rss"] if recorded else None


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | checkpoint | test error | paper | parameters | training images/s | peak memory (RSS) | epochs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paper = "-" if r["paper_test_error"] is None else f"{100 * r['paper_test_error']:.2f}%"
        nfe = "" if r["nfe_mean"] is None else f" (tol {r['tol']:g}, NFE {r['nfe_mean']:.1f})"
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f} MiB"
        lines.append(
            f"| {r['kind']} | {r['name']} | {100 * r['test_error']:.2f}%{nfe} | {paper} | {r['parameters']:,} | "
            f"{r['images_per_s']:.0f} | {rss} | {r['epochs']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument(
        "--gnu-time-dir", type=Path, default=None, help="folder of <name>.time files from /usr/bin/time -v"
    )
    parser.add_argument(
        "--note",
        default=None,
        help="conditions worth recording next to the figures (load, threads; --update keeps the old)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep --out's rows of the model kinds not given (a model retrained alone replaces its own row)",
    )
    args = parser.parse_args()
    rows = [row(path, args.gnu_time_dir) for path in args.checkpoints]
    note = args.note or ""
    if args.update and args.out and args.out.exists():
        fresh = {r["kind"]: r for r in rows}
        previous = json.loads(args.out.read_text())
        rows = [fresh.pop(r["kind"], r) for r in previous["rows"]] + list(fresh.values())
        note = previous.get("note", "") if args.note is None else args.note
    print(markdown(rows))
    if args.out:
        result = {
            "benchmark": "paper_table",
            "machine": f"{cpu_description()}; {rows[0]['device']}",
            "date": date.today().isoformat(),
            "note": note,
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
