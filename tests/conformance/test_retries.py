"""Conformance: retry_on conditions, num_retries, timeouts, upstream failures and the x-envoy-* request headers.

Upstream behaviours by path (tests/upstreams.py and ConformanceUpstream): /flaky/<key>/<n>/<code> fails n times
with <code>, /flaky-reset/<key>/<n> resets n times, /delay/<s>, /status/<code>, /reset-before-headers,
/truncated, /reset-after-headers. Keys are per engine (each engine has its own upstream), so the same key works
on both.
"""

from __future__ import annotations

import pytest

from tests.conformance.harness import Pair, Probe, check

# --- retry_on ---------------------------------------------------------------------------------------------------


def retry_5xx_then_ok(p: Probe) -> None:
    p.exchange("GET", "/flaky/a/1/503", "r-5xx.test")
    p.upstream("")


def retry_5xx_exhausted(p: Probe) -> None:
    """num_retries 2: three attempts, then the last 503 is the answer (URX)."""
    p.exchange("GET", "/status/503", "r-5xx.test", body=None)
    p.upstream("")


def retry_5xx_500(p: Probe) -> None:
    p.exchange("GET", "/flaky/b/2/500", "r-5xx.test")
    p.upstream("", headers=False)


def retry_5xx_covers_connect_failure(p: Probe) -> None:
    p.exchange("GET", "/dead/x", "r-5xx.test", local=True)


def retry_gateway_error(p: Probe) -> None:
    p.exchange("GET", "/flaky/c/1/502", "r-gw.test", key="502")
    p.upstream("502", headers=False)
    p.exchange("GET", "/status/500", "r-gw.test", key="500")  # not a gateway error: no retry
    p.upstream("500", headers=False)


def retry_retriable_4xx(p: Probe) -> None:
    p.exchange("GET", "/flaky/d/1/409", "r-4xx.test", key="409")
    p.upstream("409", headers=False)
    p.exchange("GET", "/status/404", "r-4xx.test", key="404")
    p.upstream("404", headers=False)


def retry_retriable_status_codes(p: Probe) -> None:
    p.exchange("GET", "/flaky/e/2/418", "r-codes.test", key="418")
    p.upstream("418", headers=False)
    p.exchange("GET", "/status/503", "r-codes.test", key="503")  # not listed: no retry
    p.upstream("503", headers=False)


def retry_reset(p: Probe) -> None:
    p.exchange("GET", "/flaky-reset/f/1", "r-reset.test")
    p.upstream("", headers=False)


def retry_reset_exhausted(p: Probe) -> None:
    p.exchange("GET", "/reset-before-headers", "r-reset.test", local=True)
    p.upstream("", headers=False)


def retry_reset_not_on_5xx(p: Probe) -> None:
    p.exchange("GET", "/status/503", "r-reset.test")
    p.upstream("", headers=False)


def retry_connect_failure(p: Probe) -> None:
    p.exchange("GET", "/x", "r-cf.test", local=True)


def retry_default_num_retries(p: Probe) -> None:
    """A virtual host retry policy without num_retries: Envoy's default of 1."""
    p.exchange("GET", "/status/503", "r-default.test")
    p.upstream("", headers=False)


# --- failures without retries -----------------------------------------------------------------------------------


def connect_failure(p: Probe) -> None:
    p.exchange("GET", "/x", "dead.test", local=True)


def reset_before_headers(p: Probe) -> None:
    p.exchange("GET", "/reset-before-headers", "plain.test", local=True)
    p.upstream("", headers=False)


def upstream_5xx_passed_through(p: Probe) -> None:
    p.exchange("GET", "/status/503", "plain.test")
    p.upstream("", headers=False)


def truncated_body(p: Probe) -> None:
    with p.conn() as c:
        c.send(p.req("GET", "/truncated", "plain.test"))
        p.response("", c.response())
        p.closed("after", c)


def reset_after_headers(p: Probe) -> None:
    with p.conn() as c:
        c.send(p.req("GET", "/reset-after-headers", "r-5xx.test"))  # too late to retry
        p.response("", c.response())
        p.closed("after", c)
    p.upstream("", headers=False)


