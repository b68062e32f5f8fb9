"""Envoy-format access logs: exact lines, operators, and a writer that never stalls the event loop."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import termios
import threading
import time

import pytest
import uvloop

from sidecar.access_log import DEFAULT_FORMAT, AccessLogger, compile_format
from sidecar.request_info import RequestInfo


def filled(**kw: object) -> RequestInfo:
    info = RequestInfo(
        start_time=1795892400.123456,  # 2026-11-28T19:00:00.123456Z
        start_monotonic=0.0,
        method="GET",
        path="/hello",
        authority="b.service:80",
        request_headers={"x-forwarded-for": "127.0.1.1", "user-agent": "curl/8.5.0",
                         "x-request-id": "4e1c1e2a-0000-4000-8000-000000000001", "host": "b.service:80"},
        response_headers={"content-type": "text/plain"},
        response_code=200,
        bytes_received=0,
        bytes_sent=12,
        duration_ms=7,
        upstream_service_time_ms=5,
        upstream_host="127.0.2.1:8080",
        upstream_cluster="b.service",
        downstream_remote="127.0.1.1:43210",
        downstream_local="127.0.3.1:80",
        route_name="r1",
        attempts=1,
    )
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_default_format_exact_line():
    line = compile_format(DEFAULT_FORMAT)(filled())
    assert line == ('[2026-11-28T19:00:00.123Z] "GET /hello HTTP/1.1" 200 - 0 12 7 5 "127.0.1.1" "curl/8.5.0" '
                    '"4e1c1e2a-0000-4000-8000-000000000001" "b.service:80" "127.0.2.1:8080"\n')


def test_default_format_missing_values_and_flags():
    info = RequestInfo(start_time=1795892400.0, start_monotonic=0.0, method="POST", path="/x",
                       response_code=503, response_flags=["UF", "URX"], bytes_received=3, duration_ms=12)
    line = compile_format(DEFAULT_FORMAT)(info)
    assert line == ('[2026-11-28T19:00:00.000Z] "POST /x HTTP/1.1" 503 UF,URX 3 0 12 - "-" "-" "-" "-" "-"\n')


def test_original_path_preferred():
    f = compile_format("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%")
    assert f(filled()) == "/hello"
    assert f(filled(path="/v2/hello", original_path="/api/hello")) == "/api/hello"


def test_custom_operators():
    fmt = ("%UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% "
           "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %ROUTE_NAME% %REQ(USER-AGENT):4% %RESP(CONTENT-TYPE)% "
           "%RESP(X-MISSING)% %REQ(X-MISSING?USER-AGENT)% %REQ(:AUTHORITY)% %REQUEST_DURATION% "
           "%RESPONSE_DURATION% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %PROTOCOL% 100%")
    assert compile_format(fmt)(filled()) == (
        "b.service 127.0.1.1:43210 127.0.3.1:80 127.0.1.1 r1 curl text/plain - curl/8.5.0 b.service:80 - - 1 "
        "HTTP/1.1 100%")


def test_start_time_custom_strftime():
    f = compile_format("%START_TIME(%Y/%m/%d %H:%M:%S.%3f)%|%START_TIME(%s)%|%START_TIME(%E6S)%")
    assert f(filled()) == "2026/11/28 19:00:00.123|1795892400|00.123456"
    # the cached seconds part follows the timestamp
    assert f(filled(start_time=1795892461.5)) == "2026/11/28 19:01:01.500|1795892461|01.500000"


def test_start_time_default_changes_across_seconds():
    f = compile_format("%START_TIME%")
    assert f(filled(start_time=1795892400.999)) == "2026-11-28T19:00:00.999Z"
    assert f(filled(start_time=1795892401.001)) == "2026-11-28T19:00:01.001Z"
    assert f(filled(start_time=1795892400.5)) == "2026-11-28T19:00:00.500Z"


def test_missing_prints_dash():
    info = RequestInfo(start_time=0.0, start_monotonic=0.0)
    f = compile_format("%UPSTREAM_HOST% %UPSTREAM_CLUSTER% %ROUTE_NAME% %REQ(X-A)% %RESP(X-B)% "
                       "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %RESPONSE_FLAGS% %DOWNSTREAM_REMOTE_ADDRESS%")
    assert f(info) == "- - - - - - - -"


def test_unknown_operator_is_an_error_naming_it():
    with pytest.raises(ValueError, match="NOT_AN_OPERATOR"):
        compile_format("[%START_TIME%] %NOT_AN_OPERATOR%")
    with pytest.raises(ValueError, match="REQ"):
        compile_format("%REQ%")


def test_logger_to_real_file_under_uvloop(tmp_path):
    path = tmp_path / "access.log"
    n = 10_000

    async def main() -> None:
        logger = AccessLogger(str(path), "%REQ(X-REQUEST-ID)% %RESPONSE_CODE%\n")
        await logger.start()
        for i in range(n):
            logger.log(filled(request_headers={"x-request-id": f"id-{i}"}))
            if i % 1000 == 0:
                await asyncio.sleep(0)
        logger.close()

    uvloop.run(main())
    lines = path.read_text().splitlines()
    assert lines == [f"id-{i} 200" for i in range(n)]


def test_default_format_to_file(tmp_path):
    path = tmp_path / "a.log"
    logger = AccessLogger(str(path))
    logger.log(filled())
    logger.close()
    assert path.read_text() == compile_format(DEFAULT_FORMAT)(filled())


def test_two_loggers_same_path_share_writer(tmp_path):
    path = tmp_path / "shared.log"
    a = AccessLogger(str(path), "a %RESPONSE_CODE%\n")
    b = AccessLogger(str(path), "b %RESPONSE_CODE%\n")
    for _ in range(100):
        a.log(filled())
        b.log(filled())
    a.close()
    b.log(filled())
    b.close()
    lines = path.read_text().splitlines()
    assert lines.count("a 200") == 100 and lines.count("b 200") == 101


def _pipe_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def test_stalled_pipe_never_blocks_the_loop():
    r, w = os.pipe()
    pipe_size = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
    total = 4000
    fmt = "%REQ(X-REQUEST-ID)% " + "x" * 100 + "\n"  # ~110 bytes a line: ~440 KB, far more than the pipe holds

    async def main() -> AccessLogger:
        loop = asyncio.get_running_loop()
        logger = AccessLogger(f"/proc/self/fd/{w}", fmt)
        await logger.start()
        for i in range(total):
            logger.log(filled(request_headers={"x-request-id": f"id-{i}"}))
            if i % 200 == 0:
                await asyncio.sleep(0)
        # wait until the pipe is full: the writer thread is now blocked in write()
        deadline = time.monotonic() + 5
        while _pipe_bytes(r) < pipe_size and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert _pipe_bytes(r) == pipe_size
        # with the pipe full, logging still returns and timers still fire (no speed is asserted:
        # that belongs to `make bench`)
        for _ in range(10):
            fut = loop.create_future()
            loop.call_later(0.01, fut.set_result, None)
            for _ in range(50):
                logger.log(filled(request_headers={"x-request-id": "late"}))
            await asyncio.wait_for(fut, 10)
        assert _pipe_bytes(r) == pipe_size  # still nobody read: it really was stalled throughout
        return logger

    # In a thread: a log() that blocked on the stalled pipe fails the test instead of hanging it (a
    # thread stuck in write() never runs a timeout's signal handler); the reader below unblocks it.
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["logger"] = uvloop.run(main())
        except BaseException as exc:  # re-raised in the test's thread below
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(60)
    blocked = runner.is_alive()

    chunks: list[bytes] = []

    def reader() -> None:
        while True:
            b = os.read(r, 65536)
            if not b:
                return
            chunks.append(b)

    t = threading.Thread(target=reader)
    t.start()
    runner.join(10)
    assert not blocked, "the event loop blocked on the stalled pipe"
    if "error" in outcome:
        raise outcome["error"]
    logger = outcome["logger"]
    logger.close(timeout=10)
    os.close(w)
    t.join(10)
    os.close(r)
    lines = b"".join(chunks).decode().splitlines()
    expected = [f"id-{i} " + "x" * 100 for i in range(total)] + ["late " + "x" * 100] * 500
    assert lines == expected
    assert logger.dropped == 0


def test_queued_lines_flushed_at_exit_without_close(tmp_path):
    path = tmp_path / "exit.log"
    code = ("from sidecar.access_log import AccessLogger\n"
            "from tests.test_access_log import filled\n"
            f"lg = AccessLogger({str(path)!r}, '%RESPONSE_CODE%\\n')\n"
            "for _ in range(1000):\n    lg.log(filled())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
    assert path.read_text().splitlines() == ["200"] * 1000


def _fd_of(path: str) -> int:
    """The descriptor this process holds open on ``path`` (the writer's own, found from outside)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == path:
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"{path} is not open")


