"""The pod resolver as an aiohttp ``AbstractResolver``, for services built on aiohttp.

Kept apart from ``pods.resolver`` so that importing the sync resolver does not
pull in aiohttp (the sidecar's memory budget cannot afford it).
"""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from pods.resolver import HostsResolver, is_ip

# What aiohttp's own resolvers report: the host/port are already numeric, so
# the connector must not resolve them again.
_NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


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
        ips = [host] if is_ip(host) else self._hosts.lookup(host)
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
