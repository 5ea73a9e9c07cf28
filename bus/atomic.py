"""Replace a file so that a crash, or a power cut, leaves the old one or the new one whole.

The journal's compaction and the daemon's record of dynamic children both need it:
write a temporary file beside the target, fsync it, rename it over the target, and
fsync the directory (without that last step the rename itself may be lost).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, buf: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a write may take only part)."""
    view = memoryview(buf)
    written = os.write(fd, view)
    while written < len(view):
        written += os.write(fd, view[written:])


def replace_durably(path: Path, data: bytes | bytearray, tmp_suffix: str = ".tmp") -> None:
    """`path` now holds `data`, durably; OSError if it cannot (the old file stays)."""
    tmp = path.with_name(path.name + tmp_suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
