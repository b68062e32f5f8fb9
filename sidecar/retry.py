"""Envoy's retry semantics for one request: which outcomes retry, how many times, how long to wait.

The policy comes from the route (else its virtual host) and may be widened
per request by the ``x-envoy-retry-on`` / ``x-envoy-max-retries`` /
``x-envoy-retriable-status-codes`` headers, as Envoy allows.
"""

from __future__ import annotations

import random

from sidecar.config import RetryPolicy
from sidecar.http1 import Headers

#: Failures that happen before a response head arrives.
CONNECT_FAILURE = "connect-failure"
RESET = "reset"
PER_TRY_TIMEOUT = "per-try-timeout"

_GATEWAY_CODES = (502, 503, 504)


class RetryState:
    __slots__ = ("retry_on", "codes", "retries_left", "base", "max", "attempt_retries", "per_try_timeout_s",
                 "host_selection_attempts")

    def __init__(self, policy: RetryPolicy | None, headers: Headers) -> None:
        if policy is not None:
            self.retry_on = policy.retry_on
            self.codes = policy.retriable_status_codes
            self.retries_left = policy.num_retries if policy.retry_on else 0
            self.per_try_timeout_s = policy.per_try_timeout_s
            self.base = policy.backoff_base_s
            self.max = policy.backoff_max_s or policy.backoff_base_s * 10
            self.host_selection_attempts = policy.host_selection_retry_max_attempts
        else:
            self.retry_on = frozenset()
            self.codes = frozenset()
            self.retries_left = 0
            self.per_try_timeout_s = None
            self.base = 0.025
            self.max = 0.25
            self.host_selection_attempts = 1
        self.attempt_retries = 0
        if headers:
            self._apply_headers(policy, headers)

    def _apply_headers(self, policy: RetryPolicy | None, headers: Headers) -> None:
        """Per-request overrides, as Envoy honours them from trusted callers."""
        retry_on = set(self.retry_on)
        codes = set(self.codes)
        header_max: int | None = None
        header_retry_on = False
        for name, value in headers:
            if name[:8] != b"x-envoy-":
                continue
            if name == b"x-envoy-retry-on":
                retry_on.update(t.strip() for t in value.decode("latin-1").split(",") if t.strip())
                header_retry_on = True
            elif name == b"x-envoy-max-retries" and value.strip().isdigit():
                header_max = int(value)
            elif name == b"x-envoy-retriable-status-codes":
                codes.update(int(t) for t in value.decode("latin-1").split(",") if t.strip().isdigit())
            elif name == b"x-envoy-upstream-rq-per-try-timeout-ms" and value.strip().isdigit():
                self.per_try_timeout_s = int(value) / 1000 or None
        num = policy.num_retries if policy else 0
        if header_max is not None:
            num = header_max
        elif policy is None and header_retry_on:
            num = 1  # Envoy's default num_retries
        self.retry_on = frozenset(retry_on)
        self.codes = frozenset(codes)
        self.retries_left = num if self.retry_on else 0

    def status_retriable(self, status: int) -> bool:
        on = self.retry_on
        if not on:
            return False
        if status >= 500 and "5xx" in on:
            return True
        if status in _GATEWAY_CODES and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        return "retriable-status-codes" in on and status in self.codes

    def failure_retriable(self, kind: str) -> bool:
        on = self.retry_on
        if not on:
            return False
        if "5xx" in on or "gateway-error" in on:
            return True  # Envoy: both include connect failures, resets and per-try timeouts
        if kind == CONNECT_FAILURE:
            return "connect-failure" in on or "reset" in on
        if kind == RESET:
            return "reset" in on
        return False

    def backoff_s(self) -> float:
        """Full jitter: uniform in [0, min(max, base * (2^n - 1))] for the n-th retry."""
        n = self.attempt_retries
        return random.uniform(0, min(self.max, self.base * ((1 << n) - 1)))
