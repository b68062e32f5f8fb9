"""Readiness follows the probe for a process's whole life, not only until it is first ready."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import wait_for

#: Answers /ready with 503 while the flag file exists, 200 otherwise.
FLAGGED_SERVER = """
import http.server, os, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        down = self.path == "/ready" and os.path.exists(sys.argv[2])
        self.send_response(503 if down else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer((sys.argv[1], 8000), Handler).serve_forever()
"""


def _ready(meshctl, project: str) -> bool:
    return meshctl.ps(project)["processes"][0]["ready"]


def test_a_failing_probe_turns_a_ready_process_unready_and_back(meshctl):
    server = Path(meshctl.workdir) / "flagged.py"
    server.write_text(FLAGGED_SERVER)
    flag = Path(meshctl.workdir) / "unready"
    topo = meshctl.write("ready.yaml", f"""
        pods:
          flagged:
            ip: 127.0.218.1
            service:
              command: [python, "{server}", "${{POD_IP}}", "{flag}"]
              ready: {{http: /ready, port: 8000}}
    """)
    meshctl.up(topo, "readyflip")
    assert _ready(meshctl, "readyflip")
    flag.touch()
    assert wait_for(lambda: not _ready(meshctl, "readyflip"), 10, interval=0.2)
    proc = meshctl.ps("readyflip")["processes"][0]
    assert proc["state"] == "running" and proc["restarts"] == 0  # unready is not dead: nothing restarts
    flag.unlink()
    assert wait_for(lambda: _ready(meshctl, "readyflip"), 10, interval=0.2)