# --- timeouts ---------------------------------------------------------------------------------------------------


def route_timeout(p: Probe) -> None:
    r = p.exchange("GET", "/delay/2", "timeout.test", local=True)
    p.timing("timing", r.elapsed, 0.28, 0.8)
    p.upstream("")


def per_try_timeout(p: Probe) -> None:
    """per_try_timeout 0.2 s, one retry: two attempts, then 504 UT after ~0.4 s (plus a backoff)."""
    r = p.exchange("GET", "/delay/2", "r-pertry.test", local=True)
    p.timing("timing", r.elapsed, 0.38, 1.0)
    p.upstream("")


def per_try_timeout_then_ok(p: Probe) -> None:
    p.exchange("GET", "/flaky/g/1/503", "r-pertry.test")
    p.upstream("", headers=False)


# --- x-envoy-* request headers ----------------------------------------------------------------------------------


def header_retry_on(p: Probe) -> None:
    """x-envoy-retry-on without x-envoy-max-retries: one retry."""
    p.exchange("GET", "/status/503", "plain.test", headers=[("x-envoy-retry-on", "5xx")])
    p.upstream("")


def header_max_retries(p: Probe) -> None:
    p.exchange("GET", "/flaky/h/3/503", "plain.test", headers=[("x-envoy-retry-on", "5xx"),
                                                                 ("x-envoy-max-retries", "3")])
    p.upstream("")


def header_max_retries_widens_route(p: Probe) -> None:
    p.exchange("GET", "/flaky/i/3/503", "r-5xx.test", headers=[("x-envoy-max-retries", "3")])
    p.upstream("", headers=False)


def header_retriable_status_codes(p: Probe) -> None:
    p.exchange("GET", "/flaky/j/1/429", "plain.test",
               headers=[("x-envoy-retry-on", "retriable-status-codes"), ("x-envoy-retriable-status-codes", "429")])
    p.upstream("", headers=False)


def header_rq_timeout_ms(p: Probe) -> None:
    r = p.exchange("GET", "/delay/2", "plain.test", headers=[("x-envoy-upstream-rq-timeout-ms", "200")], local=True)
    p.timing("timing", r.elapsed, 0.18, 0.7)
    p.upstream("")


def header_per_try_timeout_ms(p: Probe) -> None:
    r = p.exchange("GET", "/delay/2", "plain.test",
                   headers=[("x-envoy-retry-on", "5xx"), ("x-envoy-upstream-rq-per-try-timeout-ms", "150")],
                   local=True)
    p.timing("timing", r.elapsed, 0.28, 0.9)
    p.upstream("")


# --- the attempt count ------------------------------------------------------------------------------------------


def attempt_count_included(p: Probe) -> None:
    p.exchange("GET", "/flaky/k/1/503", "count.test")
    p.upstream("")


def attempt_count_not_included(p: Probe) -> None:
    p.exchange("GET", "/flaky/l/1/503", "r-5xx.test")
    p.upstream("")


SCENARIOS = {f.__name__: f for f in (
    retry_5xx_then_ok, retry_5xx_exhausted, retry_5xx_500, retry_5xx_covers_connect_failure, retry_gateway_error,
    retry_retriable_4xx, retry_retriable_status_codes, retry_reset, retry_reset_exhausted, retry_reset_not_on_5xx,
    retry_connect_failure, retry_default_num_retries, connect_failure, reset_before_headers,
    upstream_5xx_passed_through, truncated_body, reset_after_headers, route_timeout, per_try_timeout,
    per_try_timeout_then_ok, header_retry_on, header_max_retries, header_max_retries_widens_route,
    header_retriable_status_codes, header_rq_timeout_ms, header_per_try_timeout_ms, attempt_count_included,
    attempt_count_not_included,
)}


@pytest.mark.parametrize("name", SCENARIOS)
def test_retries(pair: Pair, name: str) -> None:
    check(pair, name, SCENARIOS[name])
