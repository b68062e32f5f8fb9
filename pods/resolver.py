"""Name resolution through the pod's hosts file, then the system resolver.

Processes in our pods share the host's /etc/hosts and DNS, so names like
``b.service`` (which podman injected with ``--add-host``) exist only in the
replica's own hosts file (``MESH_HOSTS``). These resolvers give Python
services the same "files, then dns" order that glibc gives a container.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from pods.hosts import read_hosts

# Re-checking the file on every lookup would cost a stat() per connection; a
# short interval bounds both the cost and how stale a scaled-out pod list is.
_RECHECK_INTERVAL = 0.5

# What aiohttp's own resolvers report: the host/port are already numeric, so
# the connector must not resolve them again.
_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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
        if _is_ip(host):
            return [host]
        ips = self.lookup(host)
        if ips:
            return ips
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))


def _family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class MeshResolver(AbstractResolver):
    """aiohttp resolver: the pod's hosts file first, aiohttp's ThreadedResolver for other names.

    All replicas of a name are returned, in file order; aiohttp's DNS cache
    rotates through them across new connections, and happy-eyeballs falls over
    to the next one when a replica is down.
    """

    def __init__(self, path: str | None = None) -> None:
        self._hosts = HostsResolver(path)
        # ThreadedResolver binds to the running loop at construction, and a
        # resolver is usually built before the loop runs, so create it lazily.
        self._fallback: ThreadedResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        ips = [host] if _is_ip(host) else self._hosts.lookup(host)
        if family in (socket.AF_INET, socket.AF_INET6):
            ips = [ip for ip in ips if _family_of(ip) == family]
        if ips:
            return [
                ResolveResult(
                    hostname=host,
                    host=ip,
                    port=port,
                    family=_family_of(ip),
                    proto=socket.IPPROTO_TCP,
                    flags=_NUMERIC_FLAGS,
                )
                for ip in ips
            ]
        # Like nsswitch "files dns": a name the file lacks (for this family) goes
        # to the system resolver.
        if self._fallback is None:
            self._fallback = ThreadedResolver()
        return await self._fallback.resolve(host, port, family)

    async def close(self) -> None:
        if self._fallback is not None:
            await self._fallback.close()
