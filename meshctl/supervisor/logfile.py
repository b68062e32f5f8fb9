"""Size-rotated per-process log files.

The supervisor owns the read end of every process's stdout, so it decides when
to rotate; processes never see a closed stdout and no line is lost between
files (rotation happens only on a line boundary).
"""

from __future__ import annotations

import os
from pathlib import Path


class RotatingLog:
    def __init__(self, path: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._f = open(path, "ab", buffering=0)
        self._size = self._f.tell()

    def write(self, data: bytes) -> None:
        """Write whole lines; rotate first when they would overflow the file."""
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._f.write(data)
        self._size += len(data)

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "ab", buffering=0)
        self._size = 0

    def close(self) -> None:
        self._f.close()
