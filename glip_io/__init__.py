"""The ground every package stands on: file writes that a crash cannot tear (`atomic_write`, the one helper
every package uses), the writability probe (`check_writable`) and the COCO results records (`glip_io.coco`).

A leaf package (it imports nothing of ours), so `tasks`, `backbone` and `adapt` can all use it without
breaking the direction of imports.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object] | bytes) -> Path:
    """Write `path` so that readers see the old file or the whole new one, never part of it.

    `write` is the bytes to store, or a function that writes a temporary file it is given (for libraries such
    as safetensors or numpy that write to a path). The data is fsync'd before the rename and the rename itself
    after it, so the new file also survives a power cut. The parent folder is created if needed; on failure the
    temporary file is removed and the old file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        if isinstance(write, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as handle:
                handle.write(write)
        else:
            os.close(fd)
            write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # persist the rename (directory fsync is not supported everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` if needed, then write and remove a probe file in it: the one check that lets a long job
    refuse an unwritable output before it starts. Raises the OSError a real write would meet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    os.close(fd)
    os.unlink(name)
