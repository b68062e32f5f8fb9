"""The starter topology `meshctl init` writes: the seed's two demo services, A behind a sidecar that retries B.

It runs as it is for any user: the demo services ship in meshctl's own package (``python`` in a command is
meshctl's interpreter), so no file besides the topology is needed, and every port is a ``${VAR:-default}``
above 1024, which also lets tests (and a user with a busy port) move them.
"""

from __future__ import annotations

_HEADER = """\
# A starter mesh, written by `meshctl init`. Two pods, each a plain process on its own loopback alias 127.0.x.1
# (no containers), reachable from the other pods by name:
#   a  the public API: answers every request by calling b, through its sidecar, which retries b's failures
#   b  an unreliable upstream: it fails B_ERROR_RATE percent of its requests (default 20)
# Try it:
#   meshctl up meshctl.yaml -d        # returns once every pod is ready
#   meshctl traffic a --n 100         # ~99 % success: a's sidecar retries what b fails (b alone: ~80 %)
#   curl -s localhost:8080            # a, published on the host
#   meshctl logs b                    # b's requests, retries included
#   meshctl down
# Every port is a variable with a default above 1024, so no root is needed; each pod has its own alias, so
# pods may reuse numbers. Override one like this: A_PUBLISH_PORT=8090 meshctl up meshctl.yaml -d
#   A_PUBLISH_PORT 8080   127.0.0.1 port published to a's sidecar ingress
#   A_PORT 8080           a's sidecar ingress, on a's alias (what `meshctl traffic a` calls)
#   A_SERVICE_PORT 8000   service a, pod-local behind its sidecar
#   A_EGRESS_PORT 9001    a's sidecar egress listener (service a gets HTTP_PROXY pointing at it)
#   A_ADMIN_PORT 9901     a's sidecar admin (stats, /ready; `meshctl admin a /stats`)
#   B_PORT 8000           service b
#   B_METRICS_PORT 8081   service b's Prometheus metrics (`meshctl stats`)
# The whole syntax is in meshctl's README, "Topology reference" and "The sidecar".
"""

_BODY = """\
pods:
  b:
    service:
      command: [python, -m, services.b]     # any program on PATH; a list, or a string split like a shell would
      env:
        ERROR_RATE: "${B_ERROR_RATE:-20}"
        SERVICE_HOST: 127.0.0.1              # inside a pod, 127.0.0.1 and localhost mean the pod's own alias
        SERVICE_PORT: "${B_PORT:-8000}"
        METRICS_PORT: "${B_METRICS_PORT:-8081}"
      ready: {tcp: "${B_PORT:-8000}"}        # ready once the port accepts; or {http: /path, port: N}, {exec: [...]}
      restart: always                        # always | on-failure | never
    metrics: {port: "${B_METRICS_PORT:-8081}"}
  a:
    depends_on: {b: ready}                   # start a once b is ready (or [b]: once started)
    publish: ["${A_PUBLISH_PORT:-8080}:${A_PORT:-8080}"]
    sidecar:                                 # an Envoy-style proxy in front of (ingress) and behind (egress) a
      ingress: {port: "${A_PORT:-8080}", to: "${A_SERVICE_PORT:-8000}"}
      egress:
        port: "${A_EGRESS_PORT:-9001}"
        routes:
          - host: b                          # what service a asks its proxy for (any port)
            to: "b:${B_PORT:-8000}"          # a pod name, resolved to every replica of b
            retry_policy: {retry_on: 5xx, num_retries: 3, per_try_timeout: 2s}
            timeout: 10s
            # Envoy's default allows 3 retries in flight for the whole cluster, which refuses most retries
            # under concurrent load (`meshctl traffic -c 10`): allow plenty.
            circuit_breakers: {max_retries: 100}
      admin: {port: "${A_ADMIN_PORT:-9901}"}
      access_log: /dev/stdout                # `meshctl logs a --role sidecar`
    service:
      command: [python, -m, services.a]
      env:
        SERVICE_HOST: 127.0.0.1
        SERVICE_PORT: "${A_SERVICE_PORT:-8000}"
        # Service a just calls http://b:PORT/; HTTP_PROXY (set by meshctl because of the egress listener above)
        # sends that through the sidecar, which applies the retry policy. No code knows about the mesh.
        UPSTREAM_SERVICE: "http://b:${B_PORT:-8000}/"
      ready: {tcp: "${A_SERVICE_PORT:-8000}"}
"""


def starter_topology(name: str) -> str:
    """The starter's YAML text for a mesh called ``name`` (a valid mesh name)."""
    return f"{_HEADER}name: {name}\n{_BODY}"
