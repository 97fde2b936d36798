"""Generated tables in a document (docs/design.md): the text between two markers replaced
by a heading line, naming the commit, and markdown rows. A leaf module: compile_check and
launch_count write their tables through it."""

from __future__ import annotations

import os
import subprocess
from typing import List


def commit_of(path: str) -> str:
    """The short commit of the checkout holding ``path`` ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(path)), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def write_section(path: str, begin: str, end: str, head: str, rows: List[str]) -> None:
    """Replaces the text between the markers ``begin`` and ``end`` in ``path`` with
    ``head``, a blank line and ``rows``."""
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"--design: {path} has no {begin} ... {end} section")
    start = text.index(begin) + len(begin)
    body = "\n".join([head, ""] + list(rows))
    text = text[:start] + "\n" + body + "\n" + text[text.index(end):]
    with open(path, "w") as f:
        f.write(text)
