"""What is known about one downstream request once it is done: the access log's and the stats' input.

Filled in by the data path as the request progresses (like Envoy's
StreamInfo); read by access loggers and the stats sink after the response.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

#: Envoy response flags we produce.
FLAG_NO_ROUTE = "NR"
FLAG_NO_HEALTHY_UPSTREAM = "UH"
FLAG_UPSTREAM_CONNECT_FAILURE = "UF"
FLAG_UPSTREAM_CONNECTION_TERMINATION = "UC"
FLAG_UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
FLAG_UPSTREAM_REQUEST_TIMEOUT = "UT"
FLAG_UPSTREAM_OVERFLOW = "UO"
FLAG_UPSTREAM_PROTOCOL_ERROR = "UPE"
FLAG_DOWNSTREAM_CONNECTION_TERMINATION = "DC"
FLAG_DOWNSTREAM_PROTOCOL_ERROR = "DPE"
FLAG_LOCAL_RESET = "LR"
#: Envoy's ResponseFlag enum order (how it prints combined flags).
_FLAG_ORDER = {f: i for i, f in enumerate(
    ("LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX", "SI",
     "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM"))}


class HeaderView(Mapping[str, str]):
    """A str-keyed, read-only view of wire headers that decodes only what is asked for.

    The access log reads a handful of headers per request; decoding all of
    them into a dict would cost more than the lookups.
    """

    __slots__ = ("_d",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._d = dict(raw)

    def get(self, name: str, default: Any = None) -> Any:
        v = self._d.get(name.encode("latin-1"))
        return default if v is None else v.decode("latin-1")

    def __getitem__(self, name: str) -> str:
        v = self._d.get(name.encode("latin-1"))
        if v is None:
            raise KeyError(name)
        return v.decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return (k.decode("latin-1") for k in self._d)

    def __len__(self) -> int:
        return len(self._d)


class RequestInfo:
    """Per-request facts; header dicts are built only if someone (an access log) reads them."""

    __slots__ = (
        "start_time", "start_monotonic", "method", "path", "original_path", "protocol", "authority",
        "raw_request_headers", "raw_response_headers", "_request_headers", "_response_headers",
        "response_code", "response_flags", "bytes_received", "bytes_sent", "duration_ms",
        "upstream_service_time_ms", "upstream_host", "upstream_cluster", "downstream_remote",
        "downstream_local", "route_name", "attempts", "downstream_tls", "upstream_peer_uri_san",
        "upstream_transport_failure_reason",
    )

    def __init__(self, start_time: float, start_monotonic: float, downstream_remote: str = "",
                 downstream_local: str = "", **fields: Any) -> None:
        self.start_time = start_time  # time.time() at the first byte of the request
        self.start_monotonic = start_monotonic
        self.method = "-"
        self.path = "-"  # origin form, after absolute-form normalisation
        self.original_path: str | None = None  # before a prefix rewrite (X-ENVOY-ORIGINAL-PATH)
        self.protocol = "HTTP/1.1"
        self.authority = ""
        self.raw_request_headers: list[tuple[bytes, bytes]] = []
        self.raw_response_headers: list[tuple[bytes, bytes]] = []
        self._request_headers: Mapping[str, str] | None = None
        self._response_headers: Mapping[str, str] | None = None
        self.response_code = 0  # 0: no response sent
        self.response_flags: list[str] = []
        self.bytes_received = 0  # request body bytes
        self.bytes_sent = 0  # response body bytes
        self.duration_ms = 0
        self.upstream_service_time_ms: int | None = None
        self.upstream_host: str | None = None  # "ip:port" of the last attempt
        self.upstream_cluster: str | None = None
        self.downstream_remote = downstream_remote
        self.downstream_local = downstream_local
        self.route_name = ""
        self.attempts = 0
        self.downstream_tls: Any = None  # sidecar.tls.TlsInfo of a TLS connection (set by its protocol)
        self.upstream_peer_uri_san: str | None = None  # the TLS upstream's verified URI SAN (last attempt)
        self.upstream_transport_failure_reason: str | None = None  # why the last TLS connect failed
        for name, value in fields.items():
            setattr(self, name, value)

    @property
    def request_headers(self) -> Mapping[str, str]:
        """Lower-case names, last value wins; values decoded only when looked up."""
        if self._request_headers is None:
            self._request_headers = HeaderView(self.raw_request_headers)
        return self._request_headers

    @request_headers.setter
    def request_headers(self, value: Mapping[str, str]) -> None:
        self._request_headers = value

    @property
    def response_headers(self) -> Mapping[str, str]:
        if self._response_headers is None:
            self._response_headers = HeaderView(self.raw_response_headers)
        return self._response_headers

    @response_headers.setter
    def response_headers(self, value: Mapping[str, str]) -> None:
        self._response_headers = value

    @property
    def flags_text(self) -> str:
        """Envoy prints flags in its enum order, whatever order they were raised in."""
        flags = self.response_flags
        if not flags:
            return "-"
        if len(flags) > 1:
            flags = sorted(set(flags), key=lambda f: _FLAG_ORDER.get(f, 99))
        return ",".join(flags)
