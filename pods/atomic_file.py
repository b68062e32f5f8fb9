"""Replacing a file in one step, so that a reader sees the old or the new content, never half of it."""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str | os.PathLike, text: str, mode: int = 0o644, durable: bool = False) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``.

    Services re-read their hosts files while running and a later ``meshctl`` reads the records a
    killed supervisor left: both must never see a truncated file. The temp file lives in the same
    directory so that ``os.replace`` is a same-filesystem rename, which is atomic. ``durable``
    also survives a machine crash (fsync before the rename), for records worth that cost.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
