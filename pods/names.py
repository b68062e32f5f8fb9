"""Names the user chooses that become paths or host names: one definition each."""

from __future__ import annotations

import re

#: A mesh name is a directory name under MESHCTL_HOME: no separators, no surprises.
_MESH_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
#: RFC 1123 label (Kubernetes' DNS-1123 label): what a pod name must be, so it is a host name everywhere.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: RFC 1035 label (Kubernetes' DNS-1035 label): a Kubernetes Service name, which must start with a letter.
_DNS1035_LABEL = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
#: RFC 1123 subdomain: dot-separated labels, at most 253 characters (Kubernetes object names, hostAliases).
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")

DNS_LABEL_RULE = "lowercase letters, digits and '-', no '-' at either end, at most 63 characters"
DNS1035_LABEL_RULE = ("lowercase letters, digits and '-', starting with a letter, no '-' at the end, "
                      "at most 63 characters")
DNS_SUBDOMAIN_RULE = ("dot-separated parts of lowercase letters, digits and '-' (no '-' at either end of a part), "
                      "at most 253 characters")


def valid_mesh_name(name: str) -> bool:
    return bool(_MESH_NAME.fullmatch(name)) and ".." not in name


def dns_label(name: str) -> bool:
    """Whether ``name`` is a DNS-1123 label (pod names, Kubernetes namespaces)."""
    return bool(_DNS_LABEL.fullmatch(name))


def dns1035_label(name: str) -> bool:
    """Whether ``name`` is a DNS-1035 label (Kubernetes Service names)."""
    return bool(_DNS1035_LABEL.fullmatch(name))


def dns_subdomain(name: str) -> bool:
    """Whether ``name`` is a DNS-1123 subdomain (Kubernetes object names, hostAliases host names)."""
    return len(name) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(name)) and all(
        len(part) <= 63 for part in name.split("."))
