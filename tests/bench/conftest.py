"""Running a bench script as a user would, from the repository root, into a test's folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_bench(tmp_path: Path) -> Callable[..., dict]:
    """``run_bench(script, *args, record=NAME, threads=None)``: runs ``bench/<script>`` with
    ``args`` and ``--out`` the test's folder, checks it succeeded and returns the record it wrote."""

    def run(script: str, *args: str, record: str, threads: int | None = None) -> dict:
        env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(
            [sys.executable, f"bench/{script}", *args, "--out", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads((tmp_path / record).read_text())

    return run
