"""``meshctl traffic``'s engine, driven in-process: one connection, a fake transport, reads chosen by the test.

These pin the per-response path down where the real-socket tests in test_traffic.py cannot choose how the
bytes arrive: responses split across reads, several in one read, chunked bodies, and the memo (a read equal to
the connection's last whole response is counted without parsing) only ever standing in for a parse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshctl.traffic.engine import Engine, LoadSpec, Results, _Client
from meshctl.traffic.report import classify


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def ok(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


def drive(script: Callable[[_Client, FakeTransport, Engine], None], n: int = 100, head: bool = False,
          rate: float | None = None) -> Results:
    """One connection of an engine; ``script`` feeds it reads. Returns the results as run() would."""

    async def main() -> Results:
        spec = LoadSpec(targets=(("127.0.0.1", 9),), request=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", head=head,
                        n=n, concurrency=1, rate=rate)
        engine = Engine(spec, classify)
        conn = _Client(engine, ("127.0.0.1", 9))
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        script(conn, transport, engine)
        for c in list(engine.connections):
            c.flush()
        return engine.results

    return asyncio.run(main())


def groups(r: Results) -> dict[tuple[str, str], int]:
    return dict(r.groups)


def test_identical_responses_are_counted_exactly():
    def script(conn, transport, engine):
        for _ in range(50):
            conn.data_received(ok(b"same"))
        assert conn.hits == 49  # parsed once, then the memo
        assert engine.requests_done() == 50

    r = drive(script)
    assert r.status == {200: 50} and not r.errors
    assert groups(r) == {("200", "same"): 50}
    assert r.hist.count == 50 and sum(r.hist.buckets.values()) == 50
    assert 0 < r.hist.min <= r.hist.max


def test_changing_responses_flush_the_memo_into_the_right_groups():
    bodies = [b"a"] * 7 + [b"b"] * 5 + [b"a"] * 3 + [b"c 12345678"] + [b"c 87654321"] * 4

    def script(conn, transport, engine):
        for i, body in enumerate(bodies):
            conn.data_received(ok(body, 503 if body == b"b" else 200))
            assert engine.requests_done() == i + 1

    r = drive(script)
    assert r.status == {200: 15, 503: 5}
    assert groups(r) == {("200", "a"): 10, ("503", "b"): 5, ("200", "c <n>"): 5}
    assert r.hist.count == len(bodies)


def test_a_response_split_across_reads_anywhere():
    whole = ok(b"split body", extra=b"Content-Type: text/plain\r\n")

    def script(conn, transport, engine):
        for cut in range(1, len(whole)):
            conn.data_received(whole[:cut])
            conn.data_received(whole[cut:])
        conn.data_received(whole)  # whole again: parsed (no memo was made from split reads) ...
        conn.data_received(whole)  # ... then the memo
        assert conn.hits == 1

    r = drive(script, n=1000)
    assert r.status == {200: len(whole) + 1} and not r.errors
    assert groups(r) == {("200", "split body"): len(whole) + 1}


def test_two_responses_in_one_read_are_two_responses():
    def script(conn, transport, engine):
        conn.data_received(ok(b"one") + ok(b"two"))  # the second answers the request sent after the first
        conn.data_received(ok(b"three"))

    r = drive(script)
    assert r.status == {200: 3}
    assert groups(r) == {("200", "one"): 1, ("200", "two"): 1, ("200", "three"): 1}
    assert r.hist.count == 3 and r.hist.min == 0.0  # "two" came before its request went out: 0, not negative


def test_chunked_responses():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    def script(conn, transport, engine):
        for _ in range(5):
            conn.data_received(chunked)
        for cut in (10, 50, len(chunked) - 3):
            conn.data_received(chunked[:cut])
            conn.data_received(chunked[cut:])

    r = drive(script)
    assert r.status == {200: 8} and not r.errors
    assert groups(r) == {("200", "hello world"): 8}


def test_memo_bytes_arriving_inside_a_message_are_parsed_as_its_body():
    """The read equals the memo, but the parser is inside a response whose body is those bytes."""
    memo = ok(b"memo")

    def script(conn, transport, engine):
        conn.data_received(memo)
        conn.data_received(memo)  # a hit
        conn.data_received(b"HTTP/1.1 201 X\r\nContent-Length: %d\r\n\r\n" % len(memo))
        conn.data_received(memo)  # the 201's body, not another 200
        conn.data_received(memo)  # between messages again: a hit
        assert conn.hits == 2

    r = drive(script)
    assert r.status == {200: 3, 201: 1}
    assert groups(r) == {("200", "memo"): 3, ("201", "HTTP/1.1 200 X Content-Length: 4 memo"): 1}


def test_a_partial_response_after_a_whole_one_disables_the_memo():
    memo = ok(b"memo")

    def script(conn, transport, engine):
        conn.data_received(memo)
        conn.data_received(memo)  # a hit
        conn.data_received(memo + b"HTTP/1.1 2")  # a response, then the start of another
        conn.data_received(memo)  # continues "HTTP/1.1 2": not a status line -> protocol error, not a hit

    r = drive(script)
    assert r.status == {200: 3}
    assert r.errors == {"protocol": 1}
    assert groups(r) == {("200", "memo"): 3, ("error", "protocol"): 1}


def test_garbage_after_a_response_is_a_protocol_error():
    def script(conn, transport, engine):
        conn.data_received(ok(b"fine"))
        conn.data_received(ok(b"fine") + b"garbage\r\n")

    r = drive(script)
    assert r.status == {200: 2} and r.errors == {"protocol": 1}
    assert groups(r) == {("200", "fine"): 2, ("error", "protocol"): 1}


def test_connection_close_responses_are_not_memoized():
    closing = ok(b"bye", extra=b"Connection: close\r\n")

    def script(conn, transport, engine):
        conn.data_received(closing)
        assert transport.closed and conn.memo == b""
        conn.connection_lost(None)

    r = drive(script)
    assert r.status == {200: 1} and not r.errors and groups(r) == {("200", "bye"): 1}


def test_a_reset_after_memo_hits_keeps_every_count():
    def script(conn, transport, engine):
        for _ in range(10):
            conn.data_received(ok(b"x"))
        conn.connection_lost(ConnectionResetError())  # the 11th request's connection resets

    r = drive(script)
    assert r.status == {200: 10} and r.errors == {"reset": 1}
    assert groups(r) == {("200", "x"): 10, ("error", "reset"): 1}


def test_head_responses_are_never_memoized():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n"

    def script(conn, transport, engine):
        for _ in range(5):
            conn.data_received(head)
        assert conn.hits == 0 and not transport.closed

    r = drive(script, head=True)
    assert r.status == {200: 5} and groups(r) == {("200", ""): 5}


def test_the_budget_ends_the_memo_path_too():
    def script(conn, transport, engine):
        for _ in range(5):
            conn.data_received(ok(b"x"))
        assert transport.closed and len(transport.writes) == 5  # the 5th response sent nothing more
        assert engine.done.done()

    r = drive(script, n=5)
    assert r.status == {200: 5} and groups(r) == {("200", "x"): 5}


def test_open_model_memo_hits_wait_for_the_schedule():
    def script(conn, transport, engine):
        assert engine.idle == [conn] and not transport.writes  # nothing scheduled yet
        engine.idle.remove(conn)
        engine.pending.extend([0.0, 0.0, 0.0])  # three requests scheduled (the ticker's job)
        engine.issued = 3
        engine.on_idle(conn)
        conn.data_received(ok(b"x"))  # answers the first request; the next pending one goes out
        assert len(transport.writes) == 2
        conn.data_received(ok(b"x"))  # a hit; one more pending
        conn.data_received(ok(b"x"))  # a hit; nothing pending: the connection idles
        assert len(transport.writes) == 3 and engine.idle == [conn] and engine.in_flight == 0

    r = drive(script, rate=10.0)
    assert r.status == {200: 3} and groups(r) == {("200", "x"): 3}
