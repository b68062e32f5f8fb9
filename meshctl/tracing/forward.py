"""Forwarding the collector's spans to an external Zipkin or OTLP/HTTP endpoint, off the intake path.

Intake only appends to a bounded queue (``offer``: O(1), never awaits), and one task sends batches from it:
a slow or dead upstream fills the queue, and beyond it spans are dropped and counted, never held against a
sender. A failed batch is counted and dropped, not retried: retrying would let a dead upstream grow the
collector's work without bound, and the spans are still in the collector's own store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

import aiohttp

from meshctl.tracing.otlp import to_otlp
from meshctl.tracing.spans import Span

log = logging.getLogger("meshctl.tracing.forward")

KINDS = ("zipkin", "otlp")
#: A failing upstream is logged at most this often (it fails once per batch).
LOG_EVERY_S = 30.0


@dataclass
class ForwardCounters:
    sent: int = 0
    #: Refused at intake: the queue was full (the upstream is slower than the mesh).
    dropped: int = 0
    #: Sent, but the upstream failed or refused the batch.
    failed: int = 0
    batches: int = 0


class Forwarder:
    def __init__(self, kind: str, url: str, queue_size: int = 10_000, batch_size: int = 500,
                 interval_s: float = 0.5, timeout_s: float = 5.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"forward kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.url = kind, url
        self.queue: deque[Span] = deque()
        self.queue_size, self.batch_size = queue_size, batch_size
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.counters = ForwardCounters()
        self._wake = asyncio.Event()
        self._last_log = -LOG_EVERY_S

    def offer(self, spans: list[Span]) -> None:
        """Queue ``spans`` for the upstream; what does not fit is dropped and counted."""
        room = self.queue_size - len(self.queue)
        if room < len(spans):
            self.counters.dropped += len(spans) - max(room, 0)
            spans = spans[:max(room, 0)]
        self.queue.extend(spans)
        if len(self.queue) >= self.batch_size:
            self._wake.set()

    def body(self, batch: list[Span]) -> bytes:
        doc = batch if self.kind == "zipkin" else to_otlp(batch)
        return json.dumps(doc, separators=(",", ":")).encode()

    async def run(self) -> None:
        """Send batches until cancelled; then one last bounded flush of what is queued."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                while True:
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.interval_s)
                    except TimeoutError:
                        pass
                    self._wake.clear()
                    while self.queue:
                        await self._send_one(session)
            except asyncio.CancelledError:
                await asyncio.wait_for(self._drain(session), self.timeout_s)
                raise

    async def _drain(self, session: aiohttp.ClientSession) -> None:
        while self.queue:
            await self._send_one(session)

    async def _send_one(self, session: aiohttp.ClientSession) -> None:
        batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
        self.counters.batches += 1
        try:
            async with session.post(self.url, data=self.body(batch),
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                why = f"HTTP {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok, why = False, str(exc) or type(exc).__name__
        if ok:
            self.counters.sent += len(batch)
            return
        self.counters.failed += len(batch)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("forwarding %d spans to %s (%s) failed: %s; %d failed so far", len(batch), self.url,
                        self.kind, why, self.counters.failed)
