"""Zipkin v2 spans as an OTLP/HTTP JSON export request (``ExportTraceServiceRequest``, ``POST /v1/traces``).

The mapping is OpenTelemetry's own Zipkin translation, reversed: one ``resourceSpans`` per service
(``service.name``), the span kind's enum, times in nanoseconds (int64 as JSON strings, as the OTLP JSON
encoding requires), ids as hex (64-bit trace ids left-padded to 128 bits), tags as string attributes,
annotations as events, endpoints as ``net.*`` attributes and ``peer.service``, and an ``error`` tag as
status ERROR with its value as the message.
"""

from __future__ import annotations

from typing import Any

from meshctl.tracing.spans import Span, service_of

SCOPE = {"name": "meshctl.tracing", "version": "1"}
#: OTLP's SpanKind enum.
KIND = {None: 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
STATUS_ERROR = 2
UNKNOWN_SERVICE = "unknown_service"


def to_otlp(spans: list[Span]) -> dict[str, Any]:
    """One export request for ``spans`` (normalised Zipkin v2 spans)."""
    by_service: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_service.setdefault(service_of(span) or UNKNOWN_SERVICE, []).append(otlp_span(span))
    return {"resourceSpans": [
        {"resource": {"attributes": [_attr("service.name", service)]},
         "scopeSpans": [{"scope": SCOPE, "spans": converted}]}
        for service, converted in by_service.items()]}


def otlp_span(span: Span) -> dict[str, Any]:
    start_ns = span.get("timestamp", 0) * 1000
    out: dict[str, Any] = {
        "traceId": span["traceId"].rjust(32, "0"),
        "spanId": span["id"],
        "name": span.get("name", ""),
        "kind": KIND.get(span.get("kind"), 1),
        "startTimeUnixNano": str(start_ns),
        "endTimeUnixNano": str(start_ns + span.get("duration", 0) * 1000),
    }
    if "parentId" in span:
        out["parentSpanId"] = span["parentId"]
    tags = dict(span.get("tags", {}))
    error = tags.pop("error", None)
    attributes = [_attr(k, v) for k, v in tags.items()]
    local, remote = span.get("localEndpoint", {}), span.get("remoteEndpoint", {})
    if "ipv4" in local or "ipv6" in local:
        attributes.append(_attr("net.host.ip", local.get("ipv4") or local["ipv6"]))
    if "port" in local:
        attributes.append(_attr("net.host.port", local["port"]))
    if remote.get("serviceName"):
        attributes.append(_attr("peer.service", remote["serviceName"]))
    if "ipv4" in remote or "ipv6" in remote:
        attributes.append(_attr("net.peer.ip", remote.get("ipv4") or remote["ipv6"]))
    if "port" in remote:
        attributes.append(_attr("net.peer.port", remote["port"]))
    if span.get("shared"):
        attributes.append(_attr("zipkin.shared", True))
    if attributes:
        out["attributes"] = attributes
    if span.get("annotations"):
        out["events"] = [{"timeUnixNano": str(a["timestamp"] * 1000), "name": a["value"]}
                         for a in span["annotations"]]
    if error is not None:
        out["status"] = {"code": STATUS_ERROR, **({"message": error} if error and error != "true" else {})}
    return out


def _attr(key: str, value: str | int | bool) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}
