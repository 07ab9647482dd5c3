"""Writing a benchmark's record: what it measured, with the machine, the date and the command
that reproduces it (relative to the repository), as ``bench/results/<name>.json``."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_record(out: Path, name: str, benchmark: str, machine: str, figures: dict) -> Path:
    """``figures`` under the record's header; the command is this script's own command line."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    document = {
        "benchmark": benchmark,
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        **figures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path
