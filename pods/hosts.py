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
import tempfile
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


def write_hosts_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the file in one step.

    Services re-read their hosts file while running (scaling changes the set
    of replicas), so a reader must see either the old or the new file, never a
    truncated one. A temp file in the same directory keeps ``os.replace`` a
    same-filesystem rename, which is atomic.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp creates 0600; hosts files are world-readable like /etc/hosts.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
