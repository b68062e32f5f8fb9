"""Docker-compose style ``${VAR}`` interpolation of topology values.

Topologies are shared between machines and CI, so ports and hosts come from
the environment the same way they do in a compose file; people already know the
syntax. The four per-replica placeholders (``${POD_IP}``, ``${POD_NAME}``,
``${REPLICA}``, ``${MESH}``) are left untouched here because their values only
exist once a replica is placed (see :func:`pods.loopback.expand_placeholders`).

Supported forms: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?message}``, ``${VAR?message}``, ``${VAR:+alt}``, ``${VAR+alt}`` and
``$$`` for a literal dollar. Defaults may themselves contain interpolations.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

RESERVED_PLACEHOLDERS = frozenset({"POD_IP", "POD_NAME", "REPLICA", "MESH"})

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    """The value cannot be interpolated (bad syntax or a required variable is missing)."""


def interpolate(
    text: str,
    environ: Mapping[str, str],
    on_unset: Callable[[str], None] | None = None,
) -> str:
    """Expand variables in ``text`` from ``environ``.

    ``on_unset`` is told about variables that were used without a default and
    are unset: compose substitutes an empty string and warns, and we follow it
    so a missing variable is visible without being fatal.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        dollar = text.find("$", i)
        if dollar < 0:
            out.append(text[i:])
            break
        out.append(text[i:dollar])
        nxt = text[dollar + 1 : dollar + 2]
        if nxt == "$":
            out.append("$")
            i = dollar + 2
        elif nxt == "{":
            value, i = _braced(text, dollar, environ, on_unset)
            out.append(value)
        elif m := _NAME.match(text, dollar + 1):
            name = m.group()
            out.append(text[dollar : m.end()] if name in RESERVED_PLACEHOLDERS
                       else _lookup(name, environ, on_unset))
            i = m.end()
        else:
            # A lone "$" (e.g. a regex anchor) is kept as written, as compose does.
            out.append("$")
            i = dollar + 1
    return "".join(out)


def _lookup(name: str, environ: Mapping[str, str], on_unset: Callable[[str], None] | None) -> str:
    if name in environ:
        return environ[name]
    if on_unset is not None:
        on_unset(name)
    return ""


def _closing_brace(text: str, start: int) -> int:
    """Index of the "}" closing a "${" whose body starts at ``start``; nested "${...}" are skipped."""
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


def _braced(
    text: str, dollar: int, environ: Mapping[str, str], on_unset: Callable[[str], None] | None
) -> tuple[str, int]:
    body_start = dollar + 2
    close = _closing_brace(text, body_start)
    if close < 0:
        raise InterpolationError(f"invalid interpolation format in {text!r}: unterminated '${{'")
    whole = text[dollar : close + 1]
    m = _NAME.match(text, body_start)
    if not m:
        raise InterpolationError(f"invalid interpolation format in {text!r}: bad variable name in {whole!r}")
    name = m.group()
    rest = text[m.end() : close]
    if rest == "":
        if name in RESERVED_PLACEHOLDERS:
            return whole, close + 1
        return _lookup(name, environ, on_unset), close + 1
    op = next((o for o in _OPERATORS if rest.startswith(o)), None)
    if op is None:
        raise InterpolationError(
            f"invalid interpolation format in {text!r}: unexpected {rest!r} in {whole!r}"
        )
    if name in RESERVED_PLACEHOLDERS:
        raise InterpolationError(
            f"${{{name}}} is filled in per replica and takes no modifier (got {whole!r})"
        )
    arg = rest[len(op) :]
    is_set = name in environ
    value = environ.get(name, "")
    present = is_set and value != "" if op.startswith(":") else is_set
    if op in (":-", "-"):
        result = value if present else interpolate(arg, environ, on_unset)
    elif op in (":?", "?"):
        if not present:
            message = interpolate(arg, environ, on_unset)
            raise InterpolationError(
                f"required variable {name} is missing a value" + (f": {message}" if message else "")
            )
        result = value
    else:  # ":+" / "+"
        result = interpolate(arg, environ, on_unset) if present else ""
    return result, close + 1
