"""Loopback aliases for pod replicas.

Linux routes all of 127.0.0.0/8 to ``lo``, so every replica can own an address
(127.0.x.1) and bind the same ports as its neighbours, like a pod with its own
network namespace. Replicas of one pod take consecutive third octets so that the
addresses stay readable (b-0 = 127.0.2.1, b-1 = 127.0.3.1).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
#: 127.0.0.1 is the host's own localhost and 127.0.1.1 is Debian's hostname
#: alias; allocation starts above both so a mesh never shadows them.
FIRST_ALLOCATED = ipaddress.IPv4Address("127.0.2.1")
STEP = 256


def alias_problem(ip: str) -> str | None:
    """Say why ``ip`` cannot be a pod alias, or None when it can."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return f"ip {ip!r} is not an IPv4 address"
    if addr not in LOOPBACK:
        return f"ip {ip} is outside 127.0.0.0/8 (pods live on loopback aliases)"
    if addr in (ipaddress.IPv4Address("127.0.0.0"), ipaddress.IPv4Address("127.0.0.1"),
                ipaddress.IPv4Address("127.255.255.255")):
        return f"ip {ip} is reserved (the host's own loopback); pick another 127.x.y.z"
    return None


def replica_aliases(first: str, replicas: int) -> list[str]:
    """The aliases of ``replicas`` replicas whose first one is ``first``."""
    base = int(ipaddress.IPv4Address(first))
    out = []
    for i in range(replicas):
        addr = ipaddress.IPv4Address(base + i * STEP)
        if addr not in LOOPBACK or addr == ipaddress.IPv4Address("127.255.255.255"):
            raise ValueError(f"replica {i} of {first} falls outside 127.0.0.0/8")
        out.append(str(addr))
    return out


def allocate(pods: Mapping[str, tuple[str | None, int]], taken: Iterable[str] = ()) -> dict[str, list[str]]:
    """Give every pod replica an alias.

    ``pods`` maps pod name -> (explicit first ip or None, replica count), in
    topology order. Explicit addresses are honoured as written (the topology
    validator reports clashes between them); the others get the lowest free
    127.0.x.1 addresses, skipping ``taken`` (addresses held by other meshes or
    by listening sockets) so that two meshes can run side by side.
    """
    out: dict[str, list[str]] = {}
    used = set(taken)
    for name, (ip, count) in pods.items():
        if ip is not None:
            out[name] = replica_aliases(ip, count)
            used.update(out[name])
    candidate = int(FIRST_ALLOCATED)
    for name, (ip, count) in pods.items():
        if ip is not None:
            continue
        aliases: list[str] = []
        while len(aliases) < count:
            addr = ipaddress.IPv4Address(candidate)
            if addr not in LOOPBACK:
                raise ValueError("no free loopback aliases left in 127.0.0.0/8")
            candidate += STEP
            if str(addr) not in used:
                aliases.append(str(addr))
                used.add(str(addr))
        out[name] = aliases
    return out


def is_loopback(host: str) -> bool:
    """Load and servers stay on this host: 127.0.0.0/8, ::1 (and the name localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
