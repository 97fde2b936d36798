"""Files that are never half-written."""

from __future__ import annotations

import os
import uuid
from typing import Callable


def write_atomically(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a new file beside ``path`` (so the rename is atomic, and the file
    gets the usual mode), then rename it to ``path``; on any failure the temporary file is
    removed and ``path`` keeps what it had."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
