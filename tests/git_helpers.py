"""Throw-away git checkouts for the code snapshot tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@x",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@x",
}


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **_IDENTITY},
    )
    return out.stdout.strip()


def committed_checkout(repo: Path, files: dict[str, str | Path]) -> Path:
    """A git repository at ``repo`` holding ``files`` (text, or a file to copy), all committed."""
    for rel, content in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            (repo / rel).write_bytes(content.read_bytes())
        else:
            (repo / rel).write_text(content)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "test checkout")
    return repo
