"""The trace collector process alone (`python -m meshctl.tracing.collector`): Zipkin's intake and query API,
its bounds, bad bodies, forwarding to a Zipkin and to an OTLP/HTTP receiver, and its /metrics."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, wait_until

NOW_US = int(time.time() * 1e6)
T1 = "4bf92f3577b34da6a3ce929d0e0e4736"
T2 = "0af7651916cd43dd8448eb211c80319c"


class Collector:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "meshctl.tracing.collector", "--listen",
                                      f"127.0.0.1:{self.port}", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: self.proc.poll() is not None or self._up(), "the collector's /health")
        assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""

    def _up(self) -> bool:
        try:
            return self.request("GET", "/health")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode()

    def post(self, spans: Any, **headers: str) -> tuple[int, Any]:
        body = spans if isinstance(spans, bytes) else json.dumps(spans).encode()
        return self.request("POST", "/api/v2/spans", body, {"Content-Type": "application/json", **headers})

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    started: list[Collector] = []
    yield started
    for c in started:
        c.stop()


def start(collectors: list[Collector], *args: str) -> Collector:
    c = Collector(*args)
    collectors.append(c)
    return c


def span(trace: str, sid: str, service: str, *, parent: str | None = None, kind: str = "SERVER", ts: int = 0,
         duration: int = 1000, name: str = "get /", **tags: str) -> dict[str, Any]:
    out: dict[str, Any] = {"traceId": trace, "id": sid, "kind": kind, "name": name, "timestamp": NOW_US + ts,
                           "duration": duration, "localEndpoint": {"serviceName": service, "ipv4": "127.0.2.1"}}
    if parent:
        out["parentId"] = parent
    if tags:
        out["tags"] = tags
    return out


# --------------------------------------------------------------------------- intake and query API


def test_spans_in_traces_out_as_zipkin_answers(collectors):
    c = start(collectors)
    status, body = c.post([span(T1, "00f067aa0ba902b7", "A", name="ingress"),
                           span(T1, "00f067aa0ba902b8", "a", parent="00f067aa0ba902b7", kind="CLIENT", ts=10,
                                **{"http.status_code": "500"}),
                           span(T2.upper(), "1", "b", ts=5_000, name="GET /")])
    assert (status, body) == (202, None)

    status, traces = c.get("/api/v2/traces")
    assert status == 200
    assert [t[0]["traceId"] for t in traces] == [T2, T1]  # newest first; ids lower-case
    status, spans = c.get(f"/api/v2/trace/{T1}")
    assert status == 200 and [s["id"] for s in spans] == ["00f067aa0ba902b7", "00f067aa0ba902b8"]
    assert spans[0]["localEndpoint"] == {"serviceName": "a", "ipv4": "127.0.2.1"}  # service names lower-case
    assert spans[1]["tags"] == {"http.status_code": "500"} and spans[1]["parentId"] == "00f067aa0ba902b7"
    status, spans = c.get(f"/api/v2/trace/{T2}")
    assert spans[0]["id"] == "0000000000000001"  # span ids left-padded to 16 digits
    # A 64-bit id finds the 128-bit trace it is the low half of (Zipkin without strict trace ids).
    assert c.get(f"/api/v2/trace/{T1[16:]}")[1][0]["traceId"] == T1

    assert c.get("/api/v2/services") == (200, ["a", "b"])
    assert c.get("/api/v2/spans?serviceName=a") == (200, ["get /", "ingress"])
    assert c.get("/api/v2/traces?serviceName=b")[1][0][0]["traceId"] == T2
    assert c.get("/api/v2/traces?limit=1")[1][0][0]["traceId"] == T2
    assert c.get("/api/v2/traces?spanName=ingress")[1][0][0]["traceId"] == T1
    assert [t[0]["traceId"] for t in c.get("/api/v2/traces?minDuration=1000")[1]] == [T2, T1]
    # lookback and endTs in ms, as Zipkin: a window ending before both traces finds none.
    assert c.get(f"/api/v2/traces?endTs={NOW_US // 1000 - 60_000}&lookback=1000") == (200, [])
    assert c.get("/api/v2/traces?limit=0")[0] == 400
    assert c.get("/api/v2/traces?lookback=soon") == (400, {"error": "lookback must be a whole number, got 'soon'"})


def test_unknown_and_malformed_trace_ids(collectors):
    c = start(collectors)
    assert c.get(f"/api/v2/trace/{T1}") == (404, {"error": f"trace {T1} not found"})
    status, body = c.get("/api/v2/trace/not-hex")
    assert status == 400 and "not a trace id" in body["error"]
    assert c.get("/api/v2/spans")[0] == 400  # serviceName is required, as in Zipkin


def test_gzip_bodies_are_read(collectors):
    c = start(collectors)
    body = gzip.compress(json.dumps([span(T1, "a1", "a")]).encode())
    assert c.post(body, **{"Content-Encoding": "gzip"})[0] == 202
    assert c.get(f"/api/v2/trace/{T1}")[0] == 200


@pytest.mark.parametrize(("body", "reason"), [
    (b"[{", "body is not JSON"),
    (b'{"traceId": "a"}', "expected a JSON array of spans (Zipkin v2), got dict"),
    (b"[1]", "span 0: expected an object, got int"),
    (json.dumps([{"id": "1"}]).encode(), "span 0: traceId must be a hex string, got None"),
    (json.dumps([{"traceId": "xyz", "id": "1"}]).encode(), "span 0: traceId must be 1 to 32 hex digits"),
    (json.dumps([{"traceId": "1" * 33, "id": "1"}]).encode(), "span 0: traceId must be 1 to 32 hex digits"),
    (json.dumps([{"traceId": "0", "id": "1"}]).encode(), "span 0: traceId must not be all zeros"),
    (json.dumps([{"traceId": "1", "id": "1" * 17}]).encode(), "span 0: id must be 1 to 16 hex digits"),
    (json.dumps([{"traceId": "1", "id": "1", "kind": "SEVER"}]).encode(), "span 0: kind must be one of"),
    (json.dumps([{"traceId": "1", "id": "1", "timestamp": -5}]).encode(), "span 0: timestamp must be a non-negative"),
    (json.dumps([{"traceId": "1", "id": "1", "tags": {"a": [1]}}]).encode(), "span 0: tags.a must be a string"),
    (json.dumps([{"traceId": "1", "id": "1", "localEndpoint": {"port": 70000}}]).encode(),
     "span 0: localEndpoint.port must be a port number"),
    (json.dumps([span(T1, "1", "a"), {"traceId": "1", "id": "1", "annotations": [{"value": 3}]}]).encode(),
     "span 1: annotations[0] must be"),
    (b"[" * 100_000 + b"]" * 100_000, "body is not JSON"),
    (b"\xff\xfe", "body is not JSON"),
])
def test_malformed_bodies_are_a_400_with_the_reason_and_nothing_is_kept(collectors, body, reason):
    c = start(collectors)
    status, answer = c.post(body)
    assert status == 400 and reason in answer["error"], answer
    assert c.get("/api/v2/traces")[1] == []  # all or nothing: a bad span refuses the whole message
    assert c.proc.poll() is None and c.get("/health")[0] == 200
    m = c.metrics()
    assert m['meshctl_tracing_spans_dropped_total{reason="malformed"}'] == 1
    assert m['zipkin_collector_messages_dropped_total{transport="http"}'] == 1


def test_other_encodings_and_oversized_bodies_are_refused_without_reading_them(collectors):
    c = start(collectors, "--max-body", "2048")
    status, answer = c.post(b"\x0a\x01", **{"Content-Type": "application/x-protobuf"})
    assert status == 415 and "send Zipkin v2 JSON" in answer["error"]
    big = json.dumps([span(T1, f"{i:x}", "a") for i in range(1, 60)]).encode()
    assert len(big) > 2048
    status, answer = c.post(big)
    assert status == 413 and "over this collector's limit of 2048 bytes" in answer["error"]

    # Chunked, without a Content-Length: reading stops at the limit.
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=10)
    conn.putrequest("POST", "/api/v2/spans")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(big), 500):
        chunk = big[i:i + 500]
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 413
    conn.close()
    assert c.metrics()['meshctl_tracing_spans_dropped_total{reason="too_large"}'] == 2
    assert c.post([span(T1, "1", "a")])[0] == 202  # and it still takes what fits


def test_numbers_in_tags_become_strings_and_unknown_fields_are_ignored(collectors):
    c = start(collectors)
    raw = {**span(T1, "1", "a"), "tags": {"http.status_code": 200, "error": True}, "someNewField": {"x": 1},
           "parentId": "0000000000000000", "debug": True, "remoteEndpoint": {"serviceName": "", "port": 0}}
    assert c.post([raw])[0] == 202
    kept = c.get(f"/api/v2/trace/{T1}")[1][0]
    assert kept["tags"] == {"http.status_code": "200", "error": "true"}
    assert "someNewField" not in kept and "parentId" not in kept and "remoteEndpoint" not in kept
    assert kept["debug"] is True


# --------------------------------------------------------------------------- bounds


def test_the_oldest_reported_trace_is_evicted_and_counted(collectors):
    c = start(collectors, "--max-traces", "3")
    ids = [f"{i:032x}" for i in range(1, 6)]
    for i, tid in enumerate(ids[:3]):
        assert c.post([span(tid, "1", "a", ts=i)])[0] == 202
    # A late span of the first trace makes it the most recently reported: the second goes first.
    assert c.post([span(ids[0], "2", "a", parent="0000000000000001", ts=100)])[0] == 202
    assert c.post([span(ids[3], "1", "a", ts=3)])[0] == 202
    assert c.post([span(ids[4], "1", "a", ts=4)])[0] == 202
    kept = {t[0]["traceId"] for t in c.get("/api/v2/traces?limit=100")[1]}
    assert kept == {ids[0], ids[3], ids[4]}
    assert c.get(f"/api/v2/trace/{ids[1]}")[0] == 404
    m = c.metrics()
    assert m["meshctl_tracing_traces_evicted_total"] == 2
    assert m["meshctl_tracing_traces"] == 3 and m["meshctl_tracing_spans"] == 4
    assert m["meshctl_tracing_spans_received_total"] == 6


def test_a_full_trace_drops_further_spans_and_counts_them(collectors):
    c = start(collectors, "--max-spans-per-trace", "2")
    assert c.post([span(T1, f"{i}", "a", ts=i) for i in range(1, 6)] + [span(T2, "1", "b")])[0] == 202
    assert len(c.get(f"/api/v2/trace/{T1}")[1]) == 2
    assert len(c.get(f"/api/v2/trace/{T2}")[1]) == 1  # other traces are not affected
    m = c.metrics()
    assert m['meshctl_tracing_spans_dropped_total{reason="trace_full"}'] == 3
    assert m['zipkin_collector_spans_dropped_total{transport="http"}'] == 3
    assert m['zipkin_collector_spans_total{transport="http"}'] == 6


def test_many_traces_stay_within_the_bound(collectors):
    c = start(collectors, "--max-traces", "100")
    for batch in range(20):
        spans = [span(f"{batch * 50 + i + 1:032x}", "1", "a", ts=batch * 50 + i) for i in range(50)]
        assert c.post(spans)[0] == 202
    m = c.metrics()
    assert m["meshctl_tracing_traces"] == 100 and m["meshctl_tracing_traces_evicted_total"] == 900
    newest = c.get("/api/v2/traces?limit=1")[1][0][0]["traceId"]
    assert newest == f"{1000:032x}"


# --------------------------------------------------------------------------- forwarding


class Receiver:
    """A tiny HTTP server recording every POST body (an OTLP/HTTP endpoint, a failing upstream)."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.bodies.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                        "json": json.loads(body)})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_forwarding_to_a_zipkin_sends_every_span_in_batches(collectors):
    upstream = start(collectors)
    c = start(collectors, "--forward-zipkin", f"http://127.0.0.1:{upstream.port}/api/v2/spans",
              "--forward-batch", "40", "--forward-interval", "0.05")
    spans = [span(f"{i + 1:032x}", "1", "a", ts=i) for i in range(100)]
    assert c.post(spans[:50])[0] == 202 and c.post(spans[50:])[0] == 202
    wait_until(lambda: len(upstream.get("/api/v2/traces?limit=1000")[1]) == 100, "100 traces at the upstream")
    assert upstream.get(f"/api/v2/trace/{1:032x}")[1] == c.get(f"/api/v2/trace/{1:032x}")[1]
    m = c.metrics()
    assert m['meshctl_tracing_forward_spans_total{kind="zipkin",result="sent"}'] == 100
    assert m['meshctl_tracing_forward_batches_total{kind="zipkin"}'] >= 3  # at most 40 per batch
    assert m['meshctl_tracing_forward_spans_total{kind="zipkin",result="failed"}'] == 0


