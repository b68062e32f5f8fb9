"""Per-replica hosts files: the pod's view of service names.

Podman pods got their names through ``--add-host b.service:10.88.0.164``, which
writes into the container's /etc/hosts. Our pods share the host's /etc/hosts,
so each replica gets its own file in the same format (path in ``MESH_HOSTS``)
and our resolvers read it before falling back to the system resolver. Keeping
the /etc/hosts format means a human can ``cat`` it and any tool that already
understands hosts files (``getent``-style scripts, curl's ``--resolve``
helpers) can reuse it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from pods.addressing import is_ip


@dataclass(frozen=True)
class HostEntry:
    """One hosts-file line. A pod with replicas is several entries sharing a name."""

    ip: str
    names: tuple[str, ...]


def render_hosts(entries: Iterable[HostEntry], header: str = "") -> str:
    """Render entries in /etc/hosts format.

    The header becomes ``#`` comments so the file says who generated it (and that
    hand edits will be overwritten) without confusing any parser.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for entry in entries:
        if entry.names:
            lines.append(f"{entry.ip}\t{' '.join(entry.names)}")
    return "\n".join(lines) + "\n" if lines else ""



def parse_hosts(text: str) -> dict[str, list[str]]:
    """Map lowercased name -> IPs in file order.

    Unlike glibc (first match wins) we keep every line a name appears on: a
    service with several replicas is listed once per replica, and callers need
    all of them to spread load. Malformed lines are skipped rather than fatal so
    one bad hand edit cannot take a whole pod's name resolution down.
    """
    result: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 2 or not is_ip(fields[0]):
            continue
        ip = fields[0]
        for name in fields[1:]:
            ips = result.setdefault(name.lower(), [])
            if ip not in ips:
                ips.append(ip)
    return result


def read_hosts(path: str | os.PathLike) -> dict[str, list[str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_hosts(f.read())
