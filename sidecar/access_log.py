"""Envoy-format access logs that never block the event loop.

A log destination may be slow or stalled (stdout is a pipe to the supervisor;
if nobody reads it, a blocking ``write`` waits). The data path therefore only
*formats* a line and appends it to a ``deque``; every ``FLUSH_INTERVAL_S`` (or
as soon as ``FLUSH_BYTES`` of new lines were queued) what is queued is joined
and written: by the event loop itself, without ever blocking (a regular file,
or a pipe through a non-blocking descriptor of our own: a full pipe parks the
rest until the loop sees it writable), or, where that is impossible (a socket,
no loop), by a daemon writer thread. ``close()`` drains everything, so nothing
is lost at shutdown. Loggers writing to the same path share one queue, so
lines from two listeners logging to /dev/stdout never interleave mid-line.

Formats are compiled once into a generated Python function (one ``"".join``
of attribute reads), and START_TIME caches the formatted seconds so per
request only the milliseconds are formatted.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable

from sidecar.request_info import RequestInfo

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" '
    '"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

FLUSH_INTERVAL_S = 0.05
FLUSH_BYTES = 64 * 1024
#: Lines queued beyond this (destination stalled for long) are dropped and counted, to bound memory (~25 MB RSS).
MAX_QUEUED_LINES = 20_000
_WRITE_CHUNK = 256 * 1024
#: A failing destination is reported at most this often (plus once when it recovers), not once per batch.
ERROR_REPORT_INTERVAL_S = 10.0
#: Set by a worker process (sidecar/workers.py), which shares stdout with the others: to anything but a regular
#: file (a pipe, a terminal), lines go out in writes of at most PIPE_BUF bytes, cut between lines, which the
#: kernel never interleaves with another process's writes. A regular file needs nothing: O_APPEND writes are.
PIPE_ATOMIC = False

log = logging.getLogger("sidecar.access_log")

Formatter = Callable[[RequestInfo], str]

# --- format compilation ---------------------------------------------------------------------------------------------

# %NAME%, %NAME(ARG)%, %NAME(ARG):N% ; ARG may itself contain '%' (START_TIME's strftime), never ')'.
_RE_OP = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")

# Simple operators: a Python expression over ``info`` ("-" when missing). Ints are left to the f-string to format.
_SIMPLE: dict[str, str] = {
    "PROTOCOL": "(info.protocol or '-')",
    "RESPONSE_CODE": "info.response_code",
    "RESPONSE_FLAGS": "_flags(info.response_flags)",
    "BYTES_RECEIVED": "info.bytes_received",
    "BYTES_SENT": "info.bytes_sent",
    "DURATION": "info.duration_ms",
    "UPSTREAM_HOST": "(info.upstream_host or '-')",
    "UPSTREAM_CLUSTER": "(info.upstream_cluster or '-')",
    "DOWNSTREAM_REMOTE_ADDRESS": "(info.downstream_remote or '-')",
    "DOWNSTREAM_LOCAL_ADDRESS": "(info.downstream_local or '-')",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": "(info.downstream_remote or '-')",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": "_noport(info.downstream_remote)",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": "_noport(info.downstream_local)",
    "ROUTE_NAME": "(info.route_name or '-')",
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": "info.attempts",
    "HOSTNAME": "_hostname",
    # TLS (sidecar.tls): "-" on plaintext, as Envoy.
    "DOWNSTREAM_PEER_URI_SAN": "((info.downstream_tls.peer_uri_san or '-') if info.downstream_tls else '-')",
    "DOWNSTREAM_LOCAL_URI_SAN": "((info.downstream_tls.local_uri_san or '-') if info.downstream_tls else '-')",
    "DOWNSTREAM_TLS_VERSION": "((info.downstream_tls.version or '-') if info.downstream_tls else '-')",
    "DOWNSTREAM_PEER_SUBJECT": "((info.downstream_tls.peer_subject or '-') if info.downstream_tls else '-')",
    "UPSTREAM_PEER_URI_SAN": "(info.upstream_peer_uri_san or '-')",
    # Envoy writes the reason with its spaces as underscores.
    "UPSTREAM_TRANSPORT_FAILURE_REASON": "(info.upstream_transport_failure_reason or '-').replace(' ', '_')",
}
#: Envoy operators we accept but have no data for: always "-".
_ALWAYS_MISSING = frozenset({
    "REQUEST_DURATION", "RESPONSE_DURATION", "RESPONSE_TX_DURATION", "REQUEST_TX_DURATION", "RESPONSE_CODE_DETAILS",
    "CONNECTION_TERMINATION_DETAILS", "UPSTREAM_LOCAL_ADDRESS",
    # A request exists only once the handshake succeeded: there is never a downstream failure to print.
    "DOWNSTREAM_TRANSPORT_FAILURE_REASON",
    "REQUESTED_SERVER_NAME", "CONNECTION_ID", "UPSTREAM_WIRE_BYTES_SENT", "UPSTREAM_WIRE_BYTES_RECEIVED",
})

# Pseudo / special headers mapped onto RequestInfo fields (``rq``/``rs``: the request/response header dicts).
_REQ_SPECIAL = {
    ":method": "(info.method or None)",
    ":path": "(info.path or None)",
    ":authority": "(info.authority or rq.get('host'))",
    "host": "(info.authority or rq.get('host'))",
    "x-envoy-original-path": "info.original_path",
    ":protocol": "None",
    ":scheme": "None",
}
_RESP_SPECIAL = {
    "x-envoy-upstream-service-time": ("(rs.get('x-envoy-upstream-service-time') or "
                                      "(None if info.upstream_service_time_ms is None "
                                      "else str(info.upstream_service_time_ms)))"),
    ":status": "(str(info.response_code) if info.response_code else None)",
}

#: "000Z".."999Z": the per-request part of the default START_TIME is one tuple index.
_MS_Z = tuple(f"{i:03d}Z" for i in range(1000))


def _flags(flags: list[str]) -> str:
    """Envoy 1.40 prints response flags in the order they were raised (URX before the UF of the final reply)."""
    if not flags:
        return "-"
    if len(flags) == 1:
        return flags[0]
    return ",".join(dict.fromkeys(flags))


def _noport(addr: str) -> str:
    if not addr:
        return "-"
    if addr.startswith("["):
        return addr[1:addr.find("]")]
    i = addr.rfind(":")
    return addr[:i] if i > 0 and addr.count(":") == 1 else addr


class _StartTime:
    """START_TIME with a custom strftime: the formatted whole-second part is cached, only sub-seconds vary.

    The format is split at Envoy's sub-second specifiers (``%E3S``: seconds
    with 3 decimals, ``%3f``/``%f``: fractional digits, ``%s``: epoch
    seconds); the rest goes through ``time.strftime`` once per distinct
    second. Always UTC, like Envoy. (The default format has its own inlined
    fast path in ``compile_format``.)
    """

    __slots__ = ("pieces", "sec", "cached")

    _RE_SUB = re.compile(r"%E(\d)S|%(\d)?f|%s")

    def __init__(self, fmt: str) -> None:
        # pieces: str (strftime chunk), int n >= 0 (n fractional digits) or -1 (epoch seconds)
        pieces: list[str | int] = []
        pos = 0
        for m in self._RE_SUB.finditer(fmt):
            pieces.append(fmt[pos:m.start()])
            if m.group(1) is not None:  # %E<n>S
                pieces.append("%S" + ("." if int(m.group(1)) else ""))
                pieces.append(int(m.group(1)))
            elif m.group(0) == "%s":
                pieces.append(-1)
            else:
                pieces.append(int(m.group(2) or 9))
            pos = m.end()
        pieces.append(fmt[pos:])
        self.pieces = [p for p in pieces if p != ""]
        self.sec = -1
        self.cached: list[str] = []

    def __call__(self, t: float) -> str:
        us = int(t * 1_000_000 + 0.5)
        sec, frac = divmod(us, 1_000_000)
        if sec != self.sec:
            tm = time.gmtime(sec)
            self.cached = [time.strftime(p, tm) if isinstance(p, str) else "" for p in self.pieces]
            self.sec = sec
        out = []
        for p, c in zip(self.pieces, self.cached, strict=True):
            if isinstance(p, str):
                out.append(c)
            elif p == -1:
                out.append(str(sec))
            elif p:
                out.append((f"{frac:06d}" + "000")[:p])  # up to ns; we only know microseconds
        return "".join(out)


def _header_expr(arg: str, special: dict[str, str], headers: str, env: dict[str, object]) -> str:
    """Expression for REQ(A?B) / RESP(A?B): the first present of A, B, else None.

    Header names are bound as constants in ``env`` (never spliced into source).
    """
    exprs = []
    for name in arg.split("?"):
        name = name.strip().lower()
        if not name:
            raise ValueError(f"empty header name in %{'REQ' if headers == 'rq' else 'RESP'}({arg})%")
        if name in special:
            exprs.append(special[name])
        else:
            const = f"_h{len(env)}"
            env[const] = name
            exprs.append(f"{headers}.get({const})")
    out = exprs[-1]
    for e in reversed(exprs[:-1]):
        var = f"_v{len(env)}"
        env[var] = None  # reserve the name
        out = f"({var} if ({var} := {e}) is not None else {out})"
    return out


def compile_format(fmt: str) -> Formatter:
    """Compile an Envoy access log format string into ``f(info) -> line``.

    Parsed once into a generated function that is a single f-string (one
    BUILD_STRING of attribute reads), so formatting a request costs about
    what a hand-written f-string would. Missing values print ``-`` (Envoy).
    ``:N`` truncates an operator's value to N characters. Raises
    ``ValueError`` naming an unknown operator.
    """
    pieces: list[str] = []
    prelude: list[str] = []
    env: dict[str, object] = {"_noport": _noport, "_flags": _flags, "_hostname": socket.gethostname() or "-",
                              "_MS_Z": _MS_Z, "_gmtime": time.gmtime, "_strftime": time.strftime}
    pos = 0
    default_time = False
    for m in _RE_OP.finditer(fmt):
        if m.start() > pos:
            pieces.append(repr(fmt[pos:m.start()]))
        pos = m.end()
        name, arg, maxlen = m.group(1), m.group(2), m.group(3)
        if name in ("REQ", "RESP"):
            if arg is None:
                raise ValueError(f"access log operator %{name}% needs a header name: %{name}(X-HEADER)%")
            if name == "REQ":
                e = _header_expr(arg, _REQ_SPECIAL, "rq", env)
            else:
                e = _header_expr(arg, _RESP_SPECIAL, "rs", env)
            e = f"({e} or '-')"
        elif name == "START_TIME":
            if arg:
                const = f"_st{len(env)}"
                env[const] = _StartTime(arg)
                e = f"{const}(info.start_time)"
            else:  # Envoy's default 2026-11-28T19:00:00.123Z, inlined: cached seconds + one tuple index
                if not default_time:
                    default_time = True
                    env["_sec_cache"] = [-1, ""]
                    prelude += [
                        "_ms = int(info.start_time * 1000.0 + 0.0005)",
                        "_s = _ms // 1000",
                        "if _s != _sec_cache[0]:",
                        "    _sec_cache[1] = _strftime('%Y-%m-%dT%H:%M:%S.', _gmtime(_s))",
                        "    _sec_cache[0] = _s",
                        "_st = _sec_cache[1] + _MS_Z[_ms - _s * 1000]",
                    ]
                e = "_st"
        elif name in _SIMPLE and arg is None:
            e = _SIMPLE[name]
        elif name in _ALWAYS_MISSING and arg is None:
            e = "'-'"
        else:
            raise ValueError(f"unknown access log operator %{name}{'(' + arg + ')' if arg is not None else ''}% "
                             f"in format {fmt!r}")
        if maxlen is not None:
            e = f"str({e})[:{int(maxlen)}]"
        pieces.append('f"{' + e + '}"')
    if pos < len(fmt):
        pieces.append(repr(fmt[pos:]))
    body = " ".join(pieces) if pieces else "''"
    lines = ["def _format(info):"]
    if "rq." in body or "rq." in "".join(prelude):
        lines.append("    rq = info.request_headers")
    if "rs." in body:
        lines.append("    rs = info.response_headers")
    lines += ["    " + p for p in prelude]
    lines.append(f"    return {body}")
    code = compile("\n".join(lines) + "\n", f"<access log format {fmt[:60]!r}>", "exec")
    exec(code, env)  # noqa: S102 - source built from our own templates; literals repr()'d, header names as constants
    fn = env["_format"]
    fn.__doc__ = f"Access log format {fmt!r}"
    return fn  # type: ignore[return-value]


# --- writing --------------------------------------------------------------------------------------------------------


class _Sink:
    """One destination (fd) with its queue; shared by all loggers of that path in this process.

    Written from the event loop when ``start()`` ran in one and the destination allows it: a regular file
    (writes land in the page cache), or a pipe / terminal through a non-blocking description of our own, where
    a full pipe parks the unwritten rest until the loop reports the pipe writable (``add_writer``) and lines
    queue meanwhile (bounded by ``MAX_QUEUED_LINES``). Anything else (a socket, no loop) gets a writer thread.
    The loop is preferred because a second Python thread is not free even when idle: its GIL hand-offs cost
    the data path ~7 us per request (bench/NOTES.md, issue 18).
    """

    def __init__(self, key: str, path: str) -> None:
        self.key = key
        self.path = path
        if path == "/dev/stdout":
            self.fd, self.owns_fd = 1, False
        elif path == "/dev/stderr":
            self.fd, self.owns_fd = 2, False
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.owns_fd = True
        self.regular = _is_regular_file(self.fd)
        self.atomic = PIPE_ATOMIC and not self.regular
        self.queue: collections.deque[str] = collections.deque()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # loop mode: who writes for us
        self.out_fd = -1  # the descriptor written in loop mode (our non-blocking one for a pipe)
        self.tail = b""  # loop mode: the batch being written, from tail_pos on
        self.tail_pos = 0
        self.tail_lines = 0
        self.parked = False  # loop mode: the destination is full; the loop calls us back when it is writable
        self.armed = False  # a flush is scheduled (loop mode), or the writer thread polls anyway
        self.timer: asyncio.TimerHandle | None = None
        self.stopping = False
        self.refs = 0
        self.dropped = 0  # lines lost: queue full, or the destination refused them (counted, never silent)
        self.write_errors = 0
        self._failing_since: float | None = None  # monotonic time of the first error of the current failure
        self._reported_at = 0.0
        self._dropped_at_report = 0
        self.idle = threading.Event()  # set when the writer has nothing queued nor in flight
        self.idle.set()

    # -- who writes ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Loop mode when called inside a running loop and the destination allows it, else the writer thread."""
        if self.loop is not None or self.thread is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            if self.regular:
                self.out_fd = self.fd
            else:
                try:  # a description of our own: O_NONBLOCK on the shared one would surprise whoever else holds it
                    self.out_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:  # a socket (ENXIO), no /proc: the thread writes
                    self.out_fd = -1
            if self.out_fd >= 0:
                self.loop = loop
                self.armed = False
                return
        self._start_thread()

    def _start_thread(self) -> None:
        if self.thread is None:
            self.armed = True  # it polls every FLUSH_INTERVAL_S: log() never needs to schedule anything
            self.thread = threading.Thread(target=self._run, name=f"access-log {self.path}", daemon=True)
            self.thread.start()

    def _on_loop(self) -> bool:
        """Loop mode, and its loop can still call us; a closed loop hands the writing to a thread."""
        loop = self.loop
        if loop is None:
            return False
        if loop.is_closed():
            self._leave_loop()
            if not self.stopping:
                self._start_thread()
            return False
        return True

    def _leave_loop(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None and not loop.is_closed():
            if self.timer is not None:
                self.timer.cancel()
            if self.parked:
                loop.remove_writer(self.out_fd)
        self.timer = None
        self.parked = False
        if self.out_fd >= 0 and self.out_fd != self.fd:
            os.set_blocking(self.out_fd, True)  # ours alone: whoever writes next (stop, the thread) may block
        self.armed = self.thread is not None

    def arm(self) -> None:
        """A line was queued and no flush is scheduled: one within FLUSH_INTERVAL_S."""
        if self._on_loop():
            self.armed = True
            self.timer = self.loop.call_later(FLUSH_INTERVAL_S, self._tick)  # type: ignore[union-attr]

    def _tick(self) -> None:
        self.timer = None
        self.armed = False
        self.write_some()

    def kick(self) -> None:
        """FLUSH_BYTES were queued since the last kick: write now."""
        if self._on_loop():
            self.write_some()
        else:
            self._start_thread()
            self.wake.set()

    # -- loop mode ----------------------------------------------------------------------------------------------
    def write_some(self) -> None:
        """Write what the destination takes without blocking; park on a full pipe."""
        if self.parked or self.loop is None:
            return
        if not self._write_pending():
            self.parked = True
            self.loop.add_writer(self.out_fd, self._writable)

    def _write_pending(self) -> bool:
        """Write queued lines to ``out_fd`` until none are left (True) or it would block (False)."""
        while True:
            tail, pos = self.tail, self.tail_pos
            if pos >= len(tail):
                if not self.queue:
                    return True
                tail, self.tail_lines = self._batch()
                self.tail, self.tail_pos, pos = tail, 0, 0
            stop = _line_cut(tail, pos, len(tail)) if self.atomic else len(tail)  # whole lines: never interleaved
            try:
                n = os.write(self.out_fd, memoryview(tail)[pos:stop])
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            except OSError as e:
                # the rest of the batch is lost (a partly written line counts as lost); the next batch tries again
                self._failed(e, max(1, tail.count(b"\n", pos)))
                self.tail, self.tail_pos = b"", 0
                continue
            self.tail_pos = pos + n
            if self._failing_since is not None:
                self._recovered()

    def _writable(self) -> None:
        self.parked = False
        if self.loop is not None:
            self.loop.remove_writer(self.out_fd)
        self.write_some()

    def _finish_blocking(self, timeout: float | None) -> bool:
        """Loop mode, stopping or flushing from outside the loop: write everything, waiting for room up to
        ``timeout`` (None: forever). True when nothing is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        loop, parked = self.loop, self.parked
        if parked and loop is not None and not loop.is_closed():
            loop.remove_writer(self.out_fd)
        self.parked = False
        while not self._write_pending():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            select.select([], [self.out_fd], [], 1.0 if left is None else min(left, 1.0))
        done = self.tail_pos >= len(self.tail) and not self.queue
        if parked and not done and loop is not None and not loop.is_closed() and not self.stopping:
            self.parked = True
            loop.add_writer(self.out_fd, self._writable)
        return done

    # -- thread mode --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self.wake.wait(FLUSH_INTERVAL_S)
            self.wake.clear()
            try:
                self.drain()
            except Exception:  # a bug here must cost lines (counted by drain), never the writer: later lines matter
                log.exception("access log %s: writer error, continuing", self.path)
                self.idle.set()
            if self.stopping and not self.queue:
                return

    def _batch(self) -> tuple[bytes, int]:
        """Up to _WRITE_CHUNK of queued lines, encoded, and how many lines that is."""
        q = self.queue
        parts = []
        size = 0
        try:
            while size < _WRITE_CHUNK:
                s = q.popleft()
                parts.append(s)
                size += len(s)
        except IndexError:
            pass
        return "".join(parts).encode("utf-8", "replace"), len(parts)

    def drain(self) -> None:
        """Write everything queued (in chunks), blocking: the writer thread's way."""
        while self.queue:
            self.idle.clear()
            data, lines = self._batch()
            try:
                if self.atomic:
                    self._write_lines(data)
                else:
                    self._write(data)
            except BaseException:
                self.dropped += lines  # whatever happened, these lines are not in the file
                raise
        self.idle.set()

    def _write(self, data: bytes) -> None:
        """Write one batch; on an error the rest of the batch is dropped, counted and reported, and the next
        batch tries again (a full disk or a lost pipe may come back; a writer that died would lose every
        later line silently)."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
            except BlockingIOError:  # someone made the fd non-blocking: wait for room, off the loop
                select.select([], [self.fd], [], 1.0)
            except InterruptedError:
                continue
            except OSError as e:
                self._failed(e, max(1, bytes(view).count(b"\n")))  # (a partly written line counts as lost)
                return
        if self._failing_since is not None:
            self._recovered()

    def _write_lines(self, data: bytes) -> None:
        """``data`` in writes of whole lines, each at most PIPE_BUF bytes (a longer line goes alone)."""
        start, end = 0, len(data)
        while start < end:
            stop = _line_cut(data, start, end)
            self._write(data[start:stop])
            start = stop

    # -- failures -----------------------------------------------------------------------------------------------
    def _failed(self, e: OSError, lines: int) -> None:
        self.write_errors += 1
        self.dropped += lines
        self._report_failure(e)

    def _recovered(self) -> None:
        log.warning("access log %s: writing again after %.1f s of errors; %d lines dropped in all",
                    self.path, time.monotonic() - (self._failing_since or 0.0), self.dropped)
        self._failing_since = None

    def _report_failure(self, e: OSError) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._reported_at < ERROR_REPORT_INTERVAL_S:
            return
        log.error("access log %s: write failed: %s; %d lines dropped so far (%d since the last report)",
                  self.path, e.strerror or e, self.dropped, self.dropped - self._dropped_at_report)
        self._reported_at = now
        self._dropped_at_report = self.dropped

    # -- the end ------------------------------------------------------------------------------------------------
    def flush(self, timeout: float) -> bool:
        """Block until everything queued so far is written; True if it was."""
        if self.loop is not None:
            return self._finish_blocking(timeout)
        if self.thread is None or not self.thread.is_alive():
            self.drain()
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.wake.set()
            if not self.queue and self.idle.wait(0.01) and not self.queue:
                return True
            time.sleep(0.001)
        return False

    def stop(self, timeout: float | None) -> None:
        self.stopping = True
        if self.loop is not None:
            self._finish_blocking(timeout)
            self._leave_loop()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout)
        else:
            self.drain()
        if self.out_fd >= 0 and self.out_fd != self.fd:
            out, self.out_fd = self.out_fd, -1
            os.close(out)
        if self.owns_fd and self.fd >= 0 and (self.thread is None or not self.thread.is_alive()):
            fd, self.fd = self.fd, -1  # idempotent: never close a number the process may have reused
            try:
                os.close(fd)
            except OSError:
                pass


def _line_cut(data: bytes, start: int, end: int) -> int:
    """Where a write of whole lines from ``start`` ends: at most PIPE_BUF bytes, or one longer line alone."""
    stop = start + select.PIPE_BUF
    if stop >= end:
        return end
    cut = data.rfind(b"\n", start, stop) + 1
    if cut > start:
        return cut
    return data.find(b"\n", stop, end) + 1 or end


def _is_regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


_sinks: dict[str, _Sink] = {}
_sinks_lock = threading.Lock()  # creation/close only, never on the logging path


def _close_all_at_exit() -> None:
    """Safety net: writer threads are daemons, so flush what is queued if nobody called close()."""
    with _sinks_lock:
        sinks = list(_sinks.values())
        _sinks.clear()
    for sink in sinks:
        sink.stop(2.0)


atexit.register(_close_all_at_exit)


def _sink_key(path: str) -> str:
    if path in ("/dev/stdout", "/dev/stderr"):
        return path
    return os.path.abspath(path)


class AccessLogger:
    """One configured access log (path + format) of one connection manager.

    ``log()`` is the only method on the request path: format + ``deque.append``.
    Call ``await start()`` once the loop runs (lines logged before that are
    kept) and ``close()`` at shutdown to flush.
    """

    __slots__ = ("path", "format", "_fmt", "_sink", "_queue", "_pending", "_closed")

    def __init__(self, path: str, fmt: str | None = None) -> None:
        self.path = path
        self.format = fmt if fmt is not None else DEFAULT_FORMAT
        self._fmt = compile_format(self.format)
        key = _sink_key(path)
        with _sinks_lock:
            sink = _sinks.get(key)
            if sink is None or sink.stopping:
                sink = _sinks[key] = _Sink(key, path)
            sink.refs += 1
        self._sink = sink
        self._queue = sink.queue
        self._pending = 0  # bytes queued since the last wake-up we gave the writer (only touched by the loop)
        self._closed = False

    @property
    def dropped(self) -> int:
        """Lines dropped because the destination was stalled with ``MAX_QUEUED_LINES`` already queued."""
        return self._sink.dropped

    def log(self, info: RequestInfo) -> None:
        """Format ``info`` and queue the line; never blocks, never raises on a stalled destination."""
        line = self._fmt(info)
        q = self._queue
        if len(q) >= MAX_QUEUED_LINES:
            self._sink.dropped += 1
            return
        q.append(line)
        sink = self._sink
        if not sink.armed:
            sink.arm()
        self._pending += len(line)
        if self._pending >= FLUSH_BYTES:
            self._pending = 0
            sink.kick()

    async def start(self) -> None:
        """Start writing: from this loop where the destination allows, else a writer thread (idempotent;
        shared by loggers of the same path)."""
        self._sink.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until everything queued so far is written (tests, admin); True if it was."""
        return self._sink.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush every queued line, then stop the writer when its last logger closes.

        Blocks (up to ``timeout`` s, None: forever) while the destination is
        stalled: at SIGTERM we would rather wait for the reader than lose lines.
        """
        if self._closed:
            return
        self._closed = True
        sink = self._sink
        with _sinks_lock:
            sink.refs -= 1
            last = sink.refs <= 0
            if last and _sinks.get(sink.key) is sink:
                del _sinks[sink.key]
        if last:
            sink.stop(timeout)
        else:
            self.flush(timeout if timeout is not None else 1e9)
