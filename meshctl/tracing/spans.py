"""Zipkin v2 spans as the collector accepts them: validated and normalised, or refused with a reason.

The model is Zipkin's (``zipkin2.Span``): hex ids (trace ids of 64 or 128 bits, span ids of 64), times in
microseconds since the epoch, ``kind`` one of CLIENT/SERVER/PRODUCER/CONSUMER, string tags. Normalised the
way Zipkin's own builder does, so the query API answers what Zipkin would: ids lower-case and left-padded to
16 or 32 digits, service names lower-case. A span is a plain dict holding only the fields it has, which is
also its JSON form on the query API.

A body is all or nothing, as in Zipkin: one bad span refuses the whole message (400 with the reason), so a
sender learns of its bug instead of losing spans silently.
"""

from __future__ import annotations

import json
import re
from typing import Any

KINDS = ("CLIENT", "SERVER", "PRODUCER", "CONSUMER")
_HEX = re.compile(r"[0-9a-fA-F]+")
#: Tags and annotation values longer than this are cut: one runaway tag must not pin megabytes per span.
MAX_TAG_LENGTH = 4096


class SpanError(ValueError):
    """The body is not a Zipkin v2 JSON list of spans; the message says why (sent back with the 400)."""


Span = dict[str, Any]


def parse_body(body: bytes) -> list[Span]:
    """Every span of a ``POST /api/v2/spans`` body, normalised; raises SpanError."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpanError(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise SpanError("body is not JSON: nested too deeply") from None
    if not isinstance(doc, list):
        raise SpanError(f"expected a JSON array of spans (Zipkin v2), got {type(doc).__name__}")
    return [normalize(raw, i) for i, raw in enumerate(doc)]


def normalize(raw: object, index: int = 0) -> Span:
    """One span, validated and normalised (raises SpanError naming the span's index and field)."""
    where = f"span {index}"
    if not isinstance(raw, dict):
        raise SpanError(f"{where}: expected an object, got {type(raw).__name__}")
    span: Span = {"traceId": trace_id(raw.get("traceId"), f"{where}: traceId")}
    parent = raw.get("parentId")
    if parent is not None:
        parent = _span_id(parent, f"{where}: parentId", zero_ok=True)
        if parent.strip("0"):  # an all-zero parent is "none" in B3
            span["parentId"] = parent
    span["id"] = _span_id(raw.get("id"), f"{where}: id")
    kind = raw.get("kind")
    if kind is not None:
        if kind not in KINDS:
            raise SpanError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        span["kind"] = kind
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise SpanError(f"{where}: name must be a string, got {type(name).__name__}")
        if name:
            span["name"] = name[:MAX_TAG_LENGTH]
    for key in ("timestamp", "duration"):
        value = raw.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != value:
                raise SpanError(f"{where}: {key} must be a non-negative number of microseconds, got {value!r}")
            if value:  # Zipkin reads 0 as unset
                span[key] = int(value)
    for key in ("localEndpoint", "remoteEndpoint"):
        value = raw.get(key)
        if value is not None:
            endpoint = _endpoint(value, f"{where}: {key}")
            if endpoint:
                span[key] = endpoint
    annotations = raw.get("annotations")
    if annotations is not None:
        span_annotations = _annotations(annotations, f"{where}: annotations")
        if span_annotations:
            span["annotations"] = span_annotations
    tags = raw.get("tags")
    if tags is not None:
        span_tags = _tags(tags, f"{where}: tags")
        if span_tags:
            span["tags"] = span_tags
    for key in ("debug", "shared"):
        value = raw.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise SpanError(f"{where}: {key} must be true or false, got {value!r}")
            if value:
                span[key] = True
    return span


def trace_id(value: object, where: str = "traceId") -> str:
    """A trace id as Zipkin keeps it: lower-case hex, 16 or 32 digits (raises SpanError)."""
    text = _hex(value, 32, where)
    return text.rjust(16 if len(text) <= 16 else 32, "0")


def _span_id(value: object, where: str, zero_ok: bool = False) -> str:
    return _hex(value, 16, where, zero_ok).rjust(16, "0")


def _hex(value: object, most: int, where: str, zero_ok: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise SpanError(f"{where} must be a hex string, got {value!r}")
    if len(value) > most or not _HEX.fullmatch(value):
        raise SpanError(f"{where} must be 1 to {most} hex digits, got {value[:40]!r}")
    if not zero_ok and not value.strip("0"):
        raise SpanError(f"{where} must not be all zeros")
    return value.lower()


def _endpoint(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpanError(f"{where} must be an object, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key in ("serviceName", "ipv4", "ipv6"):
        text = value.get(key)
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            raise SpanError(f"{where}.{key} must be a string, got {type(text).__name__}")
        out[key] = text.lower()[:MAX_TAG_LENGTH] if key == "serviceName" else text[:64]
    port = value.get("port")
    if port is not None and port != 0:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise SpanError(f"{where}.port must be a port number, got {port!r}")
        out["port"] = port
    return out


def _annotations(value: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise SpanError(f"{where} must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if (not isinstance(item, dict) or not isinstance(item.get("value"), str)
                or isinstance(item.get("timestamp"), bool) or not isinstance(item.get("timestamp"), int | float)):
            raise SpanError(f"{where}[{i}] must be {{timestamp: microseconds, value: string}}")
        out.append({"timestamp": int(item["timestamp"]), "value": item["value"][:MAX_TAG_LENGTH]})
    return out


def _tags(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SpanError(f"{where} must be an object of strings, got {type(value).__name__}")
    out = {}
    for key, tag in value.items():
        if isinstance(tag, bool):
            tag = "true" if tag else "false"
        elif isinstance(tag, int | float):  # some tracers send numbers; Zipkin's own clients send strings
            tag = str(tag)
        elif not isinstance(tag, str):
            raise SpanError(f"{where}.{key} must be a string, got {type(tag).__name__}")
        out[str(key)[:256]] = tag[:MAX_TAG_LENGTH]
    return out


def service_of(span: Span) -> str:
    """The span's service (its ``localEndpoint.serviceName``), or "" when it reported none."""
    return span.get("localEndpoint", {}).get("serviceName", "")
