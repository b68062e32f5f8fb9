"""A small Chrome DevTools Protocol client for tests: a real headless Chromium, driven over its websocket.

No dependency beyond what meshctl already has (aiohttp's websocket client, the standard library). The API is
synchronous, for plain pytest tests: each call runs the protocol exchange on the Browser's own event loop.

    with Browser(1400, 900) as b:
        b.navigate(url)
        b.wait_for("document.querySelector('#graph .node') !== null")
        b.screenshot(path)

Also the driver of `make dashboard-shot`: ``python -m tests.browser dashboard-shot -p MESH --out docs/dashboard.png``
starts ``meshctl dashboard`` on a free port, waits until the page draws the mesh's traffic and writes the PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser")
DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools command failed, or a wait timed out."""


def find_chromium() -> str | None:
    """The Chromium binary on PATH (Debian's ``chromium``, Ubuntu's ``chromium-browser``), or None."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


class _LineReader:
    """Drains a pipe in a thread: lines go to a queue (so a caller can wait for one with a deadline) and the
    last ones are kept for error messages. Draining to the end matters: Chromium logs to stderr all its life and
    would block on a full pipe."""

    def __init__(self, stream: Any, keep: int = 40) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for raw in stream:
            line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            self.tail.append(line.rstrip("\n"))
            self.lines.put(line)
        self.lines.put(None)  # end of the stream: the process closed it (exited)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The first line matching ``pattern`` within ``timeout`` seconds; None at the deadline or at EOF."""
        deadline = time.monotonic() + timeout
        while not self._eof and (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self._eof = True
                return None
            if m := pattern.search(line):
                return m
        return None

    def text(self) -> str:
        return "\n".join(self.tail)


class Browser:
    """One headless Chromium with one page, its window ``width`` x ``height`` CSS pixels (screenshots too).

    Chromium runs in a session (process group) of its own and a fresh profile directory: ``close()`` ends that
    group and removes the profile, whatever state the browser is in. Use it as a context manager.
    """

    def __init__(self, width: int = 1400, height: int = 900, binary: str | None = None,
                 start_timeout: float = 30.0, command_timeout: float = 30.0) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
        self.width, self.height = width, height
        self.command_timeout = command_timeout
        self.profile = Path(tempfile.mkdtemp(prefix="meshctl-chromium-"))
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0
        self._closed = False
        args = [binary, "--headless=new", "--disable-gpu", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                # quiet and offline: no first-run UI, no calls home (CI has network only to package registries)
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--mute-audio",
                "--hide-scrollbars"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        args.append("about:blank")
        # Its own session: close() can end Chromium's whole process tree (zygote, renderers, GPU process) by
        # process group, without looking at anybody else's processes.
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError:
            shutil.rmtree(self.profile, ignore_errors=True)
            self._loop.close()
            raise
        self._stderr = _LineReader(self.proc.stderr)
        try:
            self._start(start_timeout)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------------
    # start-up

    def _start(self, timeout: float) -> None:
        m = self._stderr.wait_for(DEVTOOLS_LINE, timeout)
        if m is None:
            state = f"exited {self.proc.returncode}" if self.proc.poll() is not None else f"no line in {timeout:g} s"
            raise BrowserError(f"Chromium did not open DevTools ({state}); its stderr:\n{self._stderr.text()}")
        browser_ws = urllib.parse.urlsplit(m.group(1))
        target = self._new_target(f"http://{browser_ws.netloc}")
        self._loop.run_until_complete(self._connect(target["webSocketDebuggerUrl"]))
        # The viewport exactly the window size at scale 1: screenshots are width x height pixels on any display.
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.enable")
        self.call("Runtime.enable")

    @staticmethod
    def _new_target(http_base: str) -> dict[str, Any]:
        """A new page target. Chromium >= 111 wants PUT /json/new (GET answers 405); older ones only have GET."""
        url = f"{http_base}/json/new?about:blank"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as err:
            if err.code not in (404, 405):
                raise
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)

    async def _connect(self, ws_url: str) -> None:
        self._session = aiohttp.ClientSession()
        # max_msg_size 0: a screenshot's base64 is several MB, above aiohttp's 4 MB default.
        self._ws = await self._session.ws_connect(ws_url, max_msg_size=0)

    # ------------------------------------------------------------------------------------------------------
    # the protocol

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive meanwhile are dropped (this client
        waits on conditions by polling the page, not on events)."""
        if self._closed or self._ws is None:
            raise BrowserError("the browser is closed")
        return self._loop.run_until_complete(self._call(method, params or {}, timeout or self.command_timeout))

    async def _call(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self._ws is not None
        self._next_id += 1
        mid = self._next_id
        await self._ws.send_json({"id": mid, "method": method, "params": params})
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await self._ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise BrowserError(f"DevTools connection ended ({msg.type.name}) during {method}; "
                                           f"Chromium's stderr:\n{self._stderr.text()}")
                    data = json.loads(msg.data)
                    if data.get("id") != mid:
                        continue
                    if "error" in data:
                        raise BrowserError(f"{method}: {data['error'].get('message')} {data['error'].get('data', '')}")
                    return data.get("result", {})
        except TimeoutError:
            raise BrowserError(f"{method}: no answer within {timeout:g} s") from None

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited); a thrown error raises."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            what = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error in {expression!r}: {what}")
        return result["result"].get("value")

    def wait_for(self, predicate: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll the JavaScript expression ``predicate`` until it is truthy; return that value. Errors while
        polling (the page still loading, an element not there yet) count as "not yet". On timeout the error
        says what was awaited, the last value or error, and the start of the page's text."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = self.evaluate(predicate, timeout=max(1.0, deadline - time.monotonic()))
                if last:
                    return last
            except BrowserError as err:
                last = err
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        try:
            text = self.evaluate("document.body ? document.body.innerText.slice(0, 500) : ''", timeout=5)
        except BrowserError as err:
            text = f"(unreadable: {err})"
        raise BrowserError(f"timed out after {timeout:g} s waiting for {predicate!r}; last: {last!r}; "
                           f"page text: {text!r}")

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        """Load ``url`` and wait until its document is complete (the new document, not the old one)."""
        result = self.call("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        want = json.dumps(url)
        self.wait_for(f"location.href === new URL({want}).href && document.readyState === 'complete'", timeout)

    def screenshot(self, path: Path | str) -> int:
        """Write the viewport as a PNG; returns its size in bytes."""
        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        Path(path).write_bytes(data)
        return len(data)

    # ------------------------------------------------------------------------------------------------------
    # the end

    def close(self) -> None:
        """End Chromium (its whole process group) and remove its profile. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run_until_complete(self._disconnect())
        finally:
            self._loop.close()
            self._stop_process_group()
            shutil.rmtree(self.profile, ignore_errors=True)

    async def _disconnect(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    def _stop_process_group(self) -> None:
        pgid = self.proc.pid  # start_new_session: Chromium leads a group of its own, its id the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            # Whatever of the group outlived the leader (or the leader itself, if SIGTERM was not enough).
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# PNG facts, without an imaging library


def png_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, the first one; ValueError if ``data`` is not a PNG."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def blank_png_size(browser: Browser) -> int:
    """The size of ``browser``'s screenshot of about:blank: what "nothing drawn" compresses to at its size."""
    with tempfile.TemporaryDirectory() as tmp:
        browser.navigate("about:blank")
        return browser.screenshot(Path(tmp) / "blank.png")


# ----------------------------------------------------------------------------------------------------------
# `meshctl dashboard` as a subprocess: its URL (with the access token) from the line it prints when listening

DASHBOARD_LINE = re.compile(r"^dashboard: (http://\S+)")
#: The page has drawn traffic: pods a and b, and the a -> b edge with a success figure.
SEED_DRAWN = ("(() => { const q = s => document.querySelector(s);"
              " const e = q('#graph g.edge[data-from=\"a\"][data-to=\"b\"]');"
              " return !!(q('#graph g.node[data-pod=\"a\"]') && q('#graph g.node[data-pod=\"b\"]')"
              " && e && e.dataset.success); })()")


class DashboardProcess:
    """``meshctl dashboard -p PROJECT --port 0`` (the kernel picks a free port: no race with other tests);
    ``url`` is the one it printed once listening, with its access token. ``stop()`` ends it by its pid."""

    def __init__(self, project: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 30.0, extra: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "meshctl", "dashboard", "-p", project, "--port", "0",
                                      *extra], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
        self._out = _LineReader(self.proc.stdout)
        m = self._out.wait_for(DASHBOARD_LINE, timeout)
        if m is None:
            self.stop()
            raise BrowserError(f"meshctl dashboard printed no URL within {timeout:g} s "
                               f"(exit {self.proc.returncode}):\n{self._out.text()}")
        self.url: str = m.group(1)

    def output(self) -> str:
        return self._out.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # its Ctrl-C: the server closes its streams and exits 0
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> DashboardProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shot(url: str, out_png: Path | str, wait_js: str = "true", width: int = 1400, height: int = 900,
         timeout: float = 60.0) -> int:
    """Open ``url`` in a fresh headless Chromium, wait until ``wait_js`` holds, write the viewport to
    ``out_png``; returns the PNG's size in bytes."""
    with Browser(width, height) as b:
        b.navigate(url, timeout)
        b.wait_for(wait_js, timeout)
        return b.screenshot(out_png)


def dashboard_shot(project: str, out_png: Path, width: int, height: int, timeout: float,
                   settle_s: float, panel: str | None = None) -> int:
    """The README's screenshot: the dashboard of ``project`` once its edge a -> b carries a success figure and
    its window holds ``settle_s`` seconds of traffic (full labels, rates not from a 1 s sliver); with ``panel``,
    that pod's side panel open (clicked, as a person would) and loaded."""
    with DashboardProcess(project) as dash:
        with Browser(width, height) as b:
            b.navigate(dash.url, timeout)
            b.wait_for(SEED_DRAWN, timeout)
            # measured_s, from the API the page itself reads (its cookie carries the token)
            b.wait_for(f"fetch('/api/view').then(r => r.json()).then(v => (v.measured_s || 0) >= {settle_s})",
                       timeout)
            if panel is not None:
                node = f"#graph g.node[data-pod={json.dumps(panel)}]"
                b.evaluate(f"document.querySelector('{node}')"
                           ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
                b.wait_for(f"(() => {{ const p = document.querySelector('#panel');"
                           f" return !p.hidden && p.dataset.pod === {json.dumps(panel)}"
                           f" && !p.textContent.includes('loading'); }})()", timeout)
            b.wait_for(SEED_DRAWN, timeout)  # drawn again from the newest view
            return b.screenshot(out_png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.browser", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_shot = sub.add_parser("shot", help="screenshot any URL once a JavaScript condition holds")
    p_shot.add_argument("url")
    p_shot.add_argument("out", type=Path)
    p_shot.add_argument("--wait", default="true", help="JavaScript expression to wait for (default: none)")
    p_dash = sub.add_parser("dashboard-shot", help="screenshot `meshctl dashboard` of the seed sidecar demo")
    p_dash.add_argument("-p", "--project", required=True)
    p_dash.add_argument("--out", type=Path, required=True)
    p_dash.add_argument("--settle", type=float, default=8.0, help="seconds of traffic in the window first")
    p_dash.add_argument("--panel", metavar="POD", help="open this pod's side panel first")
    for p in (p_shot, p_dash):
        p.add_argument("--size", default="1400x900", help="WIDTHxHEIGHT (default 1400x900)")
        p.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, a kill) as an exit: the context managers then stop Chromium (in a session of its own)
    # and the dashboard, which would otherwise outlive this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    width, height = (int(v) for v in args.size.lower().split("x"))
    if find_chromium() is None:
        print("no Chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    try:
        if args.cmd == "shot":
            size = shot(args.url, args.out, args.wait, width, height, args.timeout)
        else:
            size = dashboard_shot(args.project, args.out, width, height, args.timeout, args.settle, args.panel)
    except BrowserError as err:
        print(f"screenshot failed: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {width}x{height} PNG, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
