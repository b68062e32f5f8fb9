"""Conformance: distributed tracing (Envoy's Zipkin tracer) against the real Envoy 1.40, side by side.

Both engines run ``envoy_tracing.yaml`` and report to a Zipkin receiver of their own (a small HTTP server in this
module collecting the POSTed JSON arrays). Each scenario sends one request with (or without) a trace context and
records, normalised so that two engines can be compared:

- the context headers every upstream attempt received, with ids replaced by their role (``CALLER_TRACE``,
  ``CALLER_SPAN``, ``HCM``, ``A1``/``A2``: the connection manager's span and the attempts' spans);
- the reported spans of the request's trace: name, kind, parent (by role), ``shared``, annotations' values and
  tags (addresses and request ids normalised), without timestamps and durations;
- the HCM's ``tracing.*`` decision stats, plus the harness's usual access log fields and cluster/HCM stat deltas.

Differences are those listed in docs/envoy-differences.md (a malformed B3 context: Envoy stops tracing the request
and passes the bad headers on; we start a new trace and drop them).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml

from tests.conformance.harness import (
    HERE,
    Engine,
    Pair,
    Probe,
    RawConn,
    check,
    start_pair,
    wait_upstream,
    with_stats,
)
from tests.conftest import free_port
from tests.zipkin_receiver import ZipkinReceiver

TEMPLATE = HERE / "envoy_tracing.yaml"
CONTEXT_HEADERS = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
                   "traceparent", "tracestate")
#: Placeholders in a scenario's header values: the caller's ids, distinct per scenario (derived from its name) so
#: that each scenario's trace holds its own spans only.
T, S, P = "{T}", "{S}", "{P}"


def caller_ids(scenario: str) -> dict[str, str]:
    digest = hashlib.sha256(scenario.encode()).hexdigest()
    ids = {"T": digest[:32], "S": digest[32:48], "P": digest[48:64]}
    return {**ids, "T64": ids["T"][16:], "T30": ids["T"][:30], "TU": ids["T"].upper(), "SU": ids["S"].upper()}


class TracingEngine(Engine):
    """An engine of the pair with its own Zipkin receiver (on its upstream's alias)."""

    def __init__(self, kind: str, workdir: Path, template: Path = TEMPLATE) -> None:
        super().__init__(kind, workdir, template)
        self.zipkin = ZipkinReceiver(self.svc)
        #: The egress_spawn listener (OUTBOUND with spawn_upstream_span).
        self.spawn_port = free_port(self.ip)
        while self.spawn_port in (self.port, self.edge_port, self.admin_port):
            self.spawn_port = free_port(self.ip)
        self._names[str(self.spawn_port)] = "SPAWN_PORT"
        self._names_re = re.compile("|".join(re.escape(k) for k in sorted(self._names, key=len, reverse=True)))

    def render(self) -> dict[str, Any]:
        text = Template(self.template.read_text()).substitute(
            LISTEN=self.ip, PORT=self.port, EDGE_PORT=self.edge_port, SPAWN_PORT=self.spawn_port,
            ADMIN_PORT=self.admin_port, SVC=self.svc,
            DEAD=self.dead, UP_PORT=self.up_port, LOG=str(self.log_path), COLLECTOR=self.svc,
            COLLECTOR_PORT=self.zipkin.port)
        return yaml.safe_load(text)

    def stop(self) -> None:
        super().stop()
        self.zipkin.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    yield from start_pair(Path(tmp_path_factory.mktemp("conformance-tracing")), TEMPLATE, TracingEngine)


# --- observing a traced request ---------------------------------------------------------------------------------


class Roles:
    """Ids by role, so that two engines' random ids compare: the caller's, then the spans' in a fixed order."""

    def __init__(self, known: dict[str, str]) -> None:
        self.ids = dict(known)  # id -> role

    def add(self, ident: str | None, role: str) -> None:
        if ident and ident not in self.ids:
            self.ids[ident] = role

    def sub(self, text: str) -> str:
        for ident in sorted(self.ids, key=len, reverse=True):
            text = text.replace(ident, self.ids[ident])
        return text


def _span_view(span: dict[str, Any], roles: Roles, engine: Engine) -> str:
    tags = dict(span.get("tags", {}))
    if "guid:x-request-id" in tags:
        tags["guid:x-request-id"] = "<uuid>"
    view = {
        "name": span.get("name"), "kind": span.get("kind"), "id": roles.sub(span["id"]),
        "parentId": roles.sub(span.get("parentId", "(none)")), "shared": span.get("shared", False),
        "annotations": [a.get("value") for a in span.get("annotations", [])],
        "localEndpoint": {**span.get("localEndpoint", {}), "ipv4": "<ip>"},
        "tags": {k: engine.normalise(v) for k, v in sorted(tags.items())},
    }
    return json.dumps(view, sort_keys=True)


def traced(p: Probe, target: str, host: str, headers: list[tuple[str, str]] | None = None, spans: int = 2,
           edge: bool = False, known: dict[str, str] | None = None, spawn: bool = False) -> None:
    """Send one request (its path marked with the scenario's tag) and record what tracing made of it.

    ``edge``: to the OUTBOUND egress listener; ``spawn``: to the OUTBOUND egress_spawn one (spawn_upstream_span).
    """
    marker = f"scn={p.scenario}.{len(p.tags)}"
    path = target + ("&" if "?" in target else "?") + marker
    ids = caller_ids(p.scenario)
    headers = [(n, v.format(**ids)) for n, v in headers or []]
    if spawn:
        engine: TracingEngine = p.engine  # type: ignore[assignment]
        with RawConn(engine.ip, engine.spawn_port, engine.client_ip) as c:
            c.send(p.req("GET", path, host, headers))
            p.response("", c.response("GET"))
    else:
        p.exchange("GET", path, host, headers, edge=edge)
    tag = p.tags[-1]
    roles = Roles({ids["T"]: "CALLER_TRACE", ids["T"][16:]: "CALLER_TRACE64", ids["S"]: "CALLER_SPAN",
                   ids["P"]: "CALLER_PARENT", ids["T"].upper(): "CALLER_TRACE_UPPER",
                   ids["S"].upper(): "CALLER_SPAN_UPPER", **(known or {})})
    zipkin: ZipkinReceiver = p.engine.zipkin  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    hcm = zipkin.by_url(marker)
    while spans and hcm is None and time.monotonic() < deadline:
        time.sleep(0.02)
        hcm = zipkin.by_url(marker)
    reported: list[dict[str, Any]] = []
    if hcm is not None:
        while len(reported := zipkin.trace(hcm["traceId"])) < spans and time.monotonic() < deadline:
            time.sleep(0.02)
        trace_id = hcm["traceId"]
        roles.add(trace_id, "NEW_TRACE" if len(trace_id) == 32 else "NEW_TRACE64")
        roles.add(hcm["id"], "HCM")
        p.put("hcm id is the trace id's low 64 bits", str(hcm["id"] == trace_id[-16:]))
        attempts = sorted((s for s in reported if s is not hcm), key=lambda s: int(s["tags"].get("retry.count", 0)))
        for i, s in enumerate(attempts, 1):
            roles.add(s["id"], f"A{i}")
    p.put("spans reported", str(len(reported)))
    for s in sorted(reported, key=lambda s: roles.sub(s["id"])):
        p.put(f"span {roles.sub(s['id'])}", _span_view(s, roles, p.engine))
    for i, rec in enumerate(wait_upstream(p.engine.upstream, tag), 1):
        seen = {n.lower(): v for n, v in rec.headers}
        # an attempt's own span id, when its span was not reported (unsampled): by order of arrival
        span_id = seen.get("x-b3-spanid") or (seen.get("b3", "").split("-") + ["", ""])[1]
        roles.add(span_id, f"UPSTREAM_SPAN{i}")
        p.put(f"attempt {i} context", [f"{n}: {roles.sub(seen[n])}" for n in CONTEXT_HEADERS if n in seen])


# --- scenarios ----------------------------------------------------------------------------------------------------

def _hcm_stats(fn: Any) -> Any:
    return with_stats("http.ingress.tracing.", "http.egress.tracing.", "http.egress_spawn.tracing.")(fn)


@_hcm_stats
def no_context(p: Probe) -> None:
    """A new 128-bit trace, sampled (random_sampling 100 %): the SERVER span and one attempt span."""
    traced(p, "/ok", "svc.test")


@_hcm_stats
def traceparent_known(p: Probe) -> None:
    """The caller's W3C context: same trace, the SERVER span shares the caller's span id; tracestate passes."""
    traced(p, "/ok", "svc.test", [("traceparent", "00-{T}-{S}-01"), ("tracestate", "congo=t61rcWkgMzE")])


def traceparent_not_sampled(p: Probe) -> None:
    """flags 00: propagated unsampled, nothing reported (the next, sampled, request's spans arrive alone)."""
    traced(p, "/ok", "svc.test", [("traceparent", "00-{T}-{S}-00")], spans=0)
    traced(p, "/ok", "svc.test")


def traceparent_upper_case(p: Probe) -> None:
    """Envoy 1.40 reads upper-case hex (the W3C text says lower case) and writes lower case."""
    traced(p, "/ok", "svc.test", [("traceparent", "00-{TU}-{SU}-01")])


def b3_multi_known(p: Probe) -> None:
    traced(p, "/ok", "svc.test", [("x-b3-traceid", T), ("x-b3-spanid", S),
                                  ("x-b3-parentspanid", P), ("x-b3-sampled", "1")])


def b3_multi_64bit(p: Probe) -> None:
    """A 64-bit trace id stays 64-bit in x-b3-traceid; traceparent pads it."""
    traced(p, "/ok", "svc.test", [("x-b3-traceid", "{T64}"), ("x-b3-spanid", S), ("x-b3-sampled", "1")],
           )


def b3_single_known(p: Probe) -> None:
    """A single b3 header is answered with a single b3 header (and traceparent)."""
    traced(p, "/ok", "svc.test", [("b3", "{T}-{S}-1-{P}")])


def b3_sampled_0(p: Probe) -> None:
    traced(p, "/ok", "svc.test", [("x-b3-traceid", T), ("x-b3-spanid", S), ("x-b3-sampled", "0")],
           spans=0)
    traced(p, "/ok", "svc.test")


def b3_single_deny(p: Probe) -> None:
    """``b3: 0``: a new trace that keeps the caller's decision (not sampled)."""
    traced(p, "/ok", "svc.test", [("b3", "0")], spans=0)
    traced(p, "/ok", "svc.test")


def b3_flags_debug(p: Probe) -> None:
    """x-b3-flags: 1 (debug) means sampled; the header itself passes through."""
    traced(p, "/ok", "svc.test", [("x-b3-traceid", T), ("x-b3-spanid", S), ("x-b3-flags", "1")])


def b3_and_traceparent(p: Probe) -> None:
    """Both forms: B3 wins, traceparent is rewritten from it."""
    traced(p, "/ok", "svc.test", [("traceparent", "00-{T}-{S}-01"), ("x-b3-traceid", T),
                                  ("x-b3-spanid", S), ("x-b3-sampled", "1")])


def b3_trace_id_only(p: Probe) -> None:
    """A trace id without a span id is no context: a new trace, the header replaced."""
    traced(p, "/ok", "svc.test", [("x-b3-traceid", T), ("x-b3-sampled", "1")])


@pytest.mark.parametrize("value", [
    "00-{T30}-{S}-01",  # short trace id
    "00-" + "0" * 32 + "-{S}-01",  # zero trace id
    "00-{T}-" + "0" * 16 + "-01",  # zero span id
    "garbage",
], ids=["short", "zero-trace", "zero-span", "garbage"])
def test_malformed_traceparent_starts_a_new_trace(pair: Pair, value: str, request: pytest.FixtureRequest) -> None:
    def malformed_traceparent(p: Probe) -> None:
        traced(p, "/ok", "svc.test", [("traceparent", value)])
    check(pair, f"malformed_traceparent[{request.node.callspec.id}]", malformed_traceparent)


def malformed_b3(p: Probe) -> None:
    """A bad x-b3-traceid: a documented difference (Envoy: no trace, the bad headers passed on)."""
    traced(p, "/ok", "svc.test", [("x-b3-traceid", "xyz"), ("x-b3-spanid", S), ("x-b3-sampled", "1")])


def malformed_b3_single(p: Probe) -> None:
    traced(p, "/ok", "svc.test", [("b3", "zzz-{S}-1")])


@_hcm_stats
def retried_500_then_200(p: Probe) -> None:
    """Two attempts, each its own CLIENT span: the 500 (error, canceled), then the 200 (retry.count 1)."""
    traced(p, "/flaky/trace-retry/1/500", "svc.test", spans=3)


def connect_failure(p: Probe) -> None:
    """The attempt never connects: status 0, UF, the reset reason, no protocol."""
    traced(p, "/x", "dead.test")


@_hcm_stats
def egress_b3_known(p: Probe) -> None:
    """OUTBOUND: a CLIENT span, a new id whose parent is the caller's span, no per-attempt spans."""
    traced(p, "/ok", "svc.test", [("x-b3-traceid", T), ("x-b3-spanid", S), ("x-b3-sampled", "1")],
           spans=1, edge=True)


def egress_no_context_retried(p: Probe) -> None:
    """OUTBOUND without spawned spans: both attempts carry the connection manager's span id."""
    traced(p, "/flaky/trace-egress/1/500", "svc.test", spans=1, edge=True)


@_hcm_stats
def egress_spawn_b3_known(p: Probe) -> None:
    """OUTBOUND with spawn_upstream_span: a SERVER span sharing the caller's span id (as INBOUND), the attempt's
    CLIENT span under it."""
    traced(p, "/ok", "svc.test", [("x-b3-traceid", T), ("x-b3-spanid", S), ("x-b3-parentspanid", P),
                                  ("x-b3-sampled", "1")], spawn=True)


def egress_spawn_no_context(p: Probe) -> None:
    """OUTBOUND with spawn_upstream_span, a new trace: root SERVER span (trace id's low 64 bits), attempt under it."""
    traced(p, "/ok", "svc.test", spawn=True)


def egress_spawn_traceparent(p: Probe) -> None:
    traced(p, "/ok", "svc.test", [("traceparent", "00-{T}-{S}-01")], spawn=True)


def egress_spawn_b3_single(p: Probe) -> None:
    traced(p, "/ok", "svc.test", [("b3", "{T}-{S}-1-{P}")], spawn=True)


def egress_spawn_retried(p: Probe) -> None:
    """Two attempts, each a CLIENT span under the (SERVER) connection manager's span."""
    traced(p, "/flaky/trace-egress-spawn/1/500", "svc.test", spans=3, spawn=True)


def egress_spawn_not_sampled(p: Probe) -> None:
    traced(p, "/ok", "svc.test", [("x-b3-traceid", T), ("x-b3-spanid", S), ("x-b3-sampled", "0")], spans=0,
           spawn=True)


def client_trace_id(p: Probe) -> None:
    """x-client-trace-id: counted as client_enabled, tagged guid:x-client-trace-id."""
    traced(p, "/ok", "svc.test", [("x-client-trace-id", "abc")])


client_trace_id = _hcm_stats(client_trace_id)

SCENARIOS = {f.__name__: f for f in (
    no_context, traceparent_known, traceparent_not_sampled, traceparent_upper_case, b3_multi_known, b3_multi_64bit,
    b3_single_known, b3_sampled_0, b3_single_deny, b3_flags_debug, b3_and_traceparent, b3_trace_id_only,
    malformed_b3, malformed_b3_single, retried_500_then_200, connect_failure, egress_b3_known,
    egress_no_context_retried, egress_spawn_b3_known, egress_spawn_no_context, egress_spawn_traceparent,
    egress_spawn_b3_single, egress_spawn_retried, egress_spawn_not_sampled, client_trace_id)}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_tracing(pair: Pair, name: str) -> None:
    check(pair, name, SCENARIOS[name])
