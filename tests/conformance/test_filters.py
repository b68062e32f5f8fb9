"""Conformance: the fault filter (header-controlled, per-route, delay then abort, the route timeout after a
delay, before routing) and the local rate limit, on tests/conformance/envoy_filters.yaml."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import HERE, Pair, Probe, check, start_pair, with_stats

FILTER_STATS = ("http.ingress.fault.", "rl.http_local_rate_limit.")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    yield from start_pair(Path(tmp_path_factory.mktemp("conformance_filters")), HERE / "envoy_filters.yaml")


with_filter_stats = with_stats(*FILTER_STATS)


@with_filter_stats
def fault_header_abort(p: Probe) -> None:
    p.exchange("GET", "/x", "plain.test", headers=[("x-envoy-fault-abort-request", "418")], local=True)


@with_filter_stats
def fault_header_abort_percentage_zero(p: Probe) -> None:
    p.exchange("GET", "/x", "plain.test", headers=[("x-envoy-fault-abort-request", "418"),
                                                    ("x-envoy-fault-abort-request-percentage", "0")])


@with_filter_stats
def fault_header_abort_bad_status(p: Probe) -> None:
    p.exchange("GET", "/x", "plain.test", headers=[("x-envoy-fault-abort-request", "99")])


@with_filter_stats
def fault_header_abort_no_route(p: Probe) -> None:
    """The fault filter runs before the router: a request no route matches is aborted all the same."""
    p.exchange("GET", "/x", "nobody.test", headers=[("x-envoy-fault-abort-request", "429")], local=True)


@with_filter_stats
def fault_header_delay(p: Probe) -> None:
    t0 = time.monotonic()
    p.exchange("GET", "/x", "plain.test", headers=[("x-envoy-fault-delay-request", "200")])
    p.timing("elapsed", time.monotonic() - t0, 0.18, 0.6)
    p.upstream("")


@with_filter_stats
def fault_route_abort(p: Probe) -> None:
    p.exchange("GET", "/abort", "plain.test", local=True)


@with_filter_stats
def fault_route_delay_then_abort(p: Probe) -> None:
    t0 = time.monotonic()
    p.exchange("GET", "/delay-abort", "plain.test", local=True)
    p.timing("elapsed", time.monotonic() - t0, 0.18, 0.6)


@with_filter_stats
def fault_delay_then_route_timeout(p: Probe) -> None:
    """A 0.2 s delay, then a 0.3 s route timeout that starts after it: the upstream's 0.2 s answer is in time."""
    t0 = time.monotonic()
    p.exchange("GET", "/delay/0.2", "plain.test")
    p.timing("elapsed", time.monotonic() - t0, 0.38, 0.8)


@with_filter_stats
def local_rate_limit(p: Probe) -> None:
    for i in range(5):
        p.exchange("GET", "/x", "plain.test", key=f"r{i}", edge=True, local=i >= 3)


SCENARIOS = [fault_header_abort, fault_header_abort_percentage_zero, fault_header_abort_bad_status,
             fault_header_abort_no_route, fault_header_delay, fault_route_abort, fault_route_delay_then_abort,
             fault_delay_then_route_timeout, local_rate_limit]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_filters(pair: Pair, scenario) -> None:  # noqa: ANN001
    check(pair, scenario.__name__, scenario)
