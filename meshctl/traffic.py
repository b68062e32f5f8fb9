"""``meshctl traffic``: send N requests and group the answers the way the seed does.

The seed's ``curl ... | sort | uniq -w 24 -c`` groups bodies by a prefix; we
group by status + body with volatile numbers masked, so "nounce 1008262846"
and "nounce 3494557023" fall into one group.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

_VOLATILE = re.compile(r"\b(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\d{4,})\b", re.I)
BODY_WIDTH = 100


def mask_body(body: str) -> str:
    """One line, numbers that change per request replaced by <n>."""
    text = " ".join(body.split())
    text = _VOLATILE.sub("<n>", text)
    return text if len(text) <= BODY_WIDTH else text[: BODY_WIDTH - 1] + "…"


@dataclass
class Report:
    target: str
    requests: int = 0
    duration_s: float = 0.0
    status: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    groups: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def success_ratio(self) -> float:
        ok = sum(n for code, n in self.status.items() if 200 <= code < 400)
        return ok / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target, "requests": self.requests, "duration_s": round(self.duration_s, 4),
            "rps": round(self.requests / self.duration_s, 1) if self.duration_s else 0.0,
            "success_ratio": round(self.success_ratio, 4),
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": dict(self.errors),
            "groups": [{"count": n, "status": s, "body": b} for (s, b), n in self.groups.most_common()],
        }

    def render(self) -> str:
        rps = self.requests / self.duration_s if self.duration_s else 0.0
        lines = [f"{self.requests} requests to {self.target} in {self.duration_s:.2f}s ({rps:.0f} rps)", "",
                 f"{'count':>7} {'%':>6}  {'status':<7} body"]
        for (status, body), n in self.groups.most_common():
            lines.append(f"{n:>7} {100 * n / self.requests:>5.1f}%  {status:<7} {body}")
        lines.append("")
        lines.append(f"success: {100 * self.success_ratio:.1f}%")
        return "\n".join(lines)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "reset"
    return type(exc).__name__


async def run(url: str, n: int, concurrency: int = 10, timeout_s: float = 10.0,
              max_duration_s: float = 300.0) -> Report:
    """Closed model: ``concurrency`` workers share ``n`` requests (bounded by time too)."""
    report = Report(target=url)
    remaining = n
    deadline = time.monotonic() + max_duration_s
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            try:
                async with session.get(url) as resp:
                    body = await resp.text(errors="replace")
                    report.status[resp.status] += 1
                    report.groups[(str(resp.status), mask_body(body))] += 1
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                kind = _error_kind(exc)
                report.errors[kind] += 1
                report.groups[("error", kind)] += 1
            report.requests += 1

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    start = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(max(1, min(concurrency, n)))))
    report.duration_s = time.monotonic() - start
    return report
