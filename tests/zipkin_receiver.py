"""A Zipkin receiver for tests: ``POST /api/v2/spans`` with a JSON array of Zipkin v2 spans, kept in memory.

Envoy sends its reports chunked, our sidecar with a Content-Length: both are read. ``status`` and ``delay``
make a failing or slow collector.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.conftest import free_port


class ZipkinReceiver:
    def __init__(self, ip: str, status: int = 202, delay: float = 0.0) -> None:
        self.spans: list[dict[str, Any]] = []
        self.posts = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if delay:
                    time.sleep(delay)
                with receiver.lock:
                    receiver.posts += 1
                    receiver.spans.extend(json.loads(body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port(ip)
        self.server = ThreadingHTTPServer((ip, self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["traceId"] == trace_id]

    def by_url(self, marker: str) -> dict[str, Any] | None:
        """The connection manager's span of the request whose URL carries ``marker``."""
        with self.lock:
            return next((s for s in self.spans if marker in s.get("tags", {}).get("http.url", "")), None)