def test_forwarding_to_otlp_converts_to_resource_spans(collectors, receiver):
    c = start(collectors, "--forward-otlp", f"http://127.0.0.1:{receiver.port}/v1/traces",
              "--forward-interval", "0.05")
    client = span("a" * 16, "00f067aa0ba902b8", "a", parent="00f067aa0ba902b7", kind="CLIENT", ts=10,
                  duration=2000, **{"http.status_code": "500", "error": "true"})
    client["remoteEndpoint"] = {"serviceName": "b", "ipv4": "127.0.2.1", "port": 80}
    client["annotations"] = [{"timestamp": NOW_US + 500, "value": "cr"}]
    assert c.post([span(T1, "00f067aa0ba902b7", "b"), client])[0] == 202
    wait_until(lambda: receiver.bodies, "a batch at the OTLP receiver")
    sent = receiver.bodies[0]
    assert sent["path"] == "/v1/traces" and sent["type"] == "application/json"
    by_service = {r["resource"]["attributes"][0]["value"]["stringValue"]: r for r in sent["json"]["resourceSpans"]}
    assert set(by_service) == {"a", "b"}
    assert by_service["a"]["resource"]["attributes"][0]["key"] == "service.name"
    (otlp,) = by_service["a"]["scopeSpans"][0]["spans"]
    assert otlp["traceId"] == "0" * 16 + "a" * 16  # 64-bit trace ids padded to OTLP's 128 bits
    assert otlp["spanId"] == "00f067aa0ba902b8" and otlp["parentSpanId"] == "00f067aa0ba902b7"
    assert otlp["kind"] == 3  # SPAN_KIND_CLIENT
    assert otlp["startTimeUnixNano"] == str((NOW_US + 10) * 1000)
    assert otlp["endTimeUnixNano"] == str((NOW_US + 10 + 2000) * 1000)
    assert otlp["status"] == {"code": 2}
    attrs = {a["key"]: a["value"] for a in otlp["attributes"]}
    assert attrs["http.status_code"] == {"stringValue": "500"} and attrs["peer.service"] == {"stringValue": "b"}
    assert attrs["net.peer.port"] == {"intValue": "80"} and "error" not in attrs
    assert otlp["events"] == [{"timeUnixNano": str((NOW_US + 500) * 1000), "name": "cr"}]
    (server,) = by_service["b"]["scopeSpans"][0]["spans"]
    assert server["kind"] == 2 and server["traceId"] == T1 and "parentSpanId" not in server
    wait_until(lambda: c.metrics().get('meshctl_tracing_forward_spans_total{kind="otlp",result="sent"}') == 2,
               "the sent count")


