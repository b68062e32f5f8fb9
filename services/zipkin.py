"""What the demo services know of tracing: the context headers to pass on, and a tiny Zipkin reporter.

Istio's rule for applications: copy the trace context of the request you are serving onto the requests it
causes, so the mesh's spans join into one trace. ``PROPAGATED`` is that list and ``propagated`` picks them.

``ServerSpans`` makes a service a Zipkin-instrumented one (as any app in a traced mesh can be): when
``TRACING_ENDPOINT`` is set (meshctl sets it in every pod of a traced mesh) it reports one SERVER span per
request it serves, a child of the caller's span, in batches from a bounded buffer. Reporting never delays a
response: a full buffer drops spans (counted), a dead collector costs a log line a minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

log = logging.getLogger("services.zipkin")

#: The headers Istio asks applications to propagate (W3C, B3 multi and single, Envoy's request id).
PROPAGATED = ("x-request-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
              "x-b3-sampled", "x-b3-flags", "b3")
MAX_BUFFERED = 1000
BATCH = 100
FLUSH_INTERVAL_S = 0.5
LOG_EVERY_S = 60.0


def propagated(headers: Mapping[str, str]) -> dict[str, str]:
    """The trace context of an incoming request, to send on with the requests it causes."""
    return {name: value for name in PROPAGATED if (value := headers.get(name)) is not None}


def _hex(value: str | None, lengths: tuple[int, ...]) -> str | None:
    if value is None or len(value) not in lengths or not value.strip("0"):
        return None
    try:
        int(value, 16)
    except ValueError:
        return None
    return value.lower()


def parent_context(headers: Mapping[str, str]) -> tuple[str, str, bool] | None:
    """(trace id, the caller's span id, sampled) from B3 (multi, then single) or W3C traceparent; None: no
    usable context (a malformed one is no context: this service then starts no trace of its own either)."""
    tid, sid = _hex(headers.get("x-b3-traceid"), (16, 32)), _hex(headers.get("x-b3-spanid"), (16,))
    if tid and sid:
        return tid, sid, headers.get("x-b3-sampled", "1") not in ("0", "false")
    single = headers.get("b3")
    if single:
        parts = single.split("-")
        if len(parts) >= 2 and (tid := _hex(parts[0], (16, 32))) and (sid := _hex(parts[1], (16,))):
            return tid, sid, not (len(parts) > 2 and parts[2] == "0")
    parts = headers.get("traceparent", "").split("-")
    if len(parts) == 4 and parts[0] == "00" and (tid := _hex(parts[1], (32,))) and (sid := _hex(parts[2], (16,))):
        flags = _hex(parts[3], (2,)) or "00"
        return tid, sid, bool(int(flags, 16) & 1)
    return None


class ServerSpans:
    """A SERVER span per request, reported to ``endpoint`` (a Zipkin v2 ``/api/v2/spans`` URL)."""

    def __init__(self, endpoint: str, service: str, ip: str) -> None:
        self.endpoint = endpoint
        self.local = {"serviceName": service, **({"ipv4": ip} if ip else {})}
        self.buffer: deque[dict] = deque()
        self.dropped = 0
        self._last_log = -LOG_EVERY_S

    @classmethod
    def from_env(cls, default_service: str) -> ServerSpans | None:
        endpoint = os.environ.get("TRACING_ENDPOINT")
        if not endpoint:
            return None
        return cls(endpoint, os.environ.get("POD_NAME") or default_service, os.environ.get("POD_IP", ""))

    def record(self, request: web.Request, status: int, start: float, duration: float) -> None:
        context = parent_context(request.headers)
        if context is None or not context[2]:
            return
        tid, parent, _ = context
        if len(self.buffer) >= MAX_BUFFERED:
            self.dropped += 1
            return
        tags = {"http.method": request.method, "http.path": request.path, "http.status_code": str(status)}
        if status >= 500:
            tags["error"] = str(status)
        self.buffer.append({"traceId": tid, "parentId": parent, "id": f"{random.getrandbits(64) or 1:016x}",
                            "kind": "SERVER", "name": f"{request.method} {request.path}",
                            "timestamp": int(start * 1e6), "duration": max(int(duration * 1e6), 1),
                            "localEndpoint": self.local, "tags": tags})

    async def reporter(self, _app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: the reporting task for the app's life, a last flush at its end."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2), trust_env=False) as session:
            task = asyncio.create_task(self._run(session))
            yield
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            if self.buffer:
                await self._flush(session)

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            while self.buffer:
                await self._flush(session)

    async def _flush(self, session: aiohttp.ClientSession) -> None:
        batch = [self.buffer.popleft() for _ in range(min(BATCH, len(self.buffer)))]
        try:
            async with session.post(self.endpoint, data=json.dumps(batch),
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                failure = None if resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = str(exc) or type(exc).__name__
        if failure is not None:
            self.dropped += len(batch)
            now = time.monotonic()
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                log.warning("cannot report spans to %s: %s (%d dropped so far)", self.endpoint, failure,
                            self.dropped)
