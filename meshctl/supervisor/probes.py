"""Readiness probes: is a process serving yet?

They run against the pod's alias (never the host's 127.0.0.1), because that is
where a pod-local service binds.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from pods.topology import ReadyProbe

PROBE_TIMEOUT_S = 1.0


async def _tcp(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), PROBE_TIMEOUT_S)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def _http(ip: str, port: int, path: str) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), PROBE_TIMEOUT_S)
    except (TimeoutError, OSError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: meshctl-probe\r\n"
                     "Connection: close\r\n\r\n".encode())
        status_line = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT_S)
        parts = status_line.split()
        return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()


async def _exec(command: tuple[str, ...], env: Mapping[str, str], cwd: str) -> bool:
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, env={**os.environ, **env}, cwd=cwd,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return False
    try:
        return await asyncio.wait_for(proc.wait(), PROBE_TIMEOUT_S * 5) == 0
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False


async def probe(ready: ReadyProbe, ip: str, env: Mapping[str, str], cwd: str) -> bool:
    if ready.kind == "tcp":
        return await _tcp(ip, ready.port or 0)
    if ready.kind == "http":
        return await _http(ip, ready.port or 0, ready.path or "/")
    return await _exec(ready.command, env, cwd)
