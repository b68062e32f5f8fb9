"""Pod-local loopback: inside a pod, 127.0.0.1, localhost and 0.0.0.0 mean the pod's alias.

A real pod has its own network namespace, so a service that binds 0.0.0.0:80 or
calls localhost:8000 stays inside the pod. Processes here share the host's
namespace, so meshctl rewrites those addresses to the pod's alias wherever they
appear as a whole value, as the host of host:port, or as the host of a URL.
Substrings inside other words are left alone (``127.0.0.10`` is not touched).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

POD_LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")

# A local host name standing alone, or followed by :port, or as the host of a
# URL (scheme://[userinfo@]host[:port][/...]). The lookarounds keep us from
# rewriting 127.0.0.10 or my-localhost.
_LOCAL = r"(?:127\.0\.0\.1|localhost|0\.0\.0\.0)"
_PATTERN = re.compile(
    rf"(?P<pre>^|(?<=://)|(?<=@)|(?<==)|(?<=[\s,;]))(?P<host>{_LOCAL})(?=$|:\d|/|[\s,;])",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(r"\$\{(POD_IP|POD_NAME|REPLICA|MESH)\}")


def localize(value: str, alias: str) -> str:
    """Rewrite pod-local addresses in ``value`` to ``alias``."""
    if not any(h in value.lower() for h in POD_LOCAL_HOSTS):
        return value
    return _PATTERN.sub(lambda m: m.group("pre") + alias, value)


def is_pod_local(host: str) -> bool:
    """True when ``host`` names the pod itself (empty means "all interfaces", i.e. the pod)."""
    return host.lower() in POD_LOCAL_HOSTS or host == ""


def expand_placeholders(value: str, values: Mapping[str, str]) -> str:
    """Expand ``${POD_IP}``, ``${POD_NAME}``, ``${REPLICA}`` and ``${MESH}``."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], value)


def bind_host(requested: str | None, pod_ip: str | None) -> str:
    """The address a service should bind when asked for ``requested``.

    Services written for containers bind "" or 0.0.0.0; inside a meshctl pod
    that must become the pod alias (``POD_IP``) or the pods would collide.
    """
    host = (requested or "").strip()
    if pod_ip and is_pod_local(host):
        return pod_ip
    return host or "0.0.0.0"
