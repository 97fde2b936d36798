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
        mode = _new_file_mode()
        if mode is not None and (os.stat(tmp).st_mode & 0o777) != mode:
            os.chmod(tmp, mode)  # a writer that made its file 0600 (safetensors does)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _new_file_mode():
    """The mode open() gives a new file under this process's umask (0o666 & ~umask), read
    from /proc where there is one (os.umask would change it for other threads); None
    elsewhere, leaving the writer's mode."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None
