"""User-supplied regular expressions, as Envoy runs them: RE2, linear in the input, bounded in memory.

Route and header matches run on every request, against paths and headers the client chooses; the admin's
stats filter runs on the sidecar's loop. Python's ``re`` backtracks (``([a-z_]+)+X`` takes exponential
time), so no user pattern goes through it. RE2 is imported on first use: most sidecars never compile one.
"""

from __future__ import annotations

import functools
from typing import Any

#: The compiled program's memory cap, hence the bound on compile time and per-character search cost.
MAX_MEM = 1 << 20


class RegexError(ValueError):
    """The pattern is not valid RE2 syntax (the message is RE2's own, as Envoy reports it)."""


@functools.cache
def _re2() -> Any:
    import re2

    return re2


def compile_regex(pattern: str, *, ignore_case: bool = False, dot_nl: bool = False) -> Any:
    """A compiled RE2 pattern (``fullmatch``/``search``/``pattern`` as in ``re``); RegexError if invalid."""
    re2 = _re2()
    options = re2.Options()
    options.log_errors = False  # a bad pattern is reported to whoever wrote it, not logged
    options.max_mem = MAX_MEM
    options.case_sensitive = not ignore_case
    options.dot_nl = dot_nl
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        msg = exc.args[0] if exc.args else "invalid"
        raise RegexError(msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)) from None