def test_writer_survives_write_errors_and_counts_drops(tmp_path, caplog):
    path = str(tmp_path / "failing.log")
    logger = AccessLogger(path, "%REQ(X-REQUEST-ID)%\n")
    asyncio.run(logger.start())
    fd = _fd_of(path)
    saved = os.dup(fd)

    def log(tag: str, n: int) -> None:
        for i in range(n):
            logger.log(filled(request_headers={"x-request-id": f"{tag}-{i}"}))
        assert logger.flush(5)

    caplog.set_level("WARNING", logger="sidecar.access_log")
    try:
        log("before", 2)
        # The same descriptor now refuses writes: first with an errno nobody plans for (EINVAL, an eventfd
        # wants 8-byte writes), then with ENOSPC (/dev/full); the lines are lost, the writer must not be.
        efd = os.eventfd(0)
        os.dup2(efd, fd)
        os.close(efd)
        log("einval", 3)
        assert logger.dropped == 3
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        log("enospc", 2)
        assert logger.dropped == 5
        os.dup2(saved, fd)  # the destination recovers
        log("after", 2)
    finally:
        os.close(saved)
        logger.close()
    assert [ln for ln in open(path).read().splitlines()] == ["before-0", "before-1", "after-0", "after-1"]
    assert any(r.levelname == "ERROR" and "write failed" in r.getMessage() for r in caplog.records), caplog.text
    assert any(r.levelname == "WARNING" and "writing again" in r.getMessage() and "5 lines dropped" in r.getMessage()
               for r in caplog.records), caplog.text


