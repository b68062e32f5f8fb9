"""The one way our processes run an event loop: uvloop when installed, asyncio otherwise.

Only the import is guarded: an ImportError raised *inside* the coroutine is the
program's own error and must not trigger a second run under plain asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)
