"""Every relative link in the project's Markdown reaches a file that exists, and a heading
there when it names one (GitHub's anchors: lower case, punctuation dropped, spaces to '-')."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split()]


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


SERVER_INSTALL = re.compile(r"""pip install (?:-e )?(?:\.|"\.\[[^\]]*\]")(?:\s|$)""")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_install_of_the_server_in_a_fresh_venv_brings_the_sdk(path):
    """odeserve depends on odeserve-client, which is not on PyPI: a fresh venv installing the
    checkout ('.' or '.[extra]') must name ./client in the same pip command."""
    missing = [
        line.strip()
        for line in path.read_text().splitlines()
        if "python3 -m venv" in line and SERVER_INSTALL.search(line) and "./client" not in line
    ]
    assert not missing, missing


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_their_anchors_exist(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, broken
