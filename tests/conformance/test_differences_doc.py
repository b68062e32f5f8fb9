"""docs/envoy-differences.md is the suite's list of known differences: every row names a real scenario."""

from __future__ import annotations

from tests.conformance import (
    test_http1,
    test_resilience_cluster,
    test_retries,
    test_routing,
    test_shaping,
    test_tracing,
)
from tests.conformance.harness import DIFFERENCES, documented_differences


def test_every_documented_difference_names_a_scenario() -> None:
    scenarios = {*test_routing.SCENARIOS, *test_retries.SCENARIOS, *test_http1.SCENARIOS,
                 *(s.__name__ for s in test_shaping.SCENARIOS), *test_resilience_cluster.SCENARIOS,
                 *test_tracing.SCENARIOS}
    documented = documented_differences()
    assert documented, f"no difference rows parsed from {DIFFERENCES}"
    unknown = sorted(set(documented) - scenarios)
    assert not unknown, f"{DIFFERENCES.name} lists scenarios the suite does not have: {unknown}"
    for name, rows in documented.items():
        keys = [d.key for d in rows]
        assert len(keys) == len(set(keys)), f"{name}: an observation is listed twice"


def test_at_least_40_scenarios() -> None:
    assert len({*test_routing.SCENARIOS, *test_retries.SCENARIOS, *test_http1.SCENARIOS}) >= 40
