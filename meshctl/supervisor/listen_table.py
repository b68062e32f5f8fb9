"""The listening TCP sockets of this network namespace: socket inode -> (ip, port).

Standard library only and no asyncio: `meshctl up` asks it which loopback aliases are taken, and the
supervisor's wildcard-bind watch (listening.py) which of them belong to its processes.
"""

from __future__ import annotations

import socket
import struct
import sys

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's hex "st" column


def _decode(hex_addr: str, family: socket.AddressFamily) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6}: 32-bit words in host byte order, printed as hex."""
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    if sys.byteorder == "little":
        raw = struct.pack(">4I", *struct.unpack("<4I", raw)) if len(raw) == 16 else raw[::-1]
    return socket.inet_ntop(family, raw), int(port_hex, 16)


# sock_diag over netlink, as `ss -ltn` asks: the kernel hands over its listening sockets only. Reading
# /proc/net/tcp{,6} instead walks every hash bucket and every connection (~15 ms here, more under load).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states; any socket id
_DIAG_MSG = struct.Struct("=BBBBHH16s16sI8xIIIII")  # inet_diag_msg: ..., sport, dport, src, dst, ..., inode


def _listen_table_netlink() -> dict[int, tuple[str, int]]:
    table: dict[int, tuple[str, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5.0)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
            nl.send(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0) + req)
            done = False
            while not done:
                data, off = nl.recv(65536), 0
                while off < len(data):
                    length, kind = _NLMSG.unpack_from(data, off)[:2]
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        raise OSError(-struct.unpack_from("=i", data, off + _NLMSG.size)[0], "sock_diag refused")
                    fam, _, _, _, sport, _, src, *_, inode = _DIAG_MSG.unpack_from(data, off + _NLMSG.size)
                    table[inode] = (socket.inet_ntop(fam, src if fam == socket.AF_INET6 else src[:4]),
                                    socket.ntohs(sport))
                    off += (length + 3) & ~3  # NLMSG_ALIGN
    return table


def _listen_table_proc() -> dict[int, tuple[str, int]]:
    table: dict[int, tuple[str, int]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _LISTEN:
                        table[int(fields[9])] = _decode(fields[1], family)
        except OSError:  # no IPv6 in this kernel
            continue
    return table


def listen_table() -> dict[int, tuple[str, int]]:
    """Socket inode -> (ip, port) of every listening TCP socket in our network namespace."""
    try:
        return _listen_table_netlink()
    except OSError:  # no sock_diag (a kernel without it, a sandbox): the slower text tables
        return _listen_table_proc()