# --- written by the event loop (no thread) --------------------------------------------------------------------------


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_loop_writes_a_file_within_the_flush_interval_without_a_thread(tmp_path):
    """A lone line (far below FLUSH_BYTES) reaches the file on the loop's timer; no writer thread exists."""
    path = tmp_path / "timer.log"
    threads_before = threading.active_count()

    async def main() -> None:
        logger = AccessLogger(str(path), "%REQ(X-REQUEST-ID)%\n")
        await logger.start()
        logger.log(filled(request_headers={"x-request-id": "only"}))
        await _until(lambda: path.read_text() == "only\n")
        assert logger._sink.thread is None and threading.active_count() == threads_before
        logger.close()

    uvloop.run(main())
    assert path.read_text() == "only\n"


def test_loop_mode_survives_write_errors_and_counts_drops(tmp_path, caplog):
    """The loop's writer drops and counts what a failing destination refuses, reports once, recovers."""
    path = str(tmp_path / "failing-loop.log")
    caplog.set_level("WARNING", logger="sidecar.access_log")

    async def main() -> AccessLogger:
        logger = AccessLogger(path, "%REQ(X-REQUEST-ID)%\n")
        await logger.start()
        fd = _fd_of(path)
        saved = os.dup(fd)
        try:
            logger.log(filled(request_headers={"x-request-id": "before"}))
            await _until(lambda: open(path).read() == "before\n")
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
            for i in range(3):
                logger.log(filled(request_headers={"x-request-id": f"lost-{i}"}))
            await _until(lambda: logger.dropped == 3)
            os.dup2(saved, fd)
            logger.log(filled(request_headers={"x-request-id": "after"}))
            await _until(lambda: open(path).read() == "before\nafter\n")
        finally:
            os.close(saved)
        assert logger._sink.thread is None
        return logger

    logger = uvloop.run(main())
    logger.close()
    assert open(path).read() == "before\nafter\n"
    assert logger.dropped == 3
    assert any(r.levelname == "ERROR" and "write failed" in r.getMessage() for r in caplog.records), caplog.text
    assert any(r.levelname == "WARNING" and "writing again" in r.getMessage() for r in caplog.records), caplog.text


def test_loop_mode_leaves_the_shared_pipe_description_blocking():
    """O_NONBLOCK goes on a description of our own: whoever shares the pipe's (the supervisor, a terminal) keeps
    blocking writes."""
    r, w = os.pipe()

    async def main() -> None:
        logger = AccessLogger(f"/proc/self/fd/{w}", "%RESPONSE_CODE%\n")
        await logger.start()
        assert logger._sink.loop is not None and logger._sink.out_fd != logger._sink.fd
        assert os.get_blocking(logger._sink.fd) and os.get_blocking(w)
        assert not os.get_blocking(logger._sink.out_fd)
        logger.log(filled())
        await _until(lambda: _pipe_bytes(r) == 4)
        logger.close()

    try:
        uvloop.run(main())
        assert os.read(r, 100) == b"200\n"
    finally:
        os.close(r)
        os.close(w)
