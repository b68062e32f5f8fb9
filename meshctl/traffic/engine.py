"""The load engine behind ``meshctl traffic``: raw asyncio protocols + httptools, no HTTP library.

One protocol object per connection and no task per request: a connection
sends its next request from the callback that completed the previous one
(closed model), or a ticker hands out requests at their scheduled times
(open model). Latency in the open model is measured from the *scheduled*
send time, so a stalled server shows up in the percentiles instead of
silently slowing the generator down (coordinated omission).

A response that is byte for byte the connection's last one is not parsed
again (``_Client.data_received``): same bytes from the same parser state give
the same status, body and framing, so it is counted as that response was.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter

import httptools

from meshctl.traffic.histogram import LatencyHistogram
from sidecar.http1 import HeadResponseParsing

BODY_KEEP = 2048  # bytes of each response body kept for grouping
RECONNECT_DELAY_S = 0.01


@dataclass(frozen=True)
class LoadSpec:
    targets: tuple[tuple[str, int], ...]  # connections are spread over these, round robin
    request: bytes  # the whole HTTP/1.1 request, built once
    head: bool = False
    n: int | None = None  # total requests (None: until the duration ends)
    duration_s: float | None = None
    concurrency: int = 10  # connections (closed model); the connection cap (open model)
    rate: float | None = None  # requests per second: open model
    timeout_s: float = 10.0


@dataclass
class Results:
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    status: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    groups: Counter[tuple[str, str]] = field(default_factory=Counter)
    started: float = 0.0
    finished: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.status.values()) + sum(self.errors.values())


class _Client(HeadResponseParsing, asyncio.Protocol):
    """One connection. The per-response path is short on purpose (bench/NOTES.md, "Load generator").

    The memo: when one read held exactly one whole response, from the parser's state between messages to
    that state again (``on_message_begin`` / ``on_message_complete`` say where the parser is), that read
    is kept with the status and group it gave. A later read with the same bytes, arriving while the parser
    is between messages and a request waits, would drive the parser through the same states to the same
    outcome, so it is counted as that response (``hits``, added to the counters in ``flush``) without
    feeding it. Anything else (a different byte: another Date second, a nonce; a response split across
    reads; HEAD; a response that closes) is parsed as before.
    """

    __slots__ = ("engine", "transport", "parser", "stale_parser", "busy", "sent_at", "body", "status", "addr",
                 "alive", "keep_alive", "close_delimited", "head", "request", "hist", "mid", "completed",
                 "answer", "memo", "memo_status", "memo_key", "hits", "expect", "arrived")

    def __init__(self, engine: Engine, addr: tuple[str, int]) -> None:
        self.engine = engine
        self.addr = addr
        self.head = engine.spec.head
        self.request = engine.spec.request
        self.hist = engine.results.hist
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.stale_parser = False
        self.busy = False
        self.sent_at = 0.0
        self.body = b""
        self.status = 0
        self.alive = False
        self.keep_alive = True
        self.close_delimited = False
        self.mid = False  # the parser is inside a message (between on_message_begin and on_message_complete)
        self.completed = 0  # messages completed in the read being parsed
        self.answer: tuple[int, tuple[str, str]] | None = None  # (status, group) of the last response counted
        self.memo = b""  # never equal to a read (reads are not empty)
        self.memo_status = 0
        self.memo_key = ("", "")
        self.hits = 0  # responses answered by the memo, not yet in the counters
        self.expect = b""  # the memo while a request waits on a parser between messages, else b""
        self.arrived = 0.0  # when the read being parsed came: a response's latency ends there

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True
        self.engine.connections.add(self)
        self.engine.on_idle(self)

    def send(self, scheduled: float | None) -> None:
        self.busy = True
        self.body = b""
        self.status = 0
        if self.stale_parser:
            self.renew_parser()
        self.expect = b"" if self.mid else self.memo
        self.sent_at = perf_counter() if scheduled is None else scheduled
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if data == self.expect:  # the memo (see the class): this response again
            seconds = perf_counter() - self.sent_at
            self.hist.record(seconds)
            self.hits += 1
            engine = self.engine
            if engine.closed_model and engine.issued < engine.budget:  # the next request, as on_response
                engine.issued += 1
                self.sent_at = perf_counter()
                self.transport.write(self.request)  # type: ignore[union-attr]
                return
            self.busy = False
            self.expect = b""
            engine.next_request(self)
            return
        self.arrived = perf_counter()
        clean = not self.mid
        self.completed = 0
        self.answer = None
        self.expect = b""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.engine.on_failure(self, "protocol")
            return
        if self.mid:  # a message is under way: parse what comes next (send() may have set expect)
            self.expect = b""
            return
        if clean and self.completed == 1 and self.answer is not None and self.keep_alive and not self.head:
            self.flush()  # this read was exactly one whole response: the new memo
            self.memo = data
            self.memo_status, self.memo_key = self.answer
        if self.busy:  # the next request is out, the parser between messages
            self.expect = self.memo

    def flush(self) -> None:
        """The memo's hits into the counters."""
        if self.hits:
            r = self.engine.results
            r.status[self.memo_status] += self.hits
            r.groups[self.memo_key] += self.hits
            self.hits = 0

    def on_message_begin(self) -> None:
        self.mid = True

    def on_headers_complete(self) -> None:
        # No on_header callback on purpose: headers are not needed, and each callback costs. A body
        # delimited by the connection's end is the only kind that cannot be kept alive, so
        # should_keep_alive() tells us whether a clean close may end this response.
        parser = self.parser
        status = self.status = parser.get_status_code()
        keep_alive = self.keep_alive = parser.should_keep_alive()
        self.close_delimited = not keep_alive and status >= 200 and status != 204 and status != 304
        if self.head:
            self.close_delimited = False
            self.end_head_only()

    def on_body(self, body: bytes) -> None:
        kept = self.body  # the first BODY_KEEP bytes or more (whole chunks), for grouping
        if not kept:
            self.body = body
        elif len(kept) < BODY_KEEP:
            self.body = kept + body

    def on_message_complete(self) -> None:
        self.mid = False
        self.completed += 1
        if self.busy:
            self.busy = False
            self.engine.on_response(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.expect = b""
        self.flush()
        if self.busy and self.status and self.close_delimited and exc is None:
            self.busy = False  # a body without framing ends with the connection: that is a response
            self.keep_alive = False
            self.arrived = perf_counter()
            self.engine.on_response(self)
        elif self.busy:
            self.busy = False
            self.engine.on_failure(self, "reset")
        else:
            self.engine.on_closed(self)


class Engine:
    def __init__(self, spec: LoadSpec, classify: Callable[[int, bytes], tuple[str, str]]) -> None:
        self.spec = spec
        self.classify = classify
        self.results = Results()
        self.issued = 0
        self.in_flight = 0
        self.connections: set[_Client] = set()
        self.connecting = 0
        self.idle: list[_Client] = []
        self.pending: deque[float] = deque()  # scheduled send times waiting for a connection (open model)
        self._addrs = itertools.cycle(spec.targets)
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.time_up = False
        self.next_at = 0.0
        self.schedule_end = float("inf")  # the open model issues nothing scheduled at or after this
        self.interval = 1.0 / spec.rate if spec.rate else 0.0
        self.closed_model = spec.rate is None
        #: Requests may be issued while ``issued < budget``: --n, and the duration's end sets it to ``issued``.
        self.budget = spec.n if spec.n is not None else sys.maxsize
        self._last_body: tuple[int, bytes, tuple[str, str]] | None = None

    # -- budget -------------------------------------------------------------------
    def _may_issue(self) -> bool:
        """Cheap on purpose (called per response): the duration ends through a timer, not a clock read."""
        return self.issued < self.budget

    def _time_up(self) -> None:
        self.time_up = True
        self.budget = min(self.budget, self.issued)
        self._check_done()

    def _check_done(self) -> None:
        if self.in_flight == 0 and not self.pending and not self._may_issue() and not self.done.done():
            self.done.set_result(None)

    # -- connections ----------------------------------------------------------------
    def _open(self) -> None:
        self.connecting += 1
        self.loop.create_task(self._connect(next(self._addrs)))

    async def _connect(self, addr: tuple[str, int]) -> None:
        try:
            await asyncio.wait_for(self.loop.create_connection(lambda: _Client(self, addr), *addr),
                                   self.spec.timeout_s)
        except (OSError, TimeoutError) as exc:
            self.connecting -= 1
            kind = "timeout" if isinstance(exc, TimeoutError) else (
                "refused" if isinstance(exc, ConnectionRefusedError) else "connect")
            self._connect_failed(kind)
            return
        self.connecting -= 1

    def _connect_failed(self, kind: str) -> None:
        """A request that could not even connect counts as one failed request."""
        if self.spec.rate is None:
            if self._may_issue():
                self.issued += 1
                self._record_error(kind, None)
                if self._may_issue():
                    self.loop.call_later(RECONNECT_DELAY_S, self._open)
        elif self.pending:
            self._record_error(kind, self.pending.popleft())
        self._check_done()

    def on_idle(self, conn: _Client) -> None:
        if self.spec.rate is None:
            if self._may_issue():
                self.issued += 1
                self.in_flight += 1
                conn.send(None)
                return
            self._retire(conn)
        elif self.pending:
            self.in_flight += 1
            conn.send(self.pending.popleft())
            return
        else:
            self.idle.append(conn)
        self._check_done()

    def _retire(self, conn: _Client) -> None:
        conn.expect = b""
        conn.flush()
        self.connections.discard(conn)
        if conn.transport is not None:
            conn.transport.close()

    def on_closed(self, conn: _Client) -> None:
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    # -- outcomes ---------------------------------------------------------------------
    def requests_done(self) -> int:
        """Responses and errors so far (for progress): the counters and the memo hits not yet added."""
        return self.results.requests + sum(c.hits for c in self.connections)

    def on_response(self, conn: _Client) -> None:
        # From the send (or the scheduled send) to the read that completed the response, as on the memo's
        # path: the parse is not part of the latency. 0 for a response that came in the read before its
        # request went out (a second response in one read: the server answered what was not asked yet).
        seconds = conn.arrived - conn.sent_at
        if seconds < 0.0:
            seconds = 0.0
        r = self.results
        r.hist.record(seconds)
        status = conn.status
        body = conn.body
        r.status[status] += 1
        last = self._last_body
        if last is not None and last[0] == status and last[1] == body:
            key = last[2]  # the same body as last time (common): no masking regex
        else:
            raw = bytes(body)
            key = self.classify(status, raw)
            self._last_body = (status, raw, key)
        r.groups[key] += 1
        conn.answer = (status, key)
        if conn.keep_alive:
            if self.closed_model and self.issued < self.budget:  # the next request (in_flight unchanged)
                self.issued += 1
                conn.send(None)
            else:
                self.next_request(conn)
        else:
            self.in_flight -= 1
            self._retire(conn)
            if self._may_issue() or self.pending:
                self._open()
        if self.in_flight == 0:
            self._check_done()

    def next_request(self, conn: _Client) -> None:
        """After a response on a connection kept alive, when the closed model's shortcut did not apply."""
        self.in_flight -= 1
        if self.closed_model:
            self._retire(conn)  # the budget is spent
            if self.in_flight == 0:
                self._check_done()
        else:
            self.on_idle(conn)

    def on_failure(self, conn: _Client, kind: str) -> None:
        self.in_flight -= 1
        self._record_error(kind, conn.sent_at)
        conn.busy = False
        self._retire(conn)
        if self._may_issue() or self.pending:
            self.loop.call_later(RECONNECT_DELAY_S, self._open)
        self._check_done()

    def _record_error(self, kind: str, sent_at: float | None) -> None:
        r = self.results
        r.errors[kind] += 1
        r.groups[("error", kind)] += 1
        if sent_at is not None and self.spec.rate is not None:
            r.hist.record(time.perf_counter() - sent_at)  # open model: the wait counts too

    # -- timeouts ------------------------------------------------------------------------
    async def _sweep(self) -> None:
        while not self.done.done():
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            limit = self.spec.timeout_s
            for conn in list(self.connections):
                if conn.busy and now - conn.sent_at > limit:
                    conn.busy = False
                    self.in_flight -= 1
                    self._record_error("timeout", conn.sent_at)
                    self._retire(conn)
                    if conn.transport is not None:
                        conn.transport.abort()
                    if self._may_issue() or self.pending:
                        self._open()
            if self.spec.rate is not None:
                while self.pending and now - self.pending[0] > limit:  # waited too long for a connection
                    self._record_error("timeout", self.pending.popleft())
            self._check_done()

    # -- open model ticker -------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.perf_counter()
        # The schedule itself ends at the duration: a tick that fires just before the duration's timer
        # must not add a request at t == duration (--rate 50 --duration 1s is 50 requests, not 51).
        while self.next_at <= now and self.next_at < self.schedule_end and self._may_issue():
            self.issued += 1
            self.pending.append(self.next_at)
            self.next_at += self.interval
        while self.pending and self.idle:
            conn = self.idle.pop()
            if conn.alive:
                self.in_flight += 1
                conn.send(self.pending.popleft())
        want = min(len(self.pending), self.spec.concurrency - len(self.connections) - self.connecting)
        for _ in range(max(0, want)):
            self._open()
        if self._may_issue() and self.next_at < self.schedule_end:
            self.loop.call_later(max(0.0, self.next_at - time.perf_counter()), self._tick)
        self._check_done()

    async def run(self) -> Results:
        spec = self.spec
        start = time.perf_counter()
        self.results.started = start
        if spec.duration_s is not None:
            self.loop.call_later(spec.duration_s, self._time_up)
        sweeper = self.loop.create_task(self._sweep())
        if spec.rate is None:
            for _ in range(min(spec.concurrency, spec.n or spec.concurrency)):
                self._open()
        else:
            self.next_at = start
            self.schedule_end = start + spec.duration_s if spec.duration_s is not None else float("inf")
            self._tick()
        try:
            await self.done
        finally:
            sweeper.cancel()
            self.results.finished = time.perf_counter()
            for conn in list(self.connections):
                conn.flush()
                if conn.transport is not None:
                    conn.transport.close()
        return self.results
