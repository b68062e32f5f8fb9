"""What is known about one downstream request once it is done: the access log's and the stats' input.

Filled in by the data path as the request progresses (like Envoy's
StreamInfo); read by access loggers and the stats sink after the response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class RequestInfo:
    start_time: float  # time.time() at the first byte of the request
    start_monotonic: float
    method: str = "-"
    path: str = "-"  # as received (origin form), after absolute-form normalisation
    original_path: str | None = None  # before a prefix rewrite (X-ENVOY-ORIGINAL-PATH)
    protocol: str = "HTTP/1.1"
    authority: str = ""
    request_headers: dict[str, str] = field(default_factory=dict)  # lower-case names, last value wins
    response_headers: dict[str, str] = field(default_factory=dict)
    response_code: int = 0  # 0: no response sent
    response_flags: list[str] = field(default_factory=list)
    bytes_received: int = 0  # request body bytes
    bytes_sent: int = 0  # response body bytes
    duration_ms: int = 0
    upstream_service_time_ms: int | None = None
    upstream_host: str | None = None  # "ip:port" of the last attempt
    upstream_cluster: str | None = None
    downstream_remote: str = ""  # "ip:port"
    downstream_local: str = ""
    route_name: str = ""
    attempts: int = 0

    @property
    def flags_text(self) -> str:
        return ",".join(self.response_flags) if self.response_flags else "-"
