"""Name resolution through the pod's hosts file, then the system resolver.

Processes in our pods share the host's /etc/hosts and DNS, so names like
``b.service`` (which podman injected with ``--add-host``) exist only in the
replica's own hosts file (``MESH_HOSTS``). This resolver gives Python
code the same "files, then dns" order that glibc gives a container. It has no
aiohttp dependency so the sidecar (which must stay small) can use it; the
aiohttp flavour is in ``pods.aio_resolver``.
"""

from __future__ import annotations

import os
import socket
import time

from pods.addressing import is_ip
from pods.hosts import read_hosts

# Re-checking the file on every lookup would cost a stat() per connection; a
# short interval bounds both the cost and how stale a scaled-out pod list is.
_RECHECK_INTERVAL = 0.5


class HostsResolver:
    """Synchronous resolver for code that is not on an event loop (CLI, tests, checks)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get("MESH_HOSTS")
        self._table: dict[str, list[str]] = {}
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < _RECHECK_INTERVAL:
            return
        self._checked_at = now
        if not self.path:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            self._table, self._signature = {}, None
            return
        # The inode changes on every atomic replace, so a rewrite within the same
        # mtime tick and with the same size is still noticed.
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._signature:
            return
        try:
            self._table = read_hosts(self.path)
        except OSError:
            self._table = {}
        self._signature = signature

    def lookup(self, host: str) -> list[str]:
        self._refresh()
        return list(self._table.get(host.lower().rstrip("."), ()))

    def resolve(self, host: str, port: int = 0) -> list[str]:
        if is_ip(host):
            return [host]
        ips = self.lookup(host)
        if ips:
            return ips
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))
