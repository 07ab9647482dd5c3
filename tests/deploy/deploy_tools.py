"""What the deploy tests need from outside Python: tools found on PATH or beside this Python.

CI (``.ci/run``) installs every tool and sets ODESERVE_REQUIRE_DEPLOY_TOOLS=1, so there a
missing tool fails the test; on a developer's machine it skips with the tool's name."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def require_tool(name: str, why: str = "") -> str:
    """The path of executable ``name``; skip (fail under CI) when it is not installed."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = f"{name} is not installed{': ' + why if why else ''} (see deploy/README.md, 'Checks')"
    if os.environ.get("ODESERVE_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