def test_a_failing_upstream_is_counted_and_never_slows_intake(collectors):
    failing = Receiver(status=503)
    try:
        c = start(collectors, "--forward-zipkin", f"http://127.0.0.1:{failing.port}/api/v2/spans",
                  "--forward-interval", "0.05")
        assert c.post([span(T1, "1", "a")])[0] == 202
        wait_until(lambda: c.metrics().get('meshctl_tracing_forward_spans_total{kind="zipkin",result="failed"}') == 1,
                   "the failed count")
    finally:
        failing.close()
    # Nobody listens now: every batch fails to connect, intake answers as fast as ever.
    t0 = time.monotonic()
    for i in range(50):
        assert c.post([span(f"{i + 2:032x}", "1", "a")])[0] == 202
    assert time.monotonic() - t0 < 5
    assert c.get("/api/v2/trace/" + T1)[0] == 200  # the spans are still here


def test_a_full_forward_queue_drops_and_counts(collectors):
    port = free_port()  # nothing listens: the queue only drains by failing
    c = start(collectors, "--forward-zipkin", f"http://127.0.0.1:{port}/api/v2/spans", "--forward-queue", "10",
              "--forward-interval", "30")
    assert c.post([span(f"{i + 1:032x}", "1", "a") for i in range(25)])[0] == 202
    m = c.metrics()
    assert m['meshctl_tracing_forward_spans_total{kind="zipkin",result="dropped"}'] == 15
    assert m['meshctl_tracing_forward_queue{kind="zipkin"}'] == 10
    assert m["meshctl_tracing_traces"] == 25  # the collector itself kept them all


