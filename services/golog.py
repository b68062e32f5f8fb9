"""Go's standard ``log`` package line format: ``2006/01/02 15:04:05 message``.

The demo services are ports of Go programs; keeping their log lines
byte-compatible lets the blog post's output, and any tooling that greps it,
apply unchanged.
"""

from __future__ import annotations

import sys
import time
from typing import NoReturn, TextIO

_stamp_second = -1
_stamp = ""


def _timestamp() -> str:
    # Formatting the time is the costliest part of a log line and it only
    # changes once a second, while the services log once per request.
    global _stamp_second, _stamp
    now = int(time.time())
    if now != _stamp_second:
        _stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now))
        _stamp_second = now
    return _stamp


def println(*parts: object, stream: TextIO | None = None) -> None:
    """Go's ``log.Println``: operands joined by spaces, one flushed line.

    Flushed per line so a supervisor tailing the pipe sees requests as they
    happen, not when a buffer fills. Goes to stdout (Go's default is stderr)
    because meshctl collects request logs from stdout.
    """
    out = stream if stream is not None else sys.stdout
    out.write(_timestamp() + " " + " ".join(map(str, parts)) + "\n")
    out.flush()


def fatal(*parts: object, code: int = 1) -> NoReturn:
    """Go's ``log.Fatal``: one line on stderr, then exit 1, no traceback."""
    println(*parts, stream=sys.stderr)
    raise SystemExit(code)
