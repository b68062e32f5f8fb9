"""Reading a mesh's log files: tail and follow, surviving size rotation.

Reads the files directly rather than asking the supervisor, so logs of a
stopped or crashed mesh remain readable.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from meshctl.state import StateDir


def log_files(state: StateDir, name: str, role: str | None) -> list[tuple[str, Path]]:
    """(label, path) for each log of pod/replica ``name``; a pod name covers all its replicas."""
    out = []
    for path in sorted(state.logs.glob("*.log")):
        replica, _, proc_role = path.name[: -len(".log")].rpartition(".")
        pod = replica.rpartition("-")[0]
        if name in (replica, pod) and (role is None or role == proc_role):
            out.append((f"{replica}/{proc_role}", path))
    return out


def last_lines(path: Path, n: int | None) -> tuple[list[bytes], int]:
    with open(path, "rb") as f:
        data = f.read()
        pos = f.tell()
    lines = data.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        pos -= len(lines.pop())  # an unfinished line is printed when it completes
    return (lines if n is None else lines[-n:] if n > 0 else []), pos


def follow_logs(files: list[tuple[str, Path]], tail: int | None, follow: bool, prefix: bool) -> None:
    out = sys.stdout
    width = max(len(label) for label, _ in files)
    offsets: dict[Path, tuple[int, int]] = {}

    def emit(label: str, lines: list[bytes]) -> None:
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            out.write(f"{label:<{width}} | {text}\n" if prefix else text + "\n")
        out.flush()

    for label, path in files:
        try:
            lines, pos = last_lines(path, tail)
            offsets[path] = (os.stat(path).st_ino, pos)
        except OSError:
            continue
        emit(label, lines)
    if not follow:
        return
    try:
        while True:
            for label, path in files:
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                ino, pos = offsets.get(path, (st.st_ino, 0))
                if st.st_ino != ino:
                    # Rotated: finish the old file (now .1) from where we were, like tail -F.
                    rotated = path.with_name(path.name + ".1")
                    try:
                        if os.stat(rotated).st_ino == ino:
                            with open(rotated, "rb") as f:
                                f.seek(pos)
                                rest = f.read()
                            cut = rest.rfind(b"\n") + 1
                            emit(label, rest[:cut].splitlines(keepends=True))
                    except OSError:
                        pass
                    pos = 0
                elif st.st_size < pos:
                    pos = 0  # truncated: start again from the beginning
                if st.st_size > pos:
                    with open(path, "rb") as f:
                        f.seek(pos)
                        data = f.read()
                    cut = data.rfind(b"\n") + 1
                    emit(label, data[:cut].splitlines(keepends=True))
                    pos += cut
                offsets[path] = (st.st_ino, pos)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