# --------------------------------------------------------------------------- the process


def test_metrics_are_prometheus_text(collectors):
    c = start(collectors)
    c.post([span(T1, "1", "a")])
    status, text = c.get("/metrics")
    assert status == 200
    for line in text.splitlines():
        assert re.fullmatch(r"# (HELP|TYPE) \w+ .+|\w+(\{[^}]*\})? [0-9.e+-]+", line), line
    assert 'zipkin_collector_spans_total{transport="http"} 1' in text


def test_sigterm_is_a_clean_exit(collectors):
    c = start(collectors)
    t0 = time.monotonic()
    assert c.stop() == 0
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "nowhere"], "expected HOST:PORT"),
    (["--listen", "127.0.0.1:1", "--max-traces", "0"], "expected a positive whole number"),
    (["--listen", "127.0.0.1:1", "--forward-otlp", "ftp://x"], "expected an http:// or https:// URL"),
    (["--listen", "127.0.0.1:1", "--forward-otlp", "http://x:1/", "--forward-zipkin", "http://x:1/"],
     "not allowed with argument"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "meshctl.tracing.collector", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_port_in_use_is_one_line_and_exit_1(collectors):
    c = start(collectors)
    proc = subprocess.run([sys.executable, "-m", "meshctl.tracing.collector", "--listen", f"127.0.0.1:{c.port}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 1 and "cannot listen on 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
